"""`replayllm bench` on the CPU: the table, the timing arithmetic (fake backend, fake clock), model facts, CLI."""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import types

import pytest

from replayllm.bench import llama_bench
from replayllm.bench.llama_bench import BenchResult, BenchTest, ModelFacts, markdown_table, model_facts, run_test
from replayllm.cli.main import main

FACTS = ModelFacts("fake", "Q4_0", size_bytes=3 * 2**30, n_params=7_000_000_000,
                   decode_weight_bytes=2_000_000_000, kv_bytes_per_token=100_000)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class FakeBackend:
    """Advances a fake clock: `pp_token_s[rep]` per prompt token, `tg_token_s[rep]` per generated token."""

    name = "fake-backend"

    def __init__(self, clock, pp_token_s=(), tg_token_s=(), extra_tokens=0, prefills_per_rep=1):
        self.clock = clock
        self.pp_token_s = list(pp_token_s)
        self.tg_token_s = list(tg_token_s)
        self.extra_tokens = extra_tokens
        self.prefills_per_rep = prefills_per_rep
        self.prefill_calls = []
        self.generate_calls = []
        self.closed = 0

    def prefill_only(self, ids, chunk):
        rep = len(self.prefill_calls) // self.prefills_per_rep
        self.prefill_calls.append((list(ids), chunk))
        self.clock.now += len(ids) * self.pp_token_s[rep]

    def generate_ids(self, prompt_ids, params, seed, max_new_tokens):
        rep = len(self.generate_calls)
        self.generate_calls.append((list(prompt_ids), params, seed, max_new_tokens))
        step = self.tg_token_s[rep]
        try:
            self.clock.now += 1000.0  # prompt processing: must not be timed
            yield 7
            for i in range(max_new_tokens - 1 + self.extra_tokens):
                self.clock.now += step
                yield i
        finally:
            self.closed += 1


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(llama_bench, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def result(**overrides) -> BenchResult:
    fields = dict(model="tiny", quant="Q8_0", size_bytes=2**30, params=1_500_000_000, backend="cuda",
                  test="tg128", depth=0, batch=1, n_tokens=128,
                  tokens_per_s={"mean": 123.456, "std": 1.234, "samples": [122.2, 124.7]},
                  weight_gbps=987.6, roofline_fraction=0.8123, roofline_tokens_per_s=151.9)
    fields.update(overrides)
    return BenchResult(**fields)


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_markdown_table_header_has_every_column():
    header = markdown_table([]).splitlines()[0]
    assert cells(header) == ["model", "size", "params", "backend", "test", "t/s", "weights GB/s",
                             "% of copy BW", "roofline t/s"]


def test_markdown_table_has_one_row_per_result_with_formatted_values():
    lines = markdown_table([result(), result(test="pp512", batch=2048, n_tokens=512)]).splitlines()
    assert len(lines) == 4
    assert len(cells(lines[1])) == 9 and all(set(c) <= set("-:") for c in cells(lines[1]))
    row = cells(lines[2])
    assert row == ["tiny Q8_0", "1.00 GiB", "1.50 B", "cuda", "tg128", "123.46 ± 1.23", "988", "81.2", "152"]
    assert cells(lines[3])[4] == "pp512"


def test_markdown_table_shows_a_dash_for_missing_values():
    row = cells(markdown_table([result(test="pp16", weight_gbps=None, roofline_fraction=None,
                                       roofline_tokens_per_s=None)]).splitlines()[2])
    assert row[6:] == ["-", "-", "-"]
    assert row[5] == "123.46 ± 1.23"


def test_markdown_table_names_the_depth_when_there_is_one():
    lines = markdown_table([result(depth=512), result(depth=0)]).splitlines()
    assert cells(lines[2])[4] == "tg128 @ d512"
    assert cells(lines[3])[4] == "tg128"


def test_tg_tokens_per_s_is_mean_and_std_over_the_timed_repetitions(clock):
    # the warm-up run (first) is 100x slower and must not count; prompt processing (1000 s) is not timed
    backend = FakeBackend(clock, tg_token_s=[1.0, 0.01, 0.02, 0.04])
    res = run_test(backend, BenchTest("tg", 4), FACTS, vocab_size=50, repetitions=3, copy_gbps=None)
    expected = [100.0, 50.0, 25.0]
    assert res.tokens_per_s["samples"] == pytest.approx(expected)
    assert res.tokens_per_s["mean"] == pytest.approx(statistics.fmean(expected))
    assert res.tokens_per_s["std"] == pytest.approx(statistics.stdev(expected))
    assert len(backend.generate_calls) == 4 and backend.closed == 4


def test_tg_weight_bandwidth_and_roofline(clock):
    backend = FakeBackend(clock, tg_token_s=[0.01, 0.01, 0.03])
    test = BenchTest("tg", 8, depth=32)
    res = run_test(backend, test, FACTS, vocab_size=50, repetitions=2, copy_gbps=3000.0)
    mean = statistics.fmean([100.0, 1 / 0.03])
    assert res.tokens_per_s["mean"] == pytest.approx(mean)
    assert res.weight_gbps == pytest.approx(mean * FACTS.decode_weight_bytes / 1e9)
    roofline = 3000.0 * 1e9 / (FACTS.decode_weight_bytes + FACTS.kv_bytes_per_token * (32 + 8 / 2))
    assert res.roofline_tokens_per_s == pytest.approx(roofline)
    assert res.roofline_fraction == pytest.approx(mean / roofline)
    assert (res.test, res.depth, res.batch, res.n_tokens, res.backend) == ("tg8", 32, 1, 8, "fake-backend")


def test_tg_prompt_carries_the_depth_and_asks_for_one_token_more(clock):
    backend = FakeBackend(clock, tg_token_s=[0.01, 0.01])
    run_test(backend, BenchTest("tg", 5, depth=9), FACTS, vocab_size=50, repetitions=1, copy_gbps=None)
    prompt, params, _, max_new = backend.generate_calls[0]
    assert len(prompt) == 10 and all(0 <= t < 50 for t in prompt)
    assert max_new == 6 and params.temperature == 0.0 and params.ignore_eos


def test_tg_without_copy_bandwidth_has_no_roofline(clock):
    res = run_test(FakeBackend(clock, tg_token_s=[0.01, 0.01]), BenchTest("tg", 4), FACTS, 50, 1, None)
    assert res.weight_gbps is not None
    assert res.roofline_fraction is None and res.roofline_tokens_per_s is None
    assert res.tokens_per_s["std"] == 0.0


def test_pp_tokens_per_s_uses_the_batch_and_has_no_bandwidth_columns(clock):
    backend = FakeBackend(clock, pp_token_s=[1.0, 0.001, 0.002])
    res = run_test(backend, BenchTest("pp", 16, batch=8), FACTS, vocab_size=50, repetitions=2, copy_gbps=3000.0)
    assert res.tokens_per_s["samples"] == pytest.approx([1000.0, 500.0])
    assert res.weight_gbps is None and res.roofline_fraction is None and res.roofline_tokens_per_s is None
    assert (res.test, res.batch, res.n_tokens) == ("pp16", 8, 16)
    assert [len(ids) for ids, _ in backend.prefill_calls] == [16, 16, 16]
    assert {chunk for _, chunk in backend.prefill_calls} == {8}


def test_pp_at_depth_times_only_the_tokens_after_the_context(clock):
    backend = FakeBackend(clock, pp_token_s=[1.0, 0.001, 0.004], prefills_per_rep=2)
    res = run_test(backend, BenchTest("pp", 16, depth=64), FACTS, vocab_size=50, repetitions=2, copy_gbps=None)
    assert res.tokens_per_s["samples"] == pytest.approx([1000.0, 250.0])
    assert [len(ids) for ids, _ in backend.prefill_calls] == [80, 64] * 3
    whole, context = backend.prefill_calls[2][0], backend.prefill_calls[3][0]
    assert context == whole[:64]


@pytest.mark.parametrize("extra", [-1, 1])
def test_a_backend_generating_the_wrong_number_of_tokens_is_an_error(clock, extra):
    backend = FakeBackend(clock, tg_token_s=[0.01] * 3, extra_tokens=extra)
    with pytest.raises(RuntimeError, match="tg4"):
        run_test(backend, BenchTest("tg", 4), FACTS, vocab_size=50, repetitions=2, copy_gbps=None)
    assert backend.closed == 1


def test_a_backend_generating_nothing_is_a_runtime_error(clock):
    class SilentBackend:
        name = "silent"

        def generate_ids(self, prompt_ids, params, seed, max_new_tokens):
            return
            yield

    with pytest.raises(RuntimeError):
        run_test(SilentBackend(), BenchTest("tg", 4), FACTS, vocab_size=50, repetitions=1, copy_gbps=None)


def test_on_sample_is_called_once_per_timed_repetition(clock):
    calls = []
    run_test(FakeBackend(clock, tg_token_s=[0.01] * 4), BenchTest("tg", 2), FACTS, 50, 3, None,
             on_sample=lambda: calls.append(1))
    assert len(calls) == 3


def test_to_json_has_the_fields_external_tools_read(clock):
    res = run_test(FakeBackend(clock, tg_token_s=[0.01] * 3), BenchTest("tg", 4), FACTS, 50, 2, 1000.0)
    data = json.loads(json.dumps(res.to_json()))
    for key in ("model", "quant", "test", "depth", "batch", "weight_gbps", "roofline_fraction"):
        assert key in data
    assert (data["model"], data["quant"], data["test"], data["depth"], data["batch"]) == ("fake", "Q4_0", "tg4", 0, 1)
    assert data["tokens_per_s"]["mean"] == pytest.approx(100.0)
    assert data["tokens_per_s"]["std"] == pytest.approx(0.0, abs=1e-6)
    assert data["weight_gbps"] == pytest.approx(res.weight_gbps)
    assert data["roofline_fraction"] == pytest.approx(res.roofline_fraction)


@pytest.fixture
def tiny_file(tiny_model_path):
    from replayllm.engine.model_file import open_model_file

    model_file = open_model_file(tiny_model_path)
    yield model_file
    model_file.close()


def test_model_facts_of_the_tiny_model(tiny_file):
    cfg, tensors = tiny_file.config, tiny_file.gguf.tensors
    assert not cfg.tied_embeddings
    facts = model_facts(tiny_file.gguf, cfg)
    size = sum(t.nbytes for t in tensors.values())
    embd = tensors["token_embd.weight"]
    assert facts.size_bytes == size
    assert facts.n_params == sum(t.n_elements for t in tensors.values())
    assert facts.decode_weight_bytes == size - embd.nbytes + embd.nbytes // cfg.vocab_size
    assert facts.kv_bytes_per_token == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    assert (facts.name, facts.quant) == ("tiny", "Q8_0")


def test_model_facts_with_tied_embeddings_keep_the_whole_embedding(tiny_file):
    cfg = dataclasses.replace(tiny_file.config, tied_embeddings=True)
    facts = model_facts(tiny_file.gguf, cfg)
    embd = tiny_file.gguf.tensors["token_embd.weight"]
    assert facts.decode_weight_bytes == facts.size_bytes + embd.nbytes // cfg.vocab_size


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, fragment):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0]


def test_bench_cli_prints_the_table_and_writes_the_json(capsys, tiny_model_path, tmp_path):
    path = tmp_path / "b.json"
    code, out, _ = run_cli(capsys, "bench", tiny_model_path, "--device", "cpu", "-p", "16", "-n", "4",
                           "-r", "2", "--json", path, "--quiet")
    assert code == 0
    rows = [cells(line) for line in out.splitlines() if line.startswith("|")]
    assert rows[0][:5] == ["model", "size", "params", "backend", "test"]
    assert [r[4] for r in rows[2:]] == ["pp16", "tg4"]
    assert all(re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", r[5]) for r in rows[2:])
    data = json.loads(path.read_text())
    assert data["kind"] == "bench" and data["device"] == "cpu"
    assert data["commit"] and re.match(r"\d{4}-\d\d-\d\dT", data["date"])
    pp, tg = data["results"]
    for r in (pp, tg):
        assert (r["model"], r["quant"]) == ("tiny", "Q8_0")
        assert r["depth"] == 0 and len(r["tokens_per_s"]["samples"]) == 2
        assert r["tokens_per_s"]["mean"] > 0 and r["tokens_per_s"]["std"] >= 0
        assert "roofline_fraction" in r and r["roofline_fraction"] is None
    assert (pp["test"], pp["batch"], pp["weight_gbps"]) == ("pp16", 2048, None)
    assert (tg["test"], tg["batch"]) == ("tg4", 1) and tg["weight_gbps"] > 0


def test_bench_cli_runs_every_test_at_every_depth(capsys, tiny_model_path):
    code, out, _ = run_cli(capsys, "bench", tiny_model_path, "--device", "cpu", "-p", "4", "-n", "2",
                           "-d", "0,3", "-r", "1", "-b", "2", "--quiet")
    assert code == 0
    tests = [cells(line)[4] for line in out.splitlines()[2:]]
    assert tests == ["pp4", "pp4 @ d3", "tg2", "tg2 @ d3"]


@pytest.mark.parametrize("flags, fragment", [
    (["-r", "0"], "-r"),
    (["-b", "0"], "-b"),
    (["-p", "abc"], "-p"),
    (["-n", "-3"], "-n"),
    (["-p", "0", "-n", "0"], "nothing to run"),
    (["-r", "x"], "-r"),
    (["-p", "16", "-d", "1000"], "context"),
])
def test_bench_cli_argument_errors_are_one_line(capsys, tiny_model_path, flags, fragment):
    code, _, err = run_cli(capsys, "bench", tiny_model_path, "--device", "cpu", "--quiet", *flags)
    assert_user_error(code, err, fragment)

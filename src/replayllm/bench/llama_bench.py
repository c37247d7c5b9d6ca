"""`replayllm bench`: llama-bench's tests (ppN, tgN) and table, plus bandwidth and roofline columns.

- ppN: N prompt tokens processed in chunks of `batch` (llama-bench's -b), after `depth` tokens of context.
- tgN: N tokens generated one at a time (greedy, in the engine's real decode loop) after `depth` tokens of
  context; timed from the first generated token to the last, so prompt processing is excluded.
Tokens are random ids; tokenization is excluded. Each test runs once untimed (warm-up), then `repetitions`
times; tokens/s is reported as mean ± standard deviation.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..sampling import SamplingParams


@dataclass(frozen=True)
class BenchTest:
    kind: str  # "pp" | "tg"
    n_tokens: int
    depth: int = 0
    batch: int = 2048

    @property
    def name(self) -> str:
        return f"{self.kind}{self.n_tokens}"


@dataclass(frozen=True)
class ModelFacts:
    """What the table says about the model, and the bytes one decode step must read."""

    name: str
    quant: str
    size_bytes: int
    n_params: int
    decode_weight_bytes: int  # every matrix and vector a decode step reads (embedding: one row)
    kv_bytes_per_token: int  # f16 K and V of one position, all layers


@dataclass
class BenchResult:
    model: str
    quant: str
    size_bytes: int
    params: int
    backend: str
    test: str
    depth: int
    batch: int
    n_tokens: int
    tokens_per_s: dict  # {"mean": float, "std": float, "samples": [...]}
    weight_gbps: float | None
    roofline_fraction: float | None
    roofline_tokens_per_s: float | None

    def to_json(self) -> dict:
        return asdict(self)


def model_facts(gguf_file, config) -> ModelFacts:
    """Sizes from the file: a decode step reads every tensor once, but of the embedding only one row."""
    from gguf import LlamaFileType

    tensors = gguf_file.tensors
    size = sum(t.nbytes for t in tensors.values())
    embd = tensors["token_embd.weight"]
    decode_bytes = size - (0 if config.tied_embeddings else embd.nbytes) + embd.nbytes // embd.shape[1]
    try:
        quant = LlamaFileType(int(gguf_file.metadata.get("general.file_type", -1))).name.removeprefix("MOSTLY_")
    except ValueError:
        quant = "?"
    kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2
    meta = gguf_file.metadata
    name = meta.get("general.basename") or meta.get("general.name") or config.architecture
    return ModelFacts(str(name), quant, size,
                      sum(t.n_elements for t in tensors.values()), decode_bytes, kv)


def run_test(backend, test: BenchTest, facts: ModelFacts, vocab_size: int, repetitions: int,
             copy_gbps: float | None, on_sample: Callable[[], None] = lambda: None) -> BenchResult:
    rng = random.Random(0)
    samples = []
    for rep in range(repetitions + 1):  # the first run warms up and is not counted
        ids = [rng.randrange(vocab_size) for _ in range(test.depth + max(test.n_tokens if test.kind == "pp" else 1, 1))]
        seconds = _time_pp(backend, test, ids) if test.kind == "pp" else _time_tg(backend, test, ids)
        if rep > 0:
            samples.append(test.n_tokens / seconds)
            on_sample()
    mean = statistics.fmean(samples)
    std = statistics.stdev(samples) if len(samples) > 1 else 0.0
    weight_gbps = roofline = roofline_fraction = None
    if test.kind == "tg":
        step_bytes = facts.decode_weight_bytes + facts.kv_bytes_per_token * (test.depth + test.n_tokens // 2)
        weight_gbps = mean * facts.decode_weight_bytes / 1e9
        if copy_gbps:
            roofline = copy_gbps * 1e9 / step_bytes
            roofline_fraction = mean / roofline
    batch = test.batch if test.kind == "pp" else 1  # pp: the prompt chunk size (llama-bench's -b); tg: one sequence
    return BenchResult(facts.name, facts.quant, facts.size_bytes, facts.n_params, backend.name, test.name,
                       test.depth, batch, test.n_tokens, {"mean": mean, "std": std, "samples": samples},
                       weight_gbps, roofline_fraction, roofline)


def _time_pp(backend, test: BenchTest, ids: list[int]) -> float:
    if test.depth:
        # Context first (untimed), then the N tokens; prefill_only restarts from an empty cache, so time the
        # difference between depth+N and depth alone.
        start = time.perf_counter()
        backend.prefill_only(ids, test.batch)
        whole = time.perf_counter() - start
        start = time.perf_counter()
        backend.prefill_only(ids[: test.depth], test.batch)
        return max(whole - (time.perf_counter() - start), 1e-9)
    start = time.perf_counter()
    backend.prefill_only(ids, test.batch)
    return time.perf_counter() - start


def _time_tg(backend, test: BenchTest, ids: list[int]) -> float:
    params = SamplingParams(max_tokens=test.n_tokens + 1, temperature=0.0, ignore_eos=True)
    tokens = backend.generate_ids(ids, params, seed=0, max_new_tokens=test.n_tokens + 1)
    try:
        if next(tokens, None) is None:  # the prompt's token: prompt processing ends here
            raise RuntimeError(f"{test.name}: the backend generated no token")
        start = time.perf_counter()
        count = sum(1 for _ in tokens)
        elapsed = time.perf_counter() - start
    finally:
        tokens.close()
    if count != test.n_tokens:
        raise RuntimeError(f"{test.name}: the backend generated {count} tokens instead of {test.n_tokens}")
    return elapsed


def markdown_table(results: list[BenchResult]) -> str:
    header = ("| model | size | params | backend | test | t/s | weights GB/s | % of copy BW | roofline t/s |\n"
              "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    rows = [header]
    for r in results:
        tps = r.tokens_per_s
        rows.append(
            f"| {r.model} {r.quant} | {r.size_bytes / 2**30:.2f} GiB | {r.params / 1e9:.2f} B | {r.backend} | "
            f"{r.test}{f' @ d{r.depth}' if r.depth else ''} | {tps['mean']:.2f} ± {tps['std']:.2f} | {_opt(r.weight_gbps, '.0f')} | "
            f"{_opt(None if r.roofline_fraction is None else 100 * r.roofline_fraction, '.1f')} | "
            f"{_opt(r.roofline_tokens_per_s, '.0f')} |")
    return "\n".join(rows)


def _opt(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)

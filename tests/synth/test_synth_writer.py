"""Writing synthetic GGUF files: read back with the format's reference reader (gguf.GGUFReader)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as gguf_quants

from replayllm.errors import InvalidParameterError
from replayllm.synth import QUANTS, SHAPES, write_synthetic_model
from replayllm.synth import writer as writer_module

TINY = SHAPES["tiny"]
TINY_LAYER_TENSORS = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                      "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
# GGUF order (ne[0] = in_features first) for tiny: hidden 256, kv dim 2 * 64, ffn 768, vocab 384.
TINY_GGUF_SHAPES = {"token_embd.weight": [256, 384], "output.weight": [256, 384], "output_norm.weight": [256],
                    "attn_norm.weight": [256], "attn_q.weight": [256, 256], "attn_k.weight": [256, 128],
                    "attn_v.weight": [256, 128], "attn_output.weight": [256, 256], "ffn_norm.weight": [256],
                    "ffn_gate.weight": [256, 768], "ffn_up.weight": [256, 768], "ffn_down.weight": [768, 256]}
# llama_ftype numbers (general.file_type) of the reference enum.
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k_m": 15, "q5_k_m": 17,
              "q6_k": 18, "bf16": 32}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return {q: write_synthetic_model("tiny", q, folder / f"tiny-{q}.gguf", progress=False, workers=1) for q in QUANTS}


def _field(reader, key):
    return reader.fields[key].contents()


def _weights(reader):
    return {t.name: gguf_quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}


@pytest.mark.parametrize("quant", QUANTS)
def test_metadata(tiny_files, quant):
    reader = GGUFReader(tiny_files[quant])
    expected = {
        "general.architecture": "llama", "general.file_type": FILE_TYPES[quant], "general.quantization_version": 2,
        "llama.context_length": 256, "llama.embedding_length": 256, "llama.block_count": 2,
        "llama.feed_forward_length": 768, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 64, "llama.vocab_size": 384, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.bos_token_id": 382, "tokenizer.ggml.eos_token_id": 383,
        "tokenizer.ggml.add_bos_token": False,
    }
    for key, value in expected.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(_field(reader, "tokenizer.ggml.token_type")) == 384
    assert tokens[381:] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(_field(reader, "tokenizer.ggml.merges")) == 381 - 256
    assert "<|im_start|>" in _field(reader, "tokenizer.chat_template")


@pytest.mark.parametrize("quant", QUANTS)
def test_tensor_names_shapes_and_statistics(tiny_files, quant):
    reader = GGUFReader(tiny_files[quant])
    names = [t.name for t in reader.tensors]
    expected_names = ["token_embd.weight"] + [f"blk.{i}.{n}" for i in range(2) for n in TINY_LAYER_TENSORS] + [
        "output_norm.weight", "output.weight"]
    assert sorted(names) == sorted(expected_names)
    for tensor in reader.tensors:
        assert list(tensor.shape) == TINY_GGUF_SHAPES[tensor.name.split(".", 2)[-1] if tensor.name.startswith("blk.")
                                                      else tensor.name], tensor.name
    for name, w in _weights(reader).items():
        if name.endswith("norm.weight"):
            assert abs(w.mean() - 1.0) < 0.005 and abs(w.std() - 0.02) < 0.004, name
        else:  # >= 32768 values: the sample std is within ~1% of 0.02; quantization adds < 1%
            assert abs(w.mean()) < 0.001 and abs(w.std() - 0.02) < 0.0006, name


def test_q4_k_m_tensor_types_follow_the_recipe(tiny_files):
    types = {t.name: t.tensor_type for t in GGUFReader(tiny_files["q4_k_m"]).tensors}
    # 2 layers: use_more_bits(i, 2) holds for layer 1 only (i >= 7 * 2 // 8 == 1).
    assert types["blk.0.attn_v.weight"] == T.Q4_K and types["blk.0.ffn_down.weight"] == T.Q4_K
    assert types["blk.1.attn_v.weight"] == T.Q6_K and types["blk.1.ffn_down.weight"] == T.Q6_K
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    for i in range(2):
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{name}.weight"] == T.Q4_K
        assert types[f"blk.{i}.attn_norm.weight"] == T.F32 and types[f"blk.{i}.ffn_norm.weight"] == T.F32


@pytest.mark.parametrize("quant,bound", [("f16", 3e-4), ("q8_0", 0.006), ("q4_0", 0.095), ("q4_k_m", 0.080),
                                         ("q6_k", 0.020)])
def test_every_quant_holds_the_same_weights_for_a_seed(tiny_files, quant, bound):
    reference = _weights(GGUFReader(tiny_files["f32"]))
    for name, w in _weights(GGUFReader(tiny_files[quant])).items():
        err = np.sqrt(np.mean((w - reference[name]) ** 2) / np.mean(reference[name] ** 2))
        assert err <= bound, name


def test_seed_changes_the_weights(tmp_path):
    a = _weights(GGUFReader(write_synthetic_model("tiny", "f16", tmp_path / "a.gguf", seed=1, progress=False)))
    b = _weights(GGUFReader(write_synthetic_model("tiny", "f16", tmp_path / "b.gguf", seed=2, progress=False)))
    assert abs(np.corrcoef(a["blk.0.attn_q.weight"].ravel(), b["blk.0.attn_q.weight"].ravel())[0, 1]) < 0.02


def test_worker_pool_writes_the_same_bytes(tmp_path, tiny_files):
    path = write_synthetic_model("tiny", "q4_k_m", tmp_path / "pooled.gguf", progress=False, workers=2)
    assert path.read_bytes() == tiny_files["q4_k_m"].read_bytes()


def test_qwen2_biases_are_written(tmp_path):
    import dataclasses

    from replayllm.synth import write_model

    qwen2 = SHAPES["qwen2-7b"]
    shape = dataclasses.replace(qwen2, hidden_size=256, num_heads=4, num_kv_heads=2, ffn_size=512, num_layers=1,
                                vocab=dataclasses.replace(qwen2.vocab, num_regular_tokens=300), vocab_size=320)
    reader = GGUFReader(write_model(shape, "q8_0", tmp_path / "q.gguf", progress=False, workers=1))
    tensors = {t.name: t for t in reader.tensors}
    assert _field(reader, "general.architecture") == "qwen2"
    assert _field(reader, "qwen2.rope.freq_base") == pytest.approx(1e6)
    assert _field(reader, "tokenizer.ggml.pre") == "qwen2"
    for name, size in (("attn_q.bias", 256), ("attn_k.bias", 128), ("attn_v.bias", 128)):
        assert tensors[f"blk.0.{name}"].tensor_type == T.F32 and list(tensors[f"blk.0.{name}"].shape) == [size]
    assert list(tensors["token_embd.weight"].shape) == [256, 320]
    assert _field(reader, "tokenizer.ggml.tokens")[300:303] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"keep me")
    with pytest.raises(InvalidParameterError, match="already exists"):
        write_synthetic_model("tiny", "q8_0", path, progress=False)
    assert path.read_bytes() == b"keep me"
    write_synthetic_model("tiny", "q8_0", path, progress=False, overwrite=True)
    assert path.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_no_partial_file_is_left_on_error(tmp_path, monkeypatch, error):
    calls = []
    real = writer_module._make_chunk

    def failing(task):
        calls.append(task)
        if len(calls) == 5:
            raise error("stop")
        return real(task)

    monkeypatch.setattr(writer_module, "_make_chunk", failing)
    with pytest.raises(error):
        write_synthetic_model("tiny", "q4_k_m", tmp_path / "m.gguf", progress=False, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(InvalidParameterError) as info:
        write_synthetic_model("llama9-1t", "q8_0", tmp_path / "m.gguf")
    assert all(name in str(info.value) for name in SHAPES)
    with pytest.raises(InvalidParameterError, match="q4_k_m"):
        write_synthetic_model("tiny", "q4_k_xl", tmp_path / "m.gguf")
    with pytest.raises(InvalidParameterError, match="does not exist"):
        write_synthetic_model("tiny", "q8_0", tmp_path / "missing" / "m.gguf")
    with pytest.raises(InvalidParameterError, match="workers"):
        write_synthetic_model("tiny", "q8_0", tmp_path / "m.gguf", workers=0)
    with pytest.raises(InvalidParameterError, match="seed"):
        write_synthetic_model("tiny", "q8_0", tmp_path / "m.gguf", seed=-1)
    assert list(tmp_path.iterdir()) == []


def test_required_shapes_are_offered():
    assert {"tiny", "llama2-7b", "llama2-13b", "llama3-8b", "qwen2-7b"} <= set(SHAPES)
    assert TINY.arch == "llama" and TINY.num_layers == 2 and (TINY.num_heads, TINY.num_kv_heads) == (4, 2)


@pytest.mark.parametrize("quant", ["f16", "q4_k_m"])
def test_replayllm_reader_accepts_the_file(tiny_files, quant):
    rgguf = pytest.importorskip("replayllm.gguf")
    theirs = _weights(GGUFReader(tiny_files[quant]))
    with rgguf.read_gguf(tiny_files[quant]) as f:
        assert f.metadata["general.architecture"] == "llama"
        assert f.metadata["llama.block_count"] == 2
        assert f.metadata["tokenizer.ggml.tokens"][382] == "<|im_start|>"
        assert set(f.tensors) == set(theirs)
        for name, info in f.tensors.items():
            ours = rgguf.dequantize(info, f.tensor_data(name))
            np.testing.assert_array_equal(ours, theirs[name].reshape(ours.shape))


def test_a_file_that_appears_while_writing_is_not_clobbered(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    real = writer_module._make_chunk

    def racing(task):
        if not path.exists():
            path.write_bytes(b"someone else's")
        return real(task)

    monkeypatch.setattr(writer_module, "_make_chunk", racing)
    with pytest.raises(InvalidParameterError, match="appeared while writing"):
        write_synthetic_model("tiny", "q8_0", path, progress=False, workers=1)
    assert path.read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_file_systems_without_hard_links_still_get_the_file(tmp_path, monkeypatch, tiny_files):
    def no_links(src, dst):
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(writer_module.os, "link", no_links)
    path = write_synthetic_model("tiny", "q8_0", tmp_path / "m.gguf", progress=False, workers=1)
    assert path.read_bytes() == tiny_files["q8_0"].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("change,message", [
    ({"num_heads": 3}, "not a multiple of num_heads"), ({"num_kv_heads": 3}, "not a multiple of num_kv_heads"),
    ({"num_layers": 0}, "num_layers must be positive"), ({"vocab_size": 300}, "smaller than"),
    ({"arch": "gemma"}, "not supported"), ({"hidden_size": 4 * 66 + 4, "num_heads": 4}, "head_dim"),
])
def test_invalid_shapes_are_rejected(change, message):
    import dataclasses

    with pytest.raises(InvalidParameterError, match=message):
        dataclasses.replace(TINY, **change)


def test_io_errors_become_one_line_user_errors(tmp_path, monkeypatch):
    from replayllm.errors import ReplayLLMError

    def disk_full(task):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module, "_make_chunk", disk_full)
    with pytest.raises(ReplayLLMError, match="cannot write .*m.gguf: No space left on device"):
        write_synthetic_model("tiny", "q8_0", tmp_path / "m.gguf", progress=False, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_counts_bytes(tmp_path, capsys):
    path = write_synthetic_model("tiny", "q4_k_m", tmp_path / "m.gguf", progress=True, workers=1)
    err = capsys.readouterr().err
    assert "m.gguf" in err and "100%" in err
    assert path.stat().st_size > 1_000_000

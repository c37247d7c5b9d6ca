"""The public API on the CPU reference backend."""

from __future__ import annotations

import pytest
import torch

from replayllm import LLM, SamplingParams
from replayllm.errors import InvalidParameterError, PromptTooLongError, ReplayLLMError


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    llm = LLM(tiny_model_path, device="cpu", progress=False, max_context=64)
    yield llm
    llm.close()


def test_greedy_generation_is_deterministic_and_matches_logits_argmax(tiny):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    first = tiny.generate(["hello world"], params)[0]
    second = tiny.generate(["hello world"], params)[0]
    assert first.token_ids == second.token_ids and len(first.token_ids) == 6
    assert first.finish_reason == "length"
    # Each greedy token is the argmax of the full-sequence logits at the previous position.
    ids = first.prompt_token_ids + first.token_ids
    logits = tiny.logits(ids)
    assert logits.shape == (len(ids), tiny.config.vocab_size) and logits.dtype == torch.float32
    predicted = logits.argmax(-1)[len(first.prompt_token_ids) - 1:-1].tolist()
    assert predicted == first.token_ids


def test_same_seed_same_tokens_and_different_seed_differs(tiny):
    def run(seed):
        params = SamplingParams(max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                                ignore_eos=True)
        return tiny.generate(["abc"], params)[0].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stream_yields_the_same_text_as_generate(tiny):
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    streamed = "".join(tiny.stream("some text", params))
    assert streamed == tiny.generate(["some text"], params)[0].text
    assert tiny.last_output.token_ids == tiny.generate(["some text"], params)[0].token_ids


def test_token_id_prompts_and_stop_strings(tiny):
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    by_text = tiny.generate(["hello"], params)[0]
    by_ids = tiny.generate([by_text.prompt_token_ids], params)[0]
    assert by_ids.token_ids == by_text.token_ids
    if len(by_text.text) >= 3:  # stop on a piece of the known continuation: text is cut before it
        stop = by_text.text[1:3]
        cut = tiny.generate(["hello"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                                      stop=(stop,)))[0]
        assert cut.finish_reason == "stop" and stop not in cut.text
        assert by_text.text.startswith(cut.text)


def test_generation_stops_at_the_context_end_with_length(tiny):
    prompt = list(range(3, 3 + 60))
    out = tiny.generate([prompt], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 64 - 60 and out.finish_reason == "length"


def test_user_errors_are_clear(tiny, tmp_path):
    with pytest.raises(PromptTooLongError, match="context holds 64"):
        tiny.generate([list(range(3, 3 + 64))])
    with pytest.raises(InvalidParameterError, match="outside the vocabulary"):
        tiny.generate([[tiny.config.vocab_size]])
    with pytest.raises(InvalidParameterError, match="empty"):
        tiny.generate([[]])
    with pytest.raises(ReplayLLMError, match="no such file"):
        LLM(tmp_path / "missing.gguf", device="cpu")
    with pytest.raises(InvalidParameterError, match="device"):
        LLM(tmp_path / "missing.gguf", device="tpu")
    with pytest.raises(InvalidParameterError, match="max_context"):
        LLM(tiny.model_file.path, device="cpu", max_context=10**6, progress=False)
    for option in ({"pdl": "yes"}, {"int8_activations": None}, {"int8_activations": 1}, {"prefill_graphs": 0}):
        with pytest.raises(InvalidParameterError, match="must be True or False"):
            LLM(tiny.model_file.path, device="cpu", progress=False, **option)
    LLM(tiny.model_file.path, device="cpu", progress=False, pdl=False).close()  # off is fine anywhere
    LLM(tiny.model_file.path, device="cpu", progress=False, prefill_graphs=False).close()
    with pytest.raises(InvalidParameterError, match="prefill_graphs is a GPU option"):
        LLM(tiny.model_file.path, device="cpu", progress=False, prefill_graphs=True)
    for option, message in (({"activations": "fp8"}, "activations must be one of 16bit, int8, f32"),
                            ({"activations": "16bit"}, "GPU decode option"),
                            ({"activations": "f32", "int8_activations": True}, "is a GPU option")):
        with pytest.raises(InvalidParameterError, match=message):
            LLM(tiny.model_file.path, device="cpu", progress=False, **option)


@pytest.mark.parametrize("tokens", [100, 8, 16384, 0, -16, True, 512.0, "512"])
def test_a_prefill_chunk_must_be_a_power_of_two_from_16_to_8192(tiny, tokens):
    with pytest.raises(InvalidParameterError, match="prefill_chunk must be a power of two from 16 to 8192"):
        LLM(tiny.model_file.path, device="cpu", progress=False, prefill_chunk=tokens)


def test_a_valid_prefill_chunk_loads_anywhere(tiny):
    for tokens in (16, 512, 8192):  # the CPU reference prefills whole prompts: it has no chunk to set
        LLM(tiny.model_file.path, device="cpu", progress=False, max_context=64, prefill_chunk=tokens).close()


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france(default_model_path):
    with LLM(default_model_path, device="cpu", progress=False) as llm:
        out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0.0))[0]
        assert "Paris" in out.text
        chat = llm.generate([llm.chat_prompt_ids([{"role": "user", "content": "What is the capital of France?"}])],
                            SamplingParams(max_tokens=24, temperature=0.0))[0]
        assert "Paris" in chat.text and chat.finish_reason == "stop"


@pytest.mark.parametrize("kv_cache", ["int4", "", None, 8])
def test_a_kv_cache_type_must_be_f16_or_int8(tiny_model_path, kv_cache):
    with pytest.raises(InvalidParameterError, match="kv_cache must be one of f16, int8"):
        LLM(tiny_model_path, device="cpu", progress=False, kv_cache=kv_cache)


def test_the_int8_kv_reference_rounds_keys_and_values_and_nothing_else(tiny, tiny_model_path):
    """On the CPU, kv_cache="int8" is the reference of the int8 cache: its logits move by the cache's rounding
    (127 steps per row: ~1% of a value at most), neither zero nor more than a rounding's worth."""
    from replayllm.engine.llm import KV_CACHE_TYPES
    from replayllm.kernels.kv_cache import KV_CACHE_DTYPES

    assert tuple(KV_CACHE_DTYPES) == KV_CACHE_TYPES
    plain = tiny
    rounded = LLM(tiny_model_path, device="cpu", progress=False, max_context=64, kv_cache="int8")
    assert rounded.backend.name == "cpu-kv-int8" and plain.backend.name == "cpu"
    ids = [1, 17, 230, 5, 99, 42, 7, 3]
    expected, actual = plain.logits(ids), rounded.logits(ids)
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert 0 < error < 5e-2
    # the first position attends to itself alone: softmax of one score is 1 whatever k's rounding, so only
    # v's rounding reaches it
    assert not torch.equal(actual[0], expected[0])

"""The decode step for a batch of sequences (what a server's batch buckets replay), on the CPU under Triton's
interpreter: B sequences of different lengths in one step give each sequence's logits as a step of its own.

Every sequence's prompt is prefilled into its own pages; one batched step then decodes the next token of all
of them, and is compared with the same step run at batch size 1 per sequence (same kernels, so the only
difference is the batch: the CUDA-core GEMV keeps one activation row per program, so rows agree to f32
rounding of the other paths) and with the fp32 reference's logits for prompt + token.
"""

from __future__ import annotations

import pytest
import torch

from replayllm import LLM
from replayllm.runner.decode_step import RopeTables, StepBuffers, decode_step
from replayllm.runner.kv_cache import PagedKVCache
from replayllm.runner.prefill import Prefiller
from replayllm.runner.weights import load_device_weights

PROMPTS = [[1, 17, 230, 5, 99], [1, 42], [1, 7, 7, 8, 300, 12, 44, 2, 9, 10, 11, 120, 13, 14, 15, 16, 17]]
NEXT = [3, 250, 77]


@pytest.fixture(scope="module")
def setup(tiny_model_path):
    llm = LLM(tiny_model_path, device="cpu", progress=False, max_context=64)
    config, device = llm.config, torch.device("cpu")
    weights = load_device_weights(llm.model_file.gguf, config, device, progress=False)
    cos, sin = config.rope_tables(64)
    yield llm, config, weights, RopeTables(cos, sin)
    llm.close()


def _decode(config, weights, rope, batch: list[int]) -> torch.Tensor:
    """Prefill PROMPTS[i] for i in batch into one cache, then one decode step of NEXT[i] for all of them."""
    cache = PagedKVCache.allocate(config, 64, len(PROMPTS), torch.device("cpu"))
    bufs = StepBuffers.allocate(config, len(batch), cache.max_pages_per_seq, 64, torch.device("cpu"))
    prefiller = Prefiller(config, weights, cache, rope)
    for row, i in enumerate(batch):
        pages = cache.reserve(len(PROMPTS[i]) + 1)
        cache.fill_page_table_row(bufs.page_table, row, pages)
        prefiller.run(torch.tensor(PROMPTS[i]), bufs.page_table[row])
        bufs.positions[row] = len(PROMPTS[i])
        bufs.tokens[row] = NEXT[i]
    return decode_step(config, weights, cache, rope, bufs).clone()  # [B, vocab]


def test_a_batch_of_three_matches_each_sequence_alone_and_the_reference(setup):
    """Prompt 2 is 17 tokens: its pages cross a page boundary (16 tokens a page)."""
    llm, config, weights, rope = setup
    batched = _decode(config, weights, rope, [0, 1, 2])
    for row, i in enumerate([0, 1, 2]):
        alone = _decode(config, weights, rope, [i])[0]
        assert torch.allclose(batched[row], alone, rtol=1e-5, atol=1e-5), row
        expected = llm.logits(PROMPTS[i] + [NEXT[i]])[-1]
        error = ((batched[row] - expected).abs().max() / expected.abs().max()).item()
        assert error < 1e-2 and batched[row].argmax() == expected.argmax()



def test_an_int8_cache_holds_quants_and_a_scale_per_token_and_head(setup):
    config = setup[1]
    f16 = PagedKVCache.allocate(config, 64, 1, torch.device("cpu"))
    int8 = PagedKVCache.allocate(config, 64, 1, torch.device("cpu"), dtype="int8")
    assert (f16.dtype, int8.dtype) == ("f16", "int8")
    assert int8.k.dtype == int8.v.dtype == torch.int8 and int8.k.shape == f16.k.shape
    assert int8.k_scale.shape == int8.v_scale.shape == f16.k.shape[:-1] and int8.k_scale.dtype == torch.float32
    row = config.head_dim  # bytes a token and kv head: the quants, then the f32 scale
    assert int8.nbytes * 2 * row == f16.nbytes * (row + 4)
    assert f16.scales(0) == {} and int8.scales(1)["v_scale"].data_ptr() == int8.v_scale[1].data_ptr()
    from replayllm.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="KV cache type must be one of f16, int8"):
        PagedKVCache.allocate(config, 64, 1, torch.device("cpu"), dtype="fp8")

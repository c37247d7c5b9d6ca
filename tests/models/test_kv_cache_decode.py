"""KV-cached decoding gives the logits of one full forward; the forward rejects inputs it cannot serve."""

from __future__ import annotations

import pytest
import torch

from replayllm.errors import InvalidParameterError

TOKENS = [7, 33, 2, 81, 81, 19, 64, 5, 48, 11]

ARCHS = {
    "llama-gqa": dict(arch="llama", tied=False),
    "llama3-rope-freqs": dict(arch="llama", rope="llama3_tensor"),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3", head_dim=32),
}


@pytest.mark.parametrize("case", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize("prefill", [1, 4])
def test_prefill_then_one_token_at_a_time_matches_full_forward(case, prefill, tiny_model, tiny_spec, rel_err):
    model = tiny_model(tiny_spec(**case)).model
    with torch.no_grad():
        full = model(torch.tensor(TOKENS), 0, model.new_kv_cache(len(TOKENS)))
        cache = model.new_kv_cache(len(TOKENS) + 3)  # a roomier cache must not change anything
        steps = [model(torch.tensor(TOKENS[:prefill]), 0, cache)]
        for pos in range(prefill, len(TOKENS)):
            steps.append(model(torch.tensor([TOKENS[pos]]), pos, cache))
    assert rel_err(torch.cat(steps), full) < 1e-5


def test_chunked_prefill_matches_full_forward(tiny_model, tiny_spec, rel_err):
    model = tiny_model(tiny_spec(arch="qwen2")).model
    with torch.no_grad():
        full = model(torch.tensor(TOKENS), 0, model.new_kv_cache(len(TOKENS)))
        cache = model.new_kv_cache(len(TOKENS))
        chunks = [model(torch.tensor(TOKENS[a:b]), a, cache) for a, b in ((0, 3), (3, 7), (7, 10))]
    assert rel_err(torch.cat(chunks), full) < 1e-5


def test_decode_depends_on_the_cached_history(tiny_model, tiny_spec):
    """Control for the tests above: the same token after a different history gives different logits."""
    model = tiny_model(tiny_spec(arch="llama")).model
    with torch.no_grad():
        outs = []
        for history in ([1, 2, 3], [4, 5, 6]):
            cache = model.new_kv_cache(4)
            model(torch.tensor(history), 0, cache)
            outs.append(model(torch.tensor([9]), 3, cache))
    assert (outs[0] - outs[1]).abs().max() > 1e-2


def test_cache_shape(tiny_model, tiny_spec):
    tiny = tiny_model(tiny_spec(arch="qwen3", head_dim=32, num_kv_heads=2))
    cache = tiny.model.new_kv_cache(17)
    assert cache.max_tokens == 17
    assert cache.k.shape == cache.v.shape == (2, 2, 17, 32)
    assert cache.k.dtype == torch.float32 and cache.k.is_contiguous()


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_new_kv_cache_rejects_bad_sizes(bad, tiny_model, tiny_spec):
    model = tiny_model(tiny_spec()).model
    with pytest.raises(InvalidParameterError, match="max_tokens"):
        model.new_kv_cache(bad)


def test_forward_rejects_inputs_it_cannot_serve(tiny_model, tiny_spec):
    model = tiny_model(tiny_spec()).model
    cache = model.new_kv_cache(4)
    with pytest.raises(InvalidParameterError, match="exceed the KV cache of 4"):
        model(torch.tensor([1, 2, 3]), 2, cache)
    with pytest.raises(InvalidParameterError, match="token id 96 is outside the vocabulary"):
        model(torch.tensor([1, 96]), 0, cache)
    with pytest.raises(InvalidParameterError, match="token id -1"):
        model(torch.tensor([-1]), 0, cache)
    with pytest.raises(InvalidParameterError, match="start_pos"):
        model(torch.tensor([1]), -1, cache)
    with pytest.raises(InvalidParameterError, match="LongTensor"):
        model(torch.tensor([1.0]), 0, cache)
    with pytest.raises(InvalidParameterError, match="LongTensor"):
        model(torch.tensor([[1]]), 0, cache)
    other = tiny_model(tiny_spec(arch="qwen3", head_dim=32, seed=1)).model.new_kv_cache(4)
    with pytest.raises(ValueError, match="does not belong to this model"):
        model(torch.tensor([1]), 0, other)

"""The GPU backend's whole decode path (Triton kernels, paged KV cache, prefill, sampler) on the CPU, under
Triton's interpreter, against the plain-torch reference. Eager mode only: CUDA graphs need a GPU (the
gpu-marked tests in test_gpu_backend.py cover them).

Metric for logits: max |gpu - ref| / max |ref| over the logit matrix, < 1e-2 (f16 KV cache and f16 prefill
GEMMs), and the same argmax at every position. The interpreter is deterministic, so the greedy tokens of this
fixed model are compared exactly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from replayllm import LLM, SamplingParams
from replayllm.engine.gpu_backend import GPUBackend
from replayllm.engine.reference_backend import _dequantize_on_device
from replayllm.gguf import dequantize
from replayllm.synth import write_synthetic_model

LOGIT_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def tiny_q4_k_m(tmp_path_factory):
    return write_synthetic_model("tiny", "q4_k_m", tmp_path_factory.mktemp("tiny") / "tiny-q4_k_m.gguf",
                                 progress=False)


@pytest.fixture(scope="module")
def pair(tiny_q4_k_m):
    reference = LLM(tiny_q4_k_m, device="cpu", progress=False, max_context=64)
    backend = GPUBackend(reference.model_file, 64, mode="eager", progress=False, device=torch.device("cpu"))
    yield reference, backend
    backend.close()
    reference.close()


def test_the_model_mixes_k_quant_types(pair):
    reference, _ = pair
    types = {info.type_name for info in reference.model_file.gguf.tensors.values()}
    assert {"Q4_K", "Q6_K"} <= types


def test_prefill_logits_match_the_reference(pair):
    reference, backend = pair
    ids = [1, 17, 230, 5, 99, 42, 7]
    expected, actual = reference.logits(ids), backend.logits(ids)
    assert actual.shape == expected.shape == (len(ids), reference.config.vocab_size)
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error < LOGIT_TOLERANCE
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_eager_greedy_decode_matches_the_reference(pair):
    reference, backend = pair
    ids = [1, 17, 230, 5]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    expected = list(reference.backend.generate_ids(ids, params, 0, 3))
    assert list(backend.generate_ids(ids, params, 0, 3)) == expected


def test_graph_modes_need_a_cuda_device(pair):
    _, backend = pair
    from replayllm.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="CUDA"):
        backend.set_mode("graph")
    assert backend.mode.name == "eager"


def test_device_side_dequantization_equals_the_gguf_reference(pair):
    reference, _ = pair
    gguf_file = reference.model_file.gguf
    checked = 0
    for name, info in gguf_file.tensors.items():
        weight = _dequantize_on_device(info, gguf_file.tensor_data(name), torch.device("cpu"))
        if weight is None:
            continue
        expected = torch.from_numpy(dequantize(info, gguf_file.tensor_data(name)))
        assert torch.equal(weight, expected), name
        checked += 1
    assert checked >= 5


def test_chunked_prefill_gives_the_same_logits_and_tokens(pair):
    """Prompts longer than a chunk are prefilled chunk by chunk (bounded memory); later chunks attend to the
    earlier ones through the cache. Chunks of 8 over a 19-token prompt cross a KV page boundary (16 a page)."""
    reference, backend = pair
    ids = [1] + [(7 * i) % 380 + 2 for i in range(18)]
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    whole_logits, whole_tokens = backend.logits(ids), list(backend.generate_ids(ids, params, 0, 1))
    backend.prefill_chunk_tokens = 8
    try:
        chunked_logits, chunked_tokens = backend.logits(ids), list(backend.generate_ids(ids, params, 0, 1))
    finally:
        backend.prefill_chunk_tokens = 2048
    assert chunked_logits.shape == whole_logits.shape
    # Not bitwise: f16 GEMMs of 8 rows and of 19 accumulate in different orders. A wrong position, mask or page
    # moves logits by their own size.
    error = ((chunked_logits - whole_logits).abs().max() / whole_logits.abs().max()).item()
    assert error < 5e-3
    assert torch.equal(chunked_logits.argmax(-1), whole_logits.argmax(-1))
    assert chunked_tokens == whole_tokens == [int(reference.logits(ids)[-1].argmax())]


def test_a_padded_prefill_pass_equals_the_exact_one(pair):
    """What a prefill CUDA graph runs (runner/prefill_graph): a chunk of 7 tokens at positions 12..18 in a pass
    of 16 rows, span and last row on the device. Same last-row logits and cache slots as the exact 7-row pass
    from the same cache; the 9 padding rows write no slot (every other slot keeps its bytes)."""
    _, backend = pair
    ids = torch.tensor([1] + [(11 * i) % 380 + 2 for i in range(18)], dtype=torch.int64)
    prefiller, cache = backend.prefiller, backend.cache
    with backend.sequence(ids.shape[0]):
        page_table_row = backend.bufs.page_table[0]
        prefiller.run(ids[:12], page_table_row, start=0)
        before_k, before_v = cache.k.clone(), cache.v.clone()
        exact = prefiller.run(ids[12:], page_table_row, start=12)
        exact_k, exact_v = cache.k.clone(), cache.v.clone()
        cache.k.copy_(before_k)
        cache.v.copy_(before_v)
        padded_ids = torch.cat([ids[12:], torch.full((9,), 3, dtype=torch.int64)])
        span = torch.tensor([12, 7], dtype=torch.int32)
        padded = prefiller.run_padded(padded_ids, page_table_row, span, torch.tensor([6]))
        pages = [int(page_table_row[p // cache.page_size]) for p in range(12, 19)]
    assert padded.shape == exact.shape == (1, backend.config.vocab_size)
    # Each row's GEMM and attention sums run in the same order whatever the number of rows: near-bitwise.
    assert ((padded - exact).abs().max() / exact.abs().max()).item() < 1e-5
    written = torch.zeros(cache.k.shape[1], cache.page_size, dtype=torch.bool)
    for position, page in zip(range(12, 19), pages):
        written[page, position % cache.page_size] = True
    assert written.sum() == 7
    for got, want in ((cache.k, exact_k), (cache.v, exact_v)):
        got, want = got.transpose(2, 3)[:, written].float(), want.transpose(2, 3)[:, written].float()
        assert (got - want).abs().max().item() <= 2e-3 * want.abs().max().item()
    untouched = ~written
    for got, before in ((cache.k, before_k), (cache.v, before_v)):
        assert torch.equal(got.transpose(2, 3)[:, untouched], before.transpose(2, 3)[:, untouched])
    assert not torch.equal(before_k.transpose(2, 3)[:, written], exact_k.transpose(2, 3)[:, written])


def test_both_prefill_gemm_methods_give_the_same_logits(pair):
    """The per-shape choice between the quantized GEMM and dequantize + vendor GEMM must not change results
    beyond f32 summation order: force every shape to each method in turn."""
    from replayllm.runner.prefill_tuning import DEQUANT_GEMM, Choice, LinearMethods, shape_key

    _, backend = pair
    ids = [1, 40, 300, 7, 99, 12, 5]
    fused = backend.logits(ids)
    prefiller = backend.prefiller
    shapes = {shape_key(w) for w in prefiller.weights.matrices()}
    prefiller.methods = LinearMethods({key: [Choice(2048, DEQUANT_GEMM)] for key in shapes})
    try:
        dequant = backend.logits(ids)
    finally:
        prefiller.methods = LinearMethods()
        prefiller.scratch = None
    error = ((dequant - fused).abs().max() / fused.abs().max()).item()
    assert 0 < error < 1e-3  # not identical (different kernels), far closer than a wrong weight would be
    assert torch.equal(dequant.argmax(-1), fused.argmax(-1))


def test_an_f16_model_takes_the_vendor_gemm_on_its_own_weights(tmp_path):
    """F16 matrices need no dequantization: the vendor-GEMM method multiplies the stored weight directly."""
    from replayllm.runner.prefill_tuning import DEQUANT_GEMM, Choice, LinearMethods, shape_key

    path = write_synthetic_model("tiny", "f16", tmp_path / "tiny-f16.gguf", progress=False)
    reference = LLM(path, device="cpu", progress=False, max_context=32)
    backend = GPUBackend(reference.model_file, 32, mode="eager", progress=False, device=torch.device("cpu"))
    try:
        ids = [1, 40, 300, 7, 99]
        fused = backend.logits(ids)
        shapes = {shape_key(w) for w in backend.prefiller.weights.matrices()}
        backend.prefiller.methods = LinearMethods({key: [Choice(2048, DEQUANT_GEMM)] for key in shapes})
        vendor = backend.logits(ids)
        assert backend.prefiller.scratch is None  # no F16 weight was copied
        expected = reference.logits(ids)
        for got in (fused, vendor):
            assert ((got - expected).abs().max() / expected.abs().max()).item() < LOGIT_TOLERANCE
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
    finally:
        backend.close()
        reference.close()


def test_int8_activations_keep_greedy_decode_on_the_reference(pair, monkeypatch):
    """Experimental int8 activations for the Q4_K matrices: each greedy token is the reference's argmax or
    within 2e-2 of the logit scale of it (the int8 rounding of the activations, ~1e-3 of each product)."""
    from replayllm.bench.agreement import greedy_agreement
    from replayllm.runner import decode_step

    calls = []
    real = decode_step.quant_matvec_q8
    monkeypatch.setattr(decode_step, "quant_matvec_q8", lambda *a, **k: calls.append(1) or real(*a, **k))
    reference, backend = pair
    ids = [1, 17, 230, 5]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    backend.set_int8_activations(True)
    try:
        assert backend.name.endswith("-int8")
        tokens = list(backend.generate_ids(ids, params, 0, 3))
    finally:
        backend.set_int8_activations(False)
    assert not backend.name.endswith("-int8")
    assert len(calls) >= 2 * 2  # decode steps x layers with Q4_K projections took the int8 kernel
    agreement = greedy_agreement(reference.logits(ids + tokens), len(ids), tokens)
    assert agreement.is_within(2e-2), agreement


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


DECODE_IDS = [1, 17, 230, 5, 99, 42]  # 4 prompt tokens, 2 decode steps: the interpreter is slow


def test_decode_step_logits_match_the_reference(pair):
    """Teacher forcing through the decode step (decode_logits): every step's logits against the reference's row
    for that position, with the prefill's metric and tolerance, and the same argmax."""
    reference, backend = pair
    expected = reference.logits(DECODE_IDS)[4:]
    actual = backend.decode_logits(DECODE_IDS, 4)
    assert actual.shape == expected.shape == (len(DECODE_IDS) - 4, reference.config.vocab_size)
    assert _relative_error(actual, expected) < LOGIT_TOLERANCE
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_fused_attention_decode_steps_equal_the_separate_launches(pair):
    """The default decode step launches rope, attention and the splits' merge apart; the merge can go into the
    attention launch, and rope and the cache write too (both opt-in). Their decode-step logits are the separate
    launches', to f32 rounding (the same arithmetic, in another order)."""
    reference, backend = pair
    assert not backend.bufs.fused_attention_merge and not backend.bufs.rope_in_attention
    separate = backend.decode_logits(DECODE_IDS, 4)
    try:
        backend.set_fused_attention_merge(True)
        assert backend.name.endswith("-fused-merge")
        fused = backend.decode_logits(DECODE_IDS, 4)
        backend.set_rope_in_attention(True)
        assert backend.name.endswith("-fused-merge-rope-in-attention")
        one_launch = backend.decode_logits(DECODE_IDS, 4)
    finally:
        backend.set_fused_attention_merge(False)
        backend.set_rope_in_attention(False)
    assert _relative_error(fused, separate) < 1e-5
    assert _relative_error(one_launch, separate) < 1e-5
    assert _relative_error(separate, reference.logits(DECODE_IDS)[4:]) < LOGIT_TOLERANCE


def test_fma_attention_products_give_the_tensor_core_products_logits(pair, int8_kv_pair):
    """fma attention products (opt-in): the decode step's logits are the default products', with an f16 and with
    an int8 KV cache, and they refuse the attention options they have no form for. The two attentions agree to
    ~1e-7 (both kernels are tested against float64 at 1e-5), but the attention output is then quantized to 16
    bits for the output projection, and a value near a rounding boundary moves by a step: ~1e-4 in the logits
    (measured), against O(1) for a wrong product."""
    from replayllm.errors import InvalidParameterError

    for backend in (pair[1], int8_kv_pair[1]):
        default = backend.decode_logits(DECODE_IDS, 4)
        backend.set_fma_attention_products(True)
        try:
            assert backend.name.endswith("-fma-products")
            fma = backend.decode_logits(DECODE_IDS, 4)
            with pytest.raises(InvalidParameterError, match="does not combine with fma attention products"):
                backend.set_fused_attention_merge(True)
            assert not backend.bufs.fused_attention_merge
        finally:
            backend.set_fma_attention_products(False)
        assert _relative_error(fma, default) < 1e-3
        assert torch.equal(fma.argmax(-1), default.argmax(-1))
    backend = pair[1]
    backend.set_fused_attention_merge(True)
    try:
        with pytest.raises(InvalidParameterError, match="fused attention merge"):
            backend.set_fma_attention_products(True)
    finally:
        backend.set_fused_attention_merge(False)


def test_int8_decode_steps_err_by_the_int8_rounding_only(pair):
    """The int8 path's decode-step logits against the fp32 reference and against the int8 reference (the fp32
    reference with the int8 path's products): a wrong kernel errs by the order of the logits, the rounding by
    ~2e-2 on this model. The int8 path is no closer to the int8 reference than to fp32: upstream f16 differences
    flip the rounding of values near a half step, a difference of the rounding's own size, so both errors are
    bounded by twice the rounding's effect."""
    reference, backend = pair
    fp32 = reference.logits(DECODE_IDS)[4:]
    int8_reference = reference.backend.int8_reference_logits(DECODE_IDS, 4)[4:]
    backend.set_int8_activations(True)
    try:
        actual = backend.decode_logits(DECODE_IDS, 4)
    finally:
        backend.set_int8_activations(False)
    rounding = _relative_error(int8_reference, fp32)
    assert 1e-3 < rounding < 5e-2
    assert _relative_error(actual, int8_reference) < 2 * rounding
    assert _relative_error(actual, fp32) < 2 * rounding


@pytest.mark.parametrize("prompt_tokens", [0, len(DECODE_IDS)])
def test_decode_logits_needs_a_prompt_and_a_token_after_it(pair, prompt_tokens):
    from replayllm.errors import InvalidParameterError

    _, backend = pair
    with pytest.raises(InvalidParameterError, match="prompt_tokens"):
        backend.decode_logits(DECODE_IDS, prompt_tokens)


def test_programmatic_dependent_launch_is_refused_without_a_hopper_gpu(pair):
    from replayllm.errors import InvalidParameterError

    _, backend = pair
    with pytest.raises(InvalidParameterError, match="compute capability 9.0"):
        backend.set_pdl(True)
    assert not backend.bufs.pdl


def test_activation_forms_switch_and_each_keeps_greedy_on_the_reference(pair):
    """The default decode path takes 16-bit activations; "f32" and "int8" can be chosen, anything else is refused
    with the choices named. 16-bit and f32 both give the reference's greedy tokens here."""
    from replayllm.errors import InvalidParameterError

    reference, backend = pair
    ids = [1, 17, 230, 5]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    expected = list(reference.backend.generate_ids(ids, params, 0, 3))
    assert backend.bufs.activations == "16bit" and backend.name == "cuda-eager-16bit"
    with pytest.raises(InvalidParameterError, match="one of 16bit, int8, f32"):
        backend.set_activations("fp8")
    backend.set_activations("f32")
    try:
        assert backend.name == "cuda-eager-f32"
        assert list(backend.generate_ids(ids, params, 0, 3)) == expected
    finally:
        backend.set_activations("16bit")
    assert list(backend.generate_ids(ids, params, 0, 3)) == expected


def test_a_float_model_decodes_with_f32_activations_and_keeps_to_the_reference(tmp_path):
    """No matrix of an F16 model takes quantized inputs, so its decode step quantizes nothing: the default form
    is "f32" (and the name says so), and greedy decoding gives the reference's tokens."""
    path = write_synthetic_model("tiny", "f16", tmp_path / "tiny-f16.gguf", progress=False)
    reference = LLM(path, device="cpu", progress=False, max_context=32)
    backend = GPUBackend(reference.model_file, 32, mode="eager", progress=False, device=torch.device("cpu"))
    try:
        assert backend.bufs.activations == "f32" and backend.name == "cuda-eager-f32"
        ids = [1, 17, 230, 5]
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        assert list(backend.generate_ids(ids, params, 0, 3)) == list(reference.backend.generate_ids(ids, params, 0, 3))
        backend.set_int8_activations(False)  # "back to the default": f32 again, not 16-bit
        assert backend.bufs.activations == "f32"
    finally:
        backend.close()
        reference.close()


@pytest.fixture(scope="module")
def int8_kv_pair(tiny_q4_k_m):
    reference = LLM(tiny_q4_k_m, device="cpu", progress=False, max_context=64, kv_cache="int8")
    backend = GPUBackend(reference.model_file, 64, mode="eager", progress=False, device=torch.device("cpu"),
                         kv_cache="int8")
    yield reference, backend
    backend.close()
    reference.close()


@pytest.fixture(scope="module")
def q4_kv_pair(tiny_q4_k_m):
    reference = LLM(tiny_q4_k_m, device="cpu", progress=False, max_context=64, kv_cache="q4")
    backend = GPUBackend(reference.model_file, 64, mode="eager", progress=False, device=torch.device("cpu"),
                         kv_cache="q4")
    yield reference, backend
    backend.close()
    reference.close()


def test_the_q4_kv_cache_errs_by_its_rounding_only(q4_kv_pair, pair):
    """The q4 KV cache (4 bits, a scale per 32 dims) through prefill (rope_and_cache_write quantizing, prefill
    attention reading) and decode (its CUDA-core attention) against the reference that rounds keys and values the
    same way. Not within the f16 cache's tolerance: a value near a half step that upstream f16 differences round
    the other way moves by a whole step, 1/7 of its block's largest value (int8: 1/127), so on this model the
    rounding itself moves the logits ~1e-1 and the GPU path is ~5e-2 from its reference (the int8 cache: 7e-3 and
    4e-3). Bounded by 3/4 of the rounding's effect, and closer to its own reference than to the unrounded one: a
    scale misplaced or a half dropped errs by the order of the logits. Its attention has the fma products only,
    and says so."""
    from replayllm.errors import InvalidParameterError

    reference, backend = q4_kv_pair
    assert reference.backend.name == "cpu-kv-q4"
    assert backend.name.endswith("-kv-q4-fma-products") and backend.cache.k.dtype == torch.uint8
    ids = [1, 17, 230, 5, 99, 42, 7]
    fp32, expected = pair[0].logits(ids), reference.logits(ids)
    rounding = _relative_error(expected, fp32)
    assert 1e-2 < rounding < 0.5
    for actual in (backend.logits(ids), torch.cat([backend.logits(ids[:4]), backend.decode_logits(ids, 4)])):
        assert _relative_error(actual, expected) < 0.75 * rounding
        assert _relative_error(actual, expected) < 0.75 * _relative_error(actual, fp32)
    for setter, enabled, message in ((backend.set_fma_attention_products, False, "fma products only"),
                                     (backend.set_rope_in_attention, True, "this one is q4"),
                                     (backend.set_int8_attention_products, True, "need an int8 KV cache")):
        with pytest.raises(InvalidParameterError, match=message):
            setter(enabled)


def test_a_q4_kv_cache_needs_head_dim_a_multiple_of_64(tmp_path):
    from replayllm.errors import InvalidParameterError

    path = write_synthetic_model("tiny", "q8_0", tmp_path / "tiny.gguf", progress=False)
    with pytest.raises(InvalidParameterError, match="kv_cache must be one of"):
        LLM(path, device="cpu", progress=False, max_context=32, kv_cache="q3")
    reference = LLM(path, device="cpu", progress=False, max_context=32)
    try:
        config = dataclasses.replace(reference.model_file.config, head_dim=32, rope_dim=32)
        from replayllm.runner.kv_cache import PagedKVCache

        with pytest.raises(InvalidParameterError, match="head_dim a multiple of 64"):
            PagedKVCache.allocate(config, 32, 1, torch.device("cpu"), dtype="q4")
    finally:
        reference.close()


def test_the_int8_kv_cache_matches_its_reference(int8_kv_pair, pair):
    """The int8 KV cache through prefill (rope_and_cache_write quantizing, prefill attention reading) and decode
    (decode attention reading it) against the reference that rounds keys and values the same way: prefill
    logits within the tolerance with the same argmax, the same greedy tokens; and the rounding is there: its
    logits are not the f16 cache's."""
    reference, backend = int8_kv_pair
    assert backend.name.endswith("-kv-int8") and backend.cache.k.dtype == torch.int8
    ids = [1, 17, 230, 5, 99, 42, 7]
    expected, actual = reference.logits(ids), backend.logits(ids)
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error < LOGIT_TOLERANCE
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))
    assert not torch.equal(actual, pair[1].logits(ids))
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    expected_tokens = list(reference.backend.generate_ids(ids[:4], params, 0, 3))
    assert list(backend.generate_ids(ids[:4], params, 0, 3)) == expected_tokens
    from replayllm.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="int8"):
        backend.set_rope_in_attention(True)
    with pytest.raises(InvalidParameterError, match="need an int8 KV cache"):
        pair[1].set_int8_attention_products(True)
    backend.set_int8_attention_products(True)  # the attention's products on the quants themselves
    try:
        assert backend.name.endswith("-kv-int8-int8-products")
        assert list(backend.generate_ids(ids[:4], params, 0, 3)) == expected_tokens
        products = backend.decode_logits(ids, 4)
    finally:
        backend.set_int8_attention_products(False)
    assert _relative_error(products, backend.decode_logits(ids, 4)) < 1e-3

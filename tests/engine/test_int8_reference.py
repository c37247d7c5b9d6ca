"""The int8 reference (models/int8_reference.py): the fp32 reference with the int8 decode path's products, which
the int8-activation GEMVs are checked against at the model level."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from replayllm import LLM
from replayllm.kernels.int8_activations import quantize_activations_reference
from replayllm.kernels.quant_matvec_q8 import quant_matvec_q8_reference
from replayllm.models.int8_reference import Int8Products, storage_key
from replayllm.synth import write_synthetic_model

IDS = [1, 17, 230, 5, 99, 42, 7]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = write_synthetic_model("tiny", "q4_k_m", tmp_path_factory.mktemp("int8ref") / "tiny-q4_k_m.gguf",
                                 progress=False)
    with LLM(path, device="cpu", progress=False, max_context=64) as llm:
        yield llm.backend


def test_rows_before_first_row_are_the_plain_reference_and_later_rows_are_not(reference):
    plain = reference.logits(IDS)
    int8 = reference.int8_reference_logits(IDS, first_row=4)
    assert torch.equal(int8[:4], plain[:4])  # causal: rows before first_row never see a rounded product
    error = ((int8[4:] - plain[4:]).abs().max() / plain.abs().max()).item()
    # The rounding: 1/254 of each block's largest value at most, through 2 layers: above f32 noise, below 5%.
    assert 1e-4 < error < 5e-2


def test_every_projection_and_the_lm_head_take_the_int8_product(reference):
    reference.int8_reference_logits(IDS, 0)  # packs the weights
    mode = Int8Products(reference._int8_weights, first_row=0)
    with mode:
        reference.logits(IDS)
    assert mode.int8_products == reference.config.num_layers * 7 + 1  # q, k, v, output, gate, up, down; head


def test_a_product_is_the_int8_kernels_reference(reference):
    reference.int8_reference_logits(IDS, 0)  # packs the weights
    w = reference.model.blocks[0].mlp.gate  # [F, D], Q4_K in the file
    qw = reference._int8_weights[storage_key(w)]
    torch.manual_seed(0)
    x = torch.randn(3, w.shape[1])
    with Int8Products({storage_key(w): qw}, first_row=1) as mode:
        out = F.linear(x, w)
        head_style = x @ w.t()
    expected = quant_matvec_q8_reference(quantize_activations_reference(x[1:].contiguous()), qw).float()
    assert mode.int8_products == 2
    for got in (out, head_style):
        assert torch.equal(got[:1], F.linear(x[:1], w))
        torch.testing.assert_close(got[1:], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, F.linear(x[1:], w), rtol=1e-3, atol=1e-3)  # the rounding shows
    with Int8Products({storage_key(w): qw}) as mode:
        F.linear(x, torch.randn_like(w))  # not one of the given weights: untouched
    assert mode.int8_products == 0

"""Loading weights: the one-allocation arena that holds every matrix on a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from replayllm import LLM
from replayllm.runner import weights as weights_module
from replayllm.runner.weights import ARENA_ALIGN, _DeviceArena, arena_bytes, load_device_weights


def test_arena_places_aligned_copies_and_refuses_to_overflow():
    arena = _DeviceArena(3 * ARENA_ALIGN, torch.device("cpu"))
    a = arena.place(torch.arange(5, dtype=torch.int16))
    b = arena.place(torch.tensor([[1.5, -2.0]], dtype=torch.float32))
    assert torch.equal(a, torch.arange(5, dtype=torch.int16)) and b.tolist() == [[1.5, -2.0]]
    assert b.data_ptr() - arena.buffer.data_ptr() == ARENA_ALIGN  # the second field starts on the next boundary
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() == arena.buffer.data_ptr()
    with pytest.raises(RuntimeError, match="overflows"):
        arena.place(torch.zeros(ARENA_ALIGN + 1, dtype=torch.uint8))


@pytest.mark.parametrize("quant", ["q4_k_m", "q8_0"])
def test_every_matrix_fits_the_arena_bound_and_loads_equal(quant, tmp_path, monkeypatch):
    """Loading through an arena (forced on the CPU) gives the same weights as without, inside the bound."""
    from replayllm.synth import write_synthetic_model

    path = write_synthetic_model("tiny", quant, tmp_path / f"tiny-{quant}.gguf", progress=False)
    llm = LLM(path, device="cpu", progress=False, max_context=32)
    try:
        gguf, config = llm.model_file.gguf, llm.config
        plain = load_device_weights(gguf, config, torch.device("cpu"), progress=False)
        arenas = []

        class CPUArenaLoader(weights_module._Loader):
            def __init__(self, *args):
                super().__init__(*args)
                self.arena = _DeviceArena(arena_bytes(gguf), torch.device("cpu"))
                arenas.append(self.arena)

        monkeypatch.setattr(weights_module, "_Loader", CPUArenaLoader)
        placed = load_device_weights(gguf, config, torch.device("cpu"), progress=False)
    finally:
        llm.close()
    arena = arenas[0]
    matrices = list(placed.matrices())
    assert sum(w.nbytes for w in matrices) <= arena.used <= arena.buffer.numel()
    for a, b in zip(plain.matrices(), matrices, strict=True):
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y) and y.untyped_storage().data_ptr() == arena.buffer.data_ptr()
            else:
                assert x == y

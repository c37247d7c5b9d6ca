"""The GPU backend's prefill chunk: set by the caller, or chosen at load for the memory left (the choice's pure
parts here, and the backend on the CPU with the device's memory faked); the memory report names it."""

from __future__ import annotations

import pytest
import torch

from replayllm import LLM
from replayllm.engine import gpu_backend
from replayllm.engine.gpu_backend import (
    MIN_AUTO_PREFILL_CHUNK,
    PREFILL_CHUNK_TOKENS,
    PREFILL_HEADROOM_BYTES,
    GPUBackend,
    fitting_prefill_chunk,
    memory_left_bytes,
)
from replayllm.runner.prefill import prefill_peak_bytes

GIB = 2**30


def test_the_default_chunk_halves_until_its_pass_fits():
    def peak(tokens: int) -> int:
        return 1000 * tokens

    assert fitting_prefill_chunk(peak, 10**9) == PREFILL_CHUNK_TOKENS == 2048
    assert fitting_prefill_chunk(peak, 2048 * 1000) == 2048  # exactly enough
    assert fitting_prefill_chunk(peak, 2048 * 1000 - 1) == 1024
    assert fitting_prefill_chunk(peak, 600_000) == 512
    assert fitting_prefill_chunk(peak, 0) == fitting_prefill_chunk(peak, -GIB) == MIN_AUTO_PREFILL_CHUNK == 128


def test_memory_left_respects_a_per_process_cap(monkeypatch):
    asked = []  # the devices the torch functions were given: torch's fraction getter wants an index

    def answer(value):
        return lambda device: asked.append(device) or value

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", answer((10 * GIB, 12 * GIB)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", answer(1 * GIB))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", answer(0.5), raising=False)
    assert memory_left_bytes(torch.device("cuda")) == 5 * GIB  # half of 12 GiB, less the 1 GiB torch holds
    assert asked == [3, 3, 3]  # "cuda" is the current device
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", answer(7 * GIB))
    assert memory_left_bytes(cuda) == -1 * GIB  # already over the cap
    monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction")  # a torch without the getter: no cap
    assert memory_left_bytes(cuda) == 5 * GIB  # 12 - 7 GiB, below the driver's 10 GiB free
    monkeypatch.setattr(torch.cuda, "memory_reserved", answer(0))
    assert memory_left_bytes(cuda) == 10 * GIB  # the driver's free memory


@pytest.fixture(scope="module")
def tiny_file(tiny_model_path):
    llm = LLM(tiny_model_path, device="cpu", progress=False, max_context=64)
    yield llm.model_file
    llm.close()


def test_a_given_chunk_is_kept_and_reported(tiny_file):
    backend = GPUBackend(tiny_file, 64, mode="eager", progress=False, device=torch.device("cpu"), prefill_chunk=32)
    try:
        assert backend.prefill_chunk_tokens == 32
        peak = prefill_peak_bytes(tiny_file.config, 32, backend.cache.max_pages_per_seq)
        assert backend.memory.prefill_chunk_tokens == 32 and backend.memory.prefill_peak_bytes == peak
        assert "prefill chunk 32 tokens, ~0.00 GiB more at its peak" in str(backend.memory)
    finally:
        backend.close()


def test_short_of_memory_the_default_chunk_shrinks_and_says_so(tiny_file, monkeypatch, capsys):
    backend = GPUBackend(tiny_file, 64, mode="eager", progress=False, device=torch.device("cpu"))
    try:
        assert backend.prefill_chunk_tokens == PREFILL_CHUNK_TOKENS  # not a GPU: nothing to fit
        # On a GPU: what is left must hold the scratch and the rest of the load, then the pass.
        fixed = backend.prefiller.pending_scratch_bytes() + PREFILL_HEADROOM_BYTES
        assert backend.prefiller.pending_scratch_bytes() > 0
        peak = backend.prefiller.peak_bytes
        backend.is_cuda = True
        monkeypatch.setattr(gpu_backend, "memory_left_bytes", lambda device: fixed + peak(512) + 1)
        assert backend._default_prefill_chunk(progress=True) == 512
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "prefill chunk 512 tokens, not 2048" in err
        assert backend._default_prefill_chunk(progress=False) == 512 and capsys.readouterr().err == ""
        monkeypatch.setattr(gpu_backend, "memory_left_bytes", lambda device: fixed + peak(2048))
        assert backend._default_prefill_chunk(progress=True) == 2048 and capsys.readouterr().err == ""
    finally:
        backend.is_cuda = False
        backend.close()

"""Shared fixtures. GPU tests carry the `gpu` marker and are skipped where CUDA is absent.

Without a GPU, Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before anything imports
triton), so the kernels' logic and the GPU decode step are tested on the CPU at small shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def default_model_path():
    """The real default model (SmolLM2-135M-Instruct Q4_1), fetched into the cache on first use."""
    from replayllm.default_model import default_model_path as fetch
    from replayllm.errors import ModelDownloadError

    try:
        return fetch(progress=False)
    except ModelDownloadError:
        # The GPU machine has no network; its suite stages the file when it can. Everywhere else (CI) a
        # failed fetch is a failure.
        if os.environ.get("REPLAYLLM_GPU_SUITE"):
            pytest.skip("the default model is not staged on this offline GPU machine")
        raise


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny synthetic llama model (gpt2 vocab, ChatML) in Q8_0, written once per session."""
    from replayllm.synth import write_synthetic_model

    return write_synthetic_model("tiny", "q8_0", tmp_path_factory.mktemp("tiny") / "tiny-q8_0.gguf",
                                 progress=False)

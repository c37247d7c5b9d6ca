"""A batch bucket's decode step captured as a CUDA graph and replayed (gpu marker): the same logits and tokens as
the step launched eagerly, for three sequences of different lengths in a bucket of four (one padding row whose
page-table row points at a page no sequence owns)."""

from __future__ import annotations

import pytest
import torch

from replayllm import LLM
from replayllm.runner.decode_step import RopeTables, StepBuffers, decode_step
from replayllm.runner.graph import DecodeGraph
from replayllm.runner.kv_cache import PagedKVCache
from replayllm.runner.prefill import Prefiller
from replayllm.runner.weights import load_device_weights
from replayllm.sampling import SamplerState, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = [[1, 17, 230, 5, 99], [1, 42], [1, 7, 7, 8, 300, 12, 44, 2, 9, 10, 11, 120, 13, 14, 15, 16, 17]]
BUCKET = 4
STEPS = 6


def _run(tiny_model_path, use_graph: bool) -> tuple[list[torch.Tensor], list[list[int]]]:
    llm = LLM(tiny_model_path, device="cpu", progress=False, max_context=64)
    config, device = llm.config, torch.device("cuda")
    weights = load_device_weights(llm.model_file.gguf, config, device, progress=False)
    cos, sin = config.rope_tables(64)
    rope = RopeTables(cos.to(device), sin.to(device))
    cache = PagedKVCache.allocate(config, 64, BUCKET + 1, device)
    bufs = StepBuffers.allocate(config, BUCKET, cache.max_pages_per_seq, 64, device)
    sampler = SamplerState.create(BUCKET, config.vocab_size, device)
    prefiller = Prefiller(config, weights, cache, rope)
    spare = cache.reserve(1)[0]  # the padding row's page: owned by no sequence
    bufs.page_table[len(PROMPTS):] = spare

    def step(b):
        return decode_step(config, weights, cache, rope, b)

    graph = DecodeGraph(step, bufs, sampler, greedy_only=True) if use_graph else None
    if graph is not None:
        graph.capture()  # before any sequence owns pages: the warm-up writes at position 0 of the tables
    first = []
    for row, prompt in enumerate(PROMPTS):
        pages = cache.reserve(len(prompt) + STEPS + 1)
        table = torch.full((cache.max_pages_per_seq,), spare, dtype=torch.int32)
        table[: len(pages)] = torch.tensor(pages, dtype=torch.int32)
        bufs.page_table[row] = table.to(device)
        logits = prefiller.run(torch.tensor(prompt, device=device), bufs.page_table[row])
        first.append(int(logits.argmax()))
        sampler.set_row(row, SamplingParams(temperature=0.0), 0, prompt)
    bufs.positions.copy_(torch.tensor([len(p) for p in PROMPTS] + [0], dtype=torch.int32))
    bufs.tokens.copy_(torch.tensor(first + [0]))
    tokens, logits_seen = [list(first)], []
    for _ in range(STEPS):
        if graph is not None:
            graph.replay()
            logits_seen.append(bufs.logits.clone())
            tokens.append(graph.out_tokens[0, : len(PROMPTS)].tolist())
        else:
            logits = step(bufs)
            logits_seen.append(logits.clone())
            nxt = logits.argmax(dim=-1)
            tokens.append(nxt[: len(PROMPTS)].tolist())
            bufs.tokens.copy_(nxt)
            bufs.positions.add_(1)
    llm.close()
    return logits_seen, tokens


def test_replayed_batch_step_equals_the_eager_one(tiny_model_path):
    eager_logits, eager_tokens = _run(tiny_model_path, use_graph=False)
    graph_logits, graph_tokens = _run(tiny_model_path, use_graph=True)
    assert graph_tokens == eager_tokens
    for a, b in zip(graph_logits, eager_logits):
        assert torch.equal(a[: len(PROMPTS)], b[: len(PROMPTS)])

"""Greedy sampling at the end of a decode step, in one launch: the penalised logits' argmax, then what follows it
in the step's graph.

For each batch row: the argmax of the logits after the repetition, frequency and presence penalties (lowest id
on ties: exactly what sampling.sample_greedy returns), then the row's bookkeeping, as SamplerState.record and the
graph do it: the token pushed into the row's penalty window and counts, the draw counter advanced, the token fed
back as the next step's input and written to the step's output slot, and the row's position advanced.

In torch that is ~25 small launches (~45 us a token on an H100, ~2% of a 7B step). Here the grid is
(B, NUM_PARTS): each program reduces BLOCK_V logits to their (max, first id) and stores the pair; the last
program of a row to finish (a fence in every thread, the block's barrier, an acquire-release counter, as in
decode_attention's fused merge) reduces the row's pairs and does its bookkeeping, then resets the counter.

The penalties are rounded as torch rounds them (each product, quotient and difference on its own: `.rn`
instructions, which the compiler may not fuse into an FMA), so the argmax is the torch path's, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._last_program import _count_in
from ._tensor_checks import check_same_device, check_tensor, next_power_of_2, under_interpreter
from .pdl import _pdl_wait, launch_options

BLOCK_V = 2048  # logits a program: 16 programs a row for a 32k vocabulary


@triton.jit
def _rounded(op: tl.constexpr, a, b, EXACT: tl.constexpr):
    """a op b in f32, rounded once as on its own (no FMA contraction); plain arithmetic under the interpreter."""
    if EXACT:
        if op == "mul":
            return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                             is_pure=True, pack=1)
        elif op == "sub":
            return tl.inline_asm_elementwise("sub.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.math.div_rn(a, b)
    else:
        if op == "mul":
            return a * b
        elif op == "sub":
            return a - b
        else:
            return a / b


@triton.jit
def _greedy_sample_kernel(
        logits_ptr, counts_ptr, repetition_ptr, frequency_ptr, presence_ptr, last_n_ptr, window_ptr,
        window_count_ptr, step_ptr, tokens_ptr, out_ptr, positions_ptr, part_max_ptr, part_id_ptr, counter_ptr,
        vocab, logits_stride, counts_stride, window_stride,
        NUM_PARTS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr, EXACT: tl.constexpr,
        USE_PDL: tl.constexpr):
    _pdl_wait(USE_PDL)
    # logits, counts [B, V] f32; the penalties [B] f32; last_n, window_count, step [B] int64; window [B, W] int64;
    # tokens, out [B] int64; positions [B] int32; part_max [B, NUM_PARTS] f32, part_id [B, NUM_PARTS] int32;
    # counter [B] int32, zero between launches. grid (B, NUM_PARTS)
    row = tl.program_id(0)
    r = row.to(tl.int64)
    ids = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = ids < vocab
    logits = tl.load(logits_ptr + r * logits_stride + ids, mask=ok, other=0.0)
    counts = tl.load(counts_ptr + r * counts_stride + ids, mask=ok, other=0.0)
    repetition = tl.load(repetition_ptr + row)
    # sampling.apply_penalties, operation by operation
    repetition = tl.zeros([BLOCK_V], tl.float32) + repetition
    penalised = tl.where(logits > 0, _rounded("div", logits, repetition, EXACT),
                         _rounded("mul", logits, repetition, EXACT))
    zeros = tl.zeros([BLOCK_V], tl.float32)  # the row's scalars at the tile's shape (exact: 0 + v = v)
    penalised = _rounded("sub", penalised, _rounded("mul", counts, zeros + tl.load(frequency_ptr + row), EXACT),
                         EXACT)
    penalised = _rounded("sub", penalised, zeros + tl.load(presence_ptr + row), EXACT)
    x = tl.where(ok, tl.where(counts > 0, penalised, logits), float("-inf"))
    best = tl.max(x, axis=0)
    first = tl.min(tl.where(ok & (x == best), ids, vocab), axis=0)
    part = r * NUM_PARTS + tl.program_id(1)
    tl.store(part_max_ptr + part, best)
    tl.store(part_id_ptr + part, first)
    if _count_in(counter_ptr + row, NUM_PARTS, first, EXACT):
        tl.store(counter_ptr + row, 0)
        parts = tl.arange(0, BLOCK_P)
        in_row = parts < NUM_PARTS
        part_max = tl.load(part_max_ptr + r * NUM_PARTS + parts, mask=in_row, other=float("-inf"),
                           cache_modifier=".cg")
        part_id = tl.load(part_id_ptr + r * NUM_PARTS + parts, mask=in_row, other=vocab, cache_modifier=".cg")
        top = tl.max(part_max, axis=0)
        # parts cover ascending ids, so the lowest id among the parts holding the max is the row's first max;
        # clamped: a NaN logit matches nothing, and the id must stay a valid index
        token = tl.minimum(tl.min(tl.where(in_row & (part_max == top), part_id, vocab), axis=0), vocab - 1)
        token = token.to(tl.int64)
        # SamplerState.record: evict the token leaving a full ring, push the new one, count it
        last_n = tl.load(last_n_ptr + row)
        count = tl.load(window_count_ptr + row)
        slot = count % tl.where(last_n > 0, last_n, 1)  # rows without a ring write slot 0 harmlessly
        window_row = window_ptr + r * window_stride
        leaving = tl.load(window_row + slot)
        evicted = tl.where((last_n > 0) & (count >= last_n), 1.0, 0.0)
        added = tl.where(last_n != 0, 1.0, 0.0)
        counts_row = counts_ptr + r * counts_stride
        leaving_count = tl.load(counts_row + leaving)
        token_count = tl.load(counts_row + token)
        same = leaving == token  # then both stores write the one count, evicted and added in record's order
        tl.store(counts_row + leaving, tl.where(same, leaving_count - evicted + added, leaving_count - evicted))
        tl.store(counts_row + token, tl.where(same, token_count - evicted + added, token_count + added))
        tl.store(window_row + slot, token)
        tl.store(window_count_ptr + row, count + 1)
        tl.store(step_ptr + row, tl.load(step_ptr + row) + 1)
        tl.store(tokens_ptr + row, token)
        tl.store(out_ptr + row, token)
        tl.store(positions_ptr + row, tl.load(positions_ptr + row) + 1)


@dataclass(frozen=True)
class GreedySampleWorkspace:
    """Each program's (max, first id) and each row's counter (zero between launches), allocated once."""

    part_max: torch.Tensor  # [B, NUM_PARTS] f32
    part_id: torch.Tensor  # [B, NUM_PARTS] int32
    counters: torch.Tensor  # [B] int32

    @classmethod
    def create(cls, batch: int, vocab_size: int, device: torch.device | str) -> GreedySampleWorkspace:
        parts = triton.cdiv(vocab_size, BLOCK_V)
        return cls(part_max=torch.empty(batch, parts, dtype=torch.float32, device=device),
                   part_id=torch.empty(batch, parts, dtype=torch.int32, device=device),
                   counters=torch.zeros(batch, dtype=torch.int32, device=device))


def greedy_sample_step(logits: torch.Tensor, token_counts: torch.Tensor, repetition_penalty: torch.Tensor,
                       frequency_penalty: torch.Tensor, presence_penalty: torch.Tensor, penalty_last_n: torch.Tensor,
                       window: torch.Tensor, window_count: torch.Tensor, step: torch.Tensor, tokens: torch.Tensor,
                       out_tokens: torch.Tensor, positions: torch.Tensor, workspace: GreedySampleWorkspace, *,
                       pdl: bool = False) -> None:
    """For every row b of logits [B, V] f32: token = the argmax of the penalised logits (sample_greedy's), pushed
    into the row's penalty window (window [B, W] int64, window_count [B] int64, token_counts [B, V] f32, as
    SamplerState.record), step[b] += 1, tokens[b] = out_tokens[b] = token (both [B] int64), positions[b] += 1
    ([B] int32). The penalties are [B] f32, penalty_last_n [B] int64. One launch; graph-capturable."""
    check_tensor("logits", logits, torch.float32, (None, None), layout="rows")
    batch, vocab = logits.shape
    check_tensor("token_counts", token_counts, torch.float32, (batch, vocab), layout="rows")
    for name, t, dtype in (("repetition_penalty", repetition_penalty, torch.float32),
                           ("frequency_penalty", frequency_penalty, torch.float32),
                           ("presence_penalty", presence_penalty, torch.float32),
                           ("penalty_last_n", penalty_last_n, torch.int64), ("window_count", window_count, torch.int64),
                           ("step", step, torch.int64), ("tokens", tokens, torch.int64),
                           ("out_tokens", out_tokens, torch.int64), ("positions", positions, torch.int32)):
        check_tensor(name, t, dtype, (batch,))
    check_tensor("window", window, torch.int64, (batch, None), layout="rows")
    num_parts = triton.cdiv(vocab, BLOCK_V)
    if tuple(workspace.part_max.shape) != (batch, num_parts) or workspace.counters.shape[0] != batch:
        raise ValueError(f"workspace made for {list(workspace.part_max.shape)} (rows, parts) does not fit logits "
                         f"{list(logits.shape)}; create it with batch {batch} and vocab_size {vocab}")
    check_same_device(logits=logits, token_counts=token_counts, window=window, tokens=tokens, positions=positions,
                      workspace=workspace.part_max)
    _greedy_sample_kernel[(batch, num_parts)](
        logits, token_counts, repetition_penalty, frequency_penalty, presence_penalty, penalty_last_n, window,
        window_count, step, tokens, out_tokens, positions, workspace.part_max, workspace.part_id,
        workspace.counters, vocab, logits.stride(0), token_counts.stride(0), window.stride(0),
        NUM_PARTS=num_parts, BLOCK_V=BLOCK_V, BLOCK_P=max(2, next_power_of_2(num_parts)),
        EXACT=not under_interpreter(), num_warps=4, **launch_options(pdl))

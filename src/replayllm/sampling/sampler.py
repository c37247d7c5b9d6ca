"""The batched sampler: penalties, top-k, top-p, min-p, temperature and the draw, with no host synchronisation.

`sample` is made only of torch ops whose output shapes depend on the batch and vocabulary sizes, never on data,
and reads every per-request setting from `SamplerState`'s device tensors. It never calls `.item()`, `.tolist()`
or `.cpu()`, never indexes with a boolean mask and never uses a `torch.Generator`. So the same code runs on the
CPU (reference backend) and inside a captured CUDA graph, where one graph serves any mix of settings across rows.

Semantics follow llama.cpp's default sampler chain:
- penalties: for each token id t seen c > 0 times in the row's penalty window,
  logit /= repetition_penalty if logit > 0 else logit *= repetition_penalty; then
  logit -= c * frequency_penalty + presence_penalty.
- the candidates are ranked by (penalised logit descending, token id ascending); top-k keeps the first k;
  top-p keeps the shortest prefix whose probability (softmax at temperature 1 over the top-k candidates)
  reaches top_p; min-p keeps the tokens whose probability is >= min_p times the largest;
- the survivors are softmaxed at the row's temperature and one is drawn by inverse CDF with a counter-based
  uniform (see rng.py). Temperature 0 rows take the argmax (lowest id on ties) instead.

Cost: one sort of the whole vocabulary per row per token, two row scans (see `row_cumsum`) and ~100 small
kernels (35 of them the RNG). On an H100 in a replayed graph, sample + record took 0.24 ms at B=1 (V=49k or 128k)
and 0.45 ms at B=8, V=128k; the sort is 0.05-0.14 ms of that, the rest mostly launch-bound small kernels.
Cheaper options, not needed yet: one fused Triton kernel for the elementwise chain and the RNG; `topk` with a
static bound when every row has a small top-k; a pivot (rejection) search for the top-p / min-p threshold with
no sort (as FlashInfer does); and, for rows with every filter off, an exponential race (argmax of p_i / E_i)
that needs no sort at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InvalidParameterError
from .params import MAX_PENALTY_WINDOW, MAX_SEED, SamplingParams
from .rng import MASK32, counter_uniform


@dataclass(frozen=True, eq=False)
class SamplerState:
    """Per-row sampling settings and penalty windows for B rows, all on one device, allocated once.

    Frozen: the tensors are updated in place and never replaced, because a captured CUDA graph holds their
    addresses. A row that was never `set_row` is greedy with penalties off, so padding rows of a batch bucket
    are harmless.
    """

    batch_size: int
    vocab_size: int
    max_penalty_window: int
    temperature: torch.Tensor  # [B] f32, 0 = greedy
    top_k: torch.Tensor  # [B] int64 in [1, V] (V when top-k is off)
    top_p: torch.Tensor  # [B] f32 in (0, 1]
    min_p: torch.Tensor  # [B] f32 in [0, 1]
    repetition_penalty: torch.Tensor  # [B] f32
    presence_penalty: torch.Tensor  # [B] f32
    frequency_penalty: torch.Tensor  # [B] f32
    penalty_last_n: torch.Tensor  # [B] int64: 0 off, -1 every token, n > 0 the last n tokens
    window: torch.Tensor  # [B, W] int64 ring buffer; the i-th token pushed into a row lies at slot i % n
    window_count: torch.Tensor  # [B] int64: tokens pushed into the row's window since set_row
    token_counts: torch.Tensor  # [B, V] f32: occurrences of each id in the window (exact integers < 2**24)
    seed_lo: torch.Tensor  # [B] int64: seed & 0xFFFFFFFF
    seed_hi: torch.Tensor  # [B] int64: seed >> 32
    step: torch.Tensor  # [B] int64: draws made since set_row; the RNG counter

    @classmethod
    def create(cls, batch_size: int, vocab_size: int, device: torch.device | str,
               max_penalty_window: int = MAX_PENALTY_WINDOW) -> SamplerState:
        if batch_size < 1 or vocab_size < 1 or max_penalty_window < 1:
            raise ValueError(f"batch_size, vocab_size and max_penalty_window must be >= 1, "
                             f"got {batch_size}, {vocab_size}, {max_penalty_window}")
        B = batch_size

        def f32(value: float) -> torch.Tensor:
            return torch.full((B,), value, dtype=torch.float32, device=device)

        def i64(value: int, *shape: int) -> torch.Tensor:
            return torch.full((B, *shape), value, dtype=torch.int64, device=device)

        return cls(
            batch_size=B, vocab_size=vocab_size, max_penalty_window=max_penalty_window,
            temperature=f32(0.0), top_k=i64(vocab_size), top_p=f32(1.0), min_p=f32(0.0),
            repetition_penalty=f32(1.0), presence_penalty=f32(0.0), frequency_penalty=f32(0.0),
            penalty_last_n=i64(0), window=i64(0, max_penalty_window), window_count=i64(0),
            token_counts=torch.zeros(B, vocab_size, dtype=torch.float32, device=device),
            seed_lo=i64(0), seed_hi=i64(0), step=i64(0),
        )

    @property
    def device(self) -> torch.device:
        return self.temperature.device

    def set_row(self, row: int, params: SamplingParams, seed: int, history: list[int]) -> None:
        """Host side, once at the start of a request: load `params` and `seed` into `row`, reset its step
        counter, and fill its penalty window with `history` (the prompt's token ids)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if not 0 <= row < self.batch_size:
            raise ValueError(f"row {row} is outside the batch of {self.batch_size}")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED:
            raise InvalidParameterError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        n = params.penalty_last_n
        if n > self.max_penalty_window:
            raise InvalidParameterError(
                f"penalty_last_n={n} is longer than this sampler's window of {self.max_penalty_window} tokens; "
                f"use at most {self.max_penalty_window}, or -1 for the whole context")
        tokens = self._checked_history(history)
        top_k = params.top_k if 0 < params.top_k < self.vocab_size else self.vocab_size
        for name, value in (("temperature", params.temperature), ("top_k", top_k), ("top_p", params.top_p),
                            ("min_p", params.min_p), ("repetition_penalty", params.repetition_penalty),
                            ("presence_penalty", params.presence_penalty),
                            ("frequency_penalty", params.frequency_penalty), ("penalty_last_n", n),
                            ("seed_lo", seed & MASK32), ("seed_hi", seed >> 32), ("step", 0)):
            getattr(self, name)[row] = value  # a scalar fill on the device, no host round trip
        self._fill_window(row, n, tokens)

    def _fill_window(self, row: int, n: int, tokens: np.ndarray) -> None:
        """Load the last n of `tokens` (all for n == -1, none for n == 0) into `row`'s ring and counts."""
        tail = tokens if n == -1 else tokens[max(len(tokens) - n, 0):] if n > 0 else tokens[:0]
        # The oldest token goes to slot 0, so the next push (slot len(tail) % n) overwrites the oldest.
        # A row with n == -1 counts every token and keeps no ring.
        ring = tail if n > 0 else tail[:0]
        self.window[row].zero_()
        self.window[row, :len(ring)] = torch.from_numpy(ring).to(self.device)
        self.window_count[row] = len(tail)
        counts = np.bincount(tail, minlength=self.vocab_size).astype(np.float32)
        self.token_counts[row] = torch.from_numpy(counts).to(self.device)

    def _checked_history(self, history: list[int]) -> np.ndarray:
        tokens = np.asarray(history, dtype=np.int64).reshape(-1)
        bad = np.flatnonzero((tokens < 0) | (tokens >= self.vocab_size))
        if bad.size:
            i = int(bad[0])
            raise InvalidParameterError(f"token id {int(tokens[i])} at position {i} of the history is outside "
                                        f"the vocabulary [0, {self.vocab_size})")
        return tokens

    def record(self, tokens: torch.Tensor) -> None:
        """Device side, after every draw: push tokens [B] int64 into the penalty windows, advance the step.

        The tokens must be valid ids (they come from `sample`); nothing here reads them on the host.
        """
        _check_tensor("tokens", tokens, (self.batch_size,), torch.int64, self.device)
        n = self.penalty_last_n  # [B]
        ring_size = torch.where(n > 0, n, 1)  # [B]; rows without a ring write slot 0 harmlessly
        slot = (self.window_count % ring_size).unsqueeze(1)  # [B, 1]
        leaving = self.window.gather(1, slot)  # [B, 1]: the oldest token, once the ring is full
        evict = ((n > 0) & (self.window_count >= n)).to(torch.float32).unsqueeze(1)  # [B, 1]
        self.token_counts.scatter_add_(1, leaving, -evict)
        self.window.scatter_(1, slot, tokens.unsqueeze(1))
        self.token_counts.scatter_add_(1, tokens.unsqueeze(1), (n != 0).to(torch.float32).unsqueeze(1))
        self.window_count.add_(1)
        self.step.add_(1)

    def window_tokens(self, row: int) -> list[int]:
        """The ids in `row`'s penalty window, oldest first (reads the device: for tests and debugging only;
        for penalty_last_n == -1 there is no ring and this returns [])."""
        n, count = int(self.penalty_last_n[row]), int(self.window_count[row])
        if n <= 0:
            return []
        ring = self.window[row, :n].tolist()
        if count < n:
            return ring[:count]
        start = count % n
        return ring[start:] + ring[:start]


def sample(logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
    """logits [B, V] float32 -> tokens [B] int64, one per row, per the row's settings in `state`.

    Draws with the row's (seed, step) uniform; call `state.record(tokens)` afterwards to advance the step and
    the penalty window. Never synchronises with the host.
    """
    _check_tensor("logits", logits, (state.batch_size, state.vocab_size), torch.float32, state.device)
    logits = apply_penalties(logits, state)  # [B, V]
    # A stable descending sort ranks equal logits by ascending id, so ties resolve to the lowest id everywhere.
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True, stable=True)  # [B, V] each
    # Shifted by the row's maximum (position 0), so exp never overflows and needs no max reduction.
    shifted = sorted_logits - sorted_logits[:, :1]  # [B, V], <= 0
    kept = _kept_prefix(shifted, state)  # [B, V] bool, a prefix of every row
    greedy = state.temperature == 0.0  # [B]
    temperature = torch.where(greedy, 1.0, state.temperature).unsqueeze(1)  # [B, 1]
    # Unnormalised probabilities at the row's temperature; the draw scales the uniform by their total instead.
    cdf = row_cumsum(torch.where(kept, (shifted / temperature).exp(), 0.0))  # [B, V]
    u = counter_uniform(state.seed_lo, state.seed_hi, state.step)  # [B]
    target = (u * cdf[:, -1]).unsqueeze(1)  # [B, 1]
    # Inverse CDF: the first position whose cdf exceeds the target. Zero-probability positions never win; the
    # clamp covers a target that rounding pushed up to the total.
    position = (cdf <= target).sum(dim=-1)  # [B]
    position = torch.minimum(position, kept.sum(dim=-1) - 1)  # [B]
    position = torch.where(greedy, 0, position).unsqueeze(1)  # [B, 1]
    return sorted_ids.gather(1, position).squeeze(1)  # [B]


def sample_greedy(logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
    """`sample` for batches whose rows are all greedy (temperature 0): the argmax of the penalised logits,
    lowest id on ties, exactly what `sample` returns for such rows, without the sort and the scans (about 0.2 ms
    a token on a 32k vocabulary). The caller guarantees every row is greedy; logits [B, V] -> tokens [B]."""
    _check_tensor("logits", logits, (state.batch_size, state.vocab_size), torch.float32, state.device)
    return apply_penalties(logits, state).argmax(dim=-1)  # torch returns the first maximal index


def sampler_for(all_greedy: bool):
    """`sample_greedy` for a batch the host knows to be all greedy, else `sample`: the one place that picks."""
    return sample_greedy if all_greedy else sample


def apply_penalties(logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
    """Repetition, frequency and presence penalties (llama.cpp semantics, see the module docstring).
    logits [B, V] f32 -> [B, V] f32, a new tensor."""
    counts = state.token_counts  # [B, V]
    repetition = state.repetition_penalty.unsqueeze(1)  # [B, 1]
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    penalised = (penalised - counts * state.frequency_penalty.unsqueeze(1)
                 - state.presence_penalty.unsqueeze(1))
    return torch.where(counts > 0, penalised, logits)


def _kept_prefix(shifted: torch.Tensor, state: SamplerState) -> torch.Tensor:
    """shifted [B, V] (sorted logits minus the row maximum, descending) -> kept [B, V] bool: the survivors of
    top-k, then top-p, then min-p.

    Each filter keeps a prefix of the sorted row, so their conjunction is a prefix too, and position 0 always
    survives."""
    V = shifted.shape[1]
    positions = torch.arange(V, device=shifted.device)  # [V]
    kept = positions.unsqueeze(0) < state.top_k.unsqueeze(1)  # [B, V]
    weights = torch.where(kept, shifted.exp(), 0.0)  # [B, V]: probabilities at temperature 1, times a constant
    cumulative = row_cumsum(weights)  # [B, V]
    # Keep position i while the mass before it is below top_p (so the prefix is the shortest reaching top_p).
    # top_p == 1 is "off" explicitly: the float32 cumulative sum can reach the total before the tail ends.
    top_p = state.top_p.unsqueeze(1)  # [B, 1]
    kept &= (cumulative - weights < top_p * cumulative[:, -1:]) | (top_p >= 1.0)
    # p_i >= min_p * p_max  <=>  logit_i - logit_max >= log(min_p); log(0) = -inf keeps everything.
    kept &= shifted >= torch.log(state.min_p).unsqueeze(1)
    return kept


SCAN_CHUNK = 1024


def row_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sum along rows: x [B, V] -> [B, V].

    torch's scan along the last dimension gives each row to one thread block, so a few rows of a 128k vocabulary
    leave the GPU nearly idle (~160 us for 8 rows on an H100). Scanning chunks of SCAN_CHUNK as separate rows,
    then adding each chunk's offset, spreads the work. The split depends on V only, never on B, so a row's
    result does not depend on the batch it is in.
    """
    B, V = x.shape
    if V <= SCAN_CHUNK:
        return x.cumsum(dim=-1)
    C = -(-V // SCAN_CHUNK)
    chunks = torch.nn.functional.pad(x, (0, C * SCAN_CHUNK - V)).view(B, C, SCAN_CHUNK).cumsum(dim=-1)
    totals = chunks[:, :, -1]  # [B, C]
    offsets = totals.cumsum(dim=-1) - totals  # [B, C]: the sum of all earlier chunks
    return (chunks + offsets.unsqueeze(-1)).view(B, C * SCAN_CHUNK)[:, :V]


def _check_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be {tuple(shape)} {dtype} on {device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")

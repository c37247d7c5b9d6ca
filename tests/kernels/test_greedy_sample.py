"""greedy_sample_step against the torch path it replaces: sampling.sample_greedy, SamplerState.record, the token
fed back and written out, the position advanced. Exact: the same token and the same window, counts, counters
and positions, bit for bit, over rows with and without penalties, rings that evict, ties and a vocabulary that
is not a multiple of the block."""

from __future__ import annotations

import pytest
import torch

from replayllm.kernels.greedy_sample import BLOCK_V, GreedySampleWorkspace, greedy_sample_step
from replayllm.sampling import SamplingParams
from replayllm.sampling.sampler import SamplerState, sample_greedy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _state(vocab: int, seed: int) -> SamplerState:
    """Four rows: neutral penalties over a ring of 8; repetition + frequency + presence over the last 3 tokens (a ring about to
    evict); penalties over every token (-1, no ring); repetition over a ring of 5 not yet full."""
    state = SamplerState.create(4, vocab, DEVICE, max_penalty_window=8)
    gen = torch.Generator().manual_seed(seed)
    history = torch.randint(0, vocab, (6,), generator=gen).tolist()
    state.set_row(0, SamplingParams(temperature=0.0, penalty_last_n=8), 1, history)  # neutral penalties
    state.set_row(1, SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.7,
                                    presence_penalty=0.2, penalty_last_n=3), 2, history)
    state.set_row(2, SamplingParams(temperature=0.0, repetition_penalty=1.1, presence_penalty=0.5,
                                    penalty_last_n=-1), 3, history)
    state.set_row(3, SamplingParams(temperature=0.0, repetition_penalty=2.0, penalty_last_n=5), 4, history[:2])
    return state


def _clone(state: SamplerState) -> SamplerState:
    return SamplerState(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(state).items()})


def _torch_path(logits, state, tokens, out, positions):
    drawn = sample_greedy(logits, state)
    state.record(drawn)
    tokens.copy_(drawn)
    out.copy_(drawn)
    positions.add_(1)


def _fused(logits, state, tokens, out, positions, workspace):
    greedy_sample_step(logits, state.token_counts, state.repetition_penalty, state.frequency_penalty,
                       state.presence_penalty, state.penalty_last_n, state.window, state.window_count, state.step,
                       tokens, out, positions, workspace)


@pytest.mark.parametrize("vocab", [BLOCK_V * 2 + 77, 300])
def test_equals_the_torch_path_step_after_step(vocab):
    state = _state(vocab, seed=vocab)
    expected_state = _clone(state)
    workspace = GreedySampleWorkspace.create(4, vocab, DEVICE)
    gen = torch.Generator().manual_seed(7)
    tokens, out = torch.zeros(4, dtype=torch.int64, device=DEVICE), torch.full((4,), -1, dtype=torch.int64,
                                                                              device=DEVICE)
    positions = torch.tensor([0, 5, 9, 100], dtype=torch.int32, device=DEVICE)
    expected = (tokens.clone(), out.clone(), positions.clone())
    for step in range(5):
        logits = torch.randn(4, vocab, generator=gen).to(DEVICE) * 3
        if step == 1:  # ties: the max at several ids, across blocks; the lowest id must win
            logits[:, [vocab - 1, 3, BLOCK_V + 1 if vocab > BLOCK_V else 4]] = 50.0
        if step == 2:  # the previous tokens made likely again: the penalties must decide
            logits.scatter_(1, expected[0].view(-1, 1), 40.0)
        _torch_path(logits, expected_state, *expected)
        _fused(logits, state, tokens, out, positions, workspace)
        assert torch.equal(tokens, expected[0]) and torch.equal(out, expected[1])
        assert torch.equal(positions, expected[2])
        for name in ("window", "window_count", "token_counts", "step"):
            assert torch.equal(getattr(state, name), getattr(expected_state, name)), name
        assert int(workspace.counters.abs().sum()) == 0
    assert len(set(expected[0].tolist())) > 1  # the rows did not all collapse onto one token


def test_a_penalty_changes_the_token():
    """A row whose best logit belongs to a penalised token takes the runner-up (the check above could pass with
    the penalties ignored if they never changed an argmax)."""
    state = SamplerState.create(1, 500, DEVICE)
    state.set_row(0, SamplingParams(temperature=0.0, presence_penalty=5.0, penalty_last_n=4), 0, [17])
    logits = torch.zeros(1, 500, device=DEVICE)
    logits[0, 17], logits[0, 400] = 10.0, 7.0
    tokens, out = torch.zeros(1, dtype=torch.int64, device=DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE)
    positions = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    _fused(logits, state, tokens, out, positions, GreedySampleWorkspace.create(1, 500, DEVICE))
    assert tokens.tolist() == [400] and state.window_tokens(0) == [17, 400] and positions.tolist() == [1]


def test_rejects_a_workspace_of_another_shape():
    state = SamplerState.create(2, 300, DEVICE)
    tokens = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="workspace"):
        _fused(torch.zeros(2, 300, device=DEVICE), state, tokens, tokens.clone(),
               torch.zeros(2, dtype=torch.int32, device=DEVICE), GreedySampleWorkspace.create(1, 300, DEVICE))

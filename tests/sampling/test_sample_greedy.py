"""sample_greedy, the all-greedy shortcut replayed by greedy requests, gives exactly what sample gives."""

from __future__ import annotations

import torch

from replayllm.sampling import SamplerState, SamplingParams, sample, sample_greedy


def _greedy_state(histories: list[list[int]], vocab_size: int, **params) -> SamplerState:
    state = SamplerState.create(len(histories), vocab_size, "cpu")
    for row, history in enumerate(histories):
        state.set_row(row, SamplingParams(temperature=0.0, **params), 0, history)
    return state


def test_ties_go_to_the_lowest_id_like_sample():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0], [5.0] * 5, [-2.0, -1.0, -7.0, -1.0, -3.0]])
    state = _greedy_state([[], [], []], 5)
    assert sample_greedy(logits, state).tolist() == sample(logits, state).tolist() == [1, 0, 1]


def test_penalised_random_rows_agree_with_sample():
    gen = torch.Generator().manual_seed(3)
    vocab = 3000
    histories = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (0, 5, 64, 300)]
    state = _greedy_state(histories, vocab, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2,
                          penalty_last_n=64)
    for step in range(20):
        logits = torch.randn(len(histories), vocab, generator=gen) * 3
        logits[:, 7] = logits.max(dim=1).values  # exact ties at the top, some of them penalised
        tokens = sample_greedy(logits, state)
        assert torch.equal(tokens, sample(logits, state)), step
        state.record(tokens)


def test_a_penalty_moves_the_argmax():
    logits = torch.tensor([[1.0, 4.0, 3.9]])
    plain = _greedy_state([[1]], 3)
    penalised = _greedy_state([[1]], 3, repetition_penalty=1.5, penalty_last_n=8)
    assert sample_greedy(logits, plain).tolist() == [1]
    assert sample_greedy(logits, penalised).tolist() == [2]

"""The batched torch sampler against the numpy reference: greedy, distributions, seeds, penalty windows, and the
promise that it never needs the host (data-independent, graph-capturable, batch-independent per row)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replayllm.errors import InvalidParameterError
from replayllm.sampling import SamplerState, SamplingParams, reference_probs, reference_uniform, sample
from replayllm.sampling.reference import penalised_logits
from replayllm.sampling.rng import counter_uniform
from replayllm.sampling.sampler import apply_penalties, row_cumsum

FALSE_FAILURE_RATE = 1e-6
PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


def _state(rows: list[tuple[SamplingParams, int, list[int]]], vocab_size: int, device="cpu", **kw) -> SamplerState:
    state = SamplerState.create(len(rows), vocab_size, device, **kw)
    for r, (params, seed, history) in enumerate(rows):
        state.set_row(r, params, seed, history)
    return state


def _random_logits(vocab_size: int, seed: int, scale: float = 1.5) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab_size) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0],
                           [5.0, 5.0, 5.0, 5.0, 5.0],
                           [-2.0, -1.0, -7.0, -1.0, -3.0]])
    state = _state([(SamplingParams(temperature=0.0), 0, [])] * 3, 5)
    assert sample(logits, state).tolist() == [1, 0, 1]


def test_greedy_argmax_sees_the_penalties_including_exact_ties():
    # Row 0: id 3 (4.0) is halved by the repetition penalty to 2.0, tying id 1 (2.0): the lowest id, 1, wins.
    # Row 1: negative logits are multiplied: id 0 (-1.0) becomes -3.0, so id 2 (-2.0) wins.
    # Row 2: frequency 1.0 x 3 occurrences takes id 4 from 5.0 to 2.0, below id 0 (2.5).
    logits = torch.tensor([[0.0, 2.0, 1.0, 4.0, 0.0],
                           [-1.0, -5.0, -2.0, -9.0, -3.0],
                           [2.5, 0.0, 0.0, 0.0, 5.0]])
    rows = [(SamplingParams(temperature=0.0, repetition_penalty=2.0), 0, [3]),
            (SamplingParams(temperature=0.0, repetition_penalty=3.0), 0, [0, 0]),
            (SamplingParams(temperature=0.0, frequency_penalty=1.0, penalty_last_n=-1), 0, [4, 1, 4, 4])]
    assert sample(logits, _state(rows, 5)).tolist() == [1, 2, 0]


def test_greedy_matches_the_reference_argmax_on_random_rows():
    V, B = 300, 16
    rng = np.random.default_rng(3)
    rows, logits = [], []
    for r in range(B):
        params = SamplingParams(temperature=0.0, repetition_penalty=float(rng.uniform(0.5, 3.0)),
                                presence_penalty=float(rng.uniform(-1, 1)), frequency_penalty=float(rng.uniform(0, 1)),
                                penalty_last_n=int(rng.choice([-1, 0, 5, 40])))
        history = rng.integers(0, 20, size=30).tolist()  # the top ids are likely, so penalties matter
        row_logits = np.sort(_random_logits(V, r))[::-1].copy()  # the largest logits on the lowest ids
        rows.append((params, r, history))
        logits.append(row_logits)
    tokens = sample(torch.tensor(np.stack(logits)), _state(rows, V))
    expected = [int(np.argmax(penalised_logits(l, p, h))) for l, (p, _, h) in zip(logits, rows)]
    assert tokens.tolist() == expected


# ---------------------------------------------------------------------------------------------------- penalties


@pytest.mark.parametrize("last_n", [-1, 0, 3, 50])
def test_penalised_logits_match_the_reference(last_n):
    V = 40
    logits = _random_logits(V, 11)
    history = np.random.default_rng(5).integers(0, V, size=25).tolist()
    params = SamplingParams(repetition_penalty=1.7, presence_penalty=0.6, frequency_penalty=0.35,
                            penalty_last_n=last_n)
    state = _state([(params, 0, history)], V)
    actual = apply_penalties(torch.tensor(logits).unsqueeze(0), state)[0].numpy()
    np.testing.assert_allclose(actual, penalised_logits(logits, params, history), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- distributions


def _draw(logits: np.ndarray, params: SamplingParams, history: list[int], rows=128, steps=32) -> np.ndarray:
    """rows x steps draws from one distribution: rows of distinct seeds, each advanced `steps` times. The step
    counter is advanced without `record`, so the penalty window (and the distribution) stays fixed."""
    V = len(logits)
    state = _state([(params, 1000 + r, history) for r in range(rows)], V)
    batch = torch.tensor(logits).expand(rows, V).contiguous()
    draws = []
    for _ in range(steps):
        draws.append(sample(batch, state))
        state.step.add_(1)
    return torch.cat(draws).numpy()


def _chi_square_p_value(samples: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square p-value of the samples against probs; cells expecting < 5 draws are pooled."""
    counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    expected = probs * len(samples)
    big = expected >= 5
    obs, exp = list(counts[big]), list(expected[big])
    pooled_obs, pooled_exp = counts[~big].sum(), expected[~big].sum()
    if pooled_exp >= 5 or not exp:
        obs.append(pooled_obs), exp.append(pooled_exp)
    elif pooled_exp > 0:
        i = int(np.argmin(exp))
        obs[i] += pooled_obs
        exp[i] += pooled_exp
    obs, exp = np.array(obs), np.array(exp)
    if len(obs) < 2:
        return 1.0
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = torch.tensor((len(obs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)))


HISTORY = [0, 1, 1, 2, 5, 5, 5, 7, 9, 3]
DISTRIBUTIONS = {
    "temperature": (SamplingParams(**{**PLAIN, "temperature": 0.7}), []),
    "top_k": (SamplingParams(**{**PLAIN, "top_k": 5}), []),
    "top_p": (SamplingParams(**{**PLAIN, "temperature": 1.3, "top_p": 0.8}), []),
    "min_p": (SamplingParams(**{**PLAIN, "temperature": 0.9, "min_p": 0.1}), []),
    "combined": (SamplingParams(temperature=0.8, top_k=12, top_p=0.9, min_p=0.05), []),
    "penalties": (SamplingParams(**{**PLAIN, "repetition_penalty": 1.5, "frequency_penalty": 0.4,
                                    "presence_penalty": 0.3, "penalty_last_n": 6}), HISTORY),
    "penalties_whole_context_and_filters": (
        SamplingParams(temperature=1.1, top_k=10, top_p=0.95, min_p=0.02, repetition_penalty=1.3,
                       frequency_penalty=0.2, presence_penalty=0.5, penalty_last_n=-1), HISTORY),
}


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_sampled_distribution_matches_the_reference(name):
    """4096 draws against reference_probs with a chi-square test at a false-failure rate of 1e-6, and no draw
    outside the reference's support."""
    params, history = DISTRIBUTIONS[name]
    logits = _random_logits(24, seed=7)
    probs = reference_probs(logits, params, history)
    assert (probs > 0).sum() >= 3  # a meaningful test: several tokens can come out
    samples = _draw(logits, params, history)
    assert np.all(probs[samples] > 0), f"drew ids outside the support: {sorted(set(samples[probs[samples] == 0]))}"
    assert _chi_square_p_value(samples, probs) > FALSE_FAILURE_RATE


def test_top_k_ties_at_the_cut_keep_the_lowest_ids_like_the_reference():
    logits = np.round(_random_logits(24, seed=8) * 2) / 2  # many exact ties
    params = SamplingParams(**{**PLAIN, "top_k": 6})
    probs = reference_probs(logits, params, [])
    samples = _draw(logits, params, [], rows=64, steps=16)
    assert set(samples.tolist()) == set(np.flatnonzero(probs).tolist())


def test_chi_square_check_rejects_a_slightly_wrong_distribution():
    """The check has power: draws at temperature 0.7 fail against the reference at temperature 0.85."""
    logits = _random_logits(24, seed=7)
    samples = _draw(logits, SamplingParams(**{**PLAIN, "temperature": 0.7}), [])
    wrong = reference_probs(logits, SamplingParams(**{**PLAIN, "temperature": 0.85}), [])
    assert _chi_square_p_value(samples, wrong) < FALSE_FAILURE_RATE


def test_draw_uses_the_counter_uniform_by_inverse_cdf():
    # Two equally likely tokens: the draw is id 0 exactly when the row's uniform is below 1/2.
    params = SamplingParams(**PLAIN)
    state = _state([(params, seed, []) for seed in range(64)], 2)
    tokens = sample(torch.zeros(64, 2), state)
    assert tokens.tolist() == [int(reference_uniform(seed, 0) >= 0.5) for seed in range(64)]


# ---------------------------------------------------------------------------------------------------- seeds


def _stream(params: SamplingParams, seed: int, steps: int = 24, V: int = 500) -> list[int]:
    state = _state([(params, seed, [1, 2, 3])], V)
    logits = torch.zeros(1, V)  # uniform over 500 ids: two streams agree on a step with probability 1/500
    tokens = []
    for _ in range(steps):
        token = sample(logits, state)
        state.record(token)
        tokens.append(int(token[0]))
    return tokens


def test_same_seed_same_tokens_and_different_seeds_different_streams():
    params = SamplingParams(**PLAIN)
    first = _stream(params, 1234)
    assert first == _stream(params, 1234)
    others = [_stream(params, seed) for seed in (1235, 0, 2**63 - 1, 1234 + 2**32)]
    for other in others:
        assert sum(a == b for a, b in zip(first, other)) <= 3  # expected 24/500 matches by chance


def test_sample_does_not_modify_the_logits():
    logits = torch.tensor(_random_logits(50, 1)).unsqueeze(0)
    before = logits.clone()
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0)
    sample(logits, _state([(params, 0, list(range(50)))], 50))
    assert torch.equal(logits, before)


# ---------------------------------------------------------------------------------------------------- windows


def test_record_slides_the_window_and_wraps_the_ring():
    V = 20
    rows = [(SamplingParams(penalty_last_n=3), 0, [5, 6, 7, 8]),  # the window starts full: [6, 7, 8]
            (SamplingParams(penalty_last_n=4), 0, [9]),  # starts with room for three more
            (SamplingParams(penalty_last_n=-1), 0, [1, 1, 2]),  # counts everything, no ring
            (SamplingParams(penalty_last_n=0), 0, [1, 2, 3])]  # penalties off: counts nothing
    state = _state(rows, V, max_penalty_window=5)
    histories = [list(h) for _, _, h in rows]
    assert state.window_tokens(0) == [6, 7, 8] and state.window_tokens(1) == [9]
    pushed = [[9, 9, 3, 4], [0, 6, 6, 1], [4, 1, 3, 2], [10, 11, 12, 13], [8, 8, 8, 8], [19, 0, 19, 0]]
    for step, tokens in enumerate(pushed, start=1):
        state.record(torch.tensor(tokens))
        for r, t in enumerate(tokens):
            histories[r].append(t)
        assert state.step.tolist() == [step] * 4
        windows = [histories[0][-3:], histories[1][-4:], histories[2], []]
        assert state.window_tokens(0) == windows[0] and state.window_tokens(1) == windows[1]
        for r, window in enumerate(windows):
            expected = np.bincount(np.array(window, dtype=np.int64), minlength=V)
            np.testing.assert_array_equal(state.token_counts[r].numpy(), expected)


def test_set_row_resets_a_used_row():
    V = 10
    state = _state([(SamplingParams(penalty_last_n=2), 3, [1, 2])], V)
    for t in (4, 5, 6):
        state.record(torch.tensor([t]))
    state.set_row(0, SamplingParams(penalty_last_n=4, seed=9), 9, [7])
    assert state.window_tokens(0) == [7] and state.step.tolist() == [0]
    np.testing.assert_array_equal(state.token_counts[0].numpy(), np.eye(V)[7])


def test_set_row_rejects_bad_input():
    short = SamplerState.create(2, 10, "cpu", max_penalty_window=8)
    with pytest.raises(InvalidParameterError, match="penalty_last_n=9 .* window of 8"):
        short.set_row(0, SamplingParams(penalty_last_n=9), 0, [])
    state = SamplerState.create(2, 10, "cpu")
    with pytest.raises(InvalidParameterError, match="token id 10 at position 1"):
        state.set_row(0, SamplingParams(), 0, [3, 10])
    with pytest.raises(InvalidParameterError, match="token id -1"):
        state.set_row(0, SamplingParams(), 0, [-1])
    with pytest.raises(InvalidParameterError, match="seed"):
        state.set_row(0, SamplingParams(), 2**63, [])
    with pytest.raises(ValueError, match="row 2"):
        state.set_row(2, SamplingParams(), 0, [])


def test_sample_and_record_reject_wrong_shapes_and_dtypes():
    state = SamplerState.create(2, 10, "cpu")
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(2, 11), state)
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(2, 10, dtype=torch.float16), state)
    with pytest.raises(ValueError, match="tokens"):
        state.record(torch.zeros(2, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------------- no host sync

MIXED = [SamplingParams(temperature=0.0),
         SamplingParams(**{**PLAIN, "temperature": 0.6}),
         SamplingParams(**{**PLAIN, "top_k": 3}),
         SamplingParams(**{**PLAIN, "top_p": 0.5}),
         SamplingParams(**{**PLAIN, "min_p": 0.2, "temperature": 1.5}),
         SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
                        presence_penalty=0.4, frequency_penalty=0.2, penalty_last_n=5),
         SamplingParams(temperature=0.0, repetition_penalty=1.8, penalty_last_n=-1),
         SamplingParams(**{**PLAIN, "frequency_penalty": 1.0, "penalty_last_n": 8})]


def _run_steps(state: SamplerState, logits_per_step: list[torch.Tensor]) -> torch.Tensor:
    out = []
    for logits in logits_per_step:
        tokens = sample(logits, state)
        state.record(tokens)
        out.append(tokens)
    return torch.stack(out)  # [steps, B]


def test_mixed_batch_gives_each_row_what_it_gets_alone():
    """One batch with every kind of setting draws, row for row, the tokens each row draws in a batch of one.
    V > SCAN_CHUNK, so the chunked scan is part of it."""
    V, steps = 2000, 12
    histories = [list(range(r, r + 6)) for r in range(len(MIXED))]
    rows = [(params, 77 + r, histories[r]) for r, params in enumerate(MIXED)]
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(len(MIXED), V, generator=g) * 2 for _ in range(steps)]
    batched = _run_steps(_state(rows, V), logits)
    for r, row in enumerate(rows):
        alone = _run_steps(_state([row], V), [l[r:r + 1] for l in logits])
        assert torch.equal(batched[:, r], alone[:, 0]), f"row {r} ({row[0]}) differs"


def test_sample_and_record_run_on_meta_tensors():
    """Meta tensors hold no data: any host read (.item(), .tolist(), a bool of a tensor), boolean-mask indexing
    or data-dependent shape would raise. So sample and record are pure device-side work."""
    state = SamplerState.create(4, 64, "meta")
    tokens = sample(torch.empty(4, 64, device="meta"), state)
    assert tokens.shape == (4,) and tokens.dtype == torch.int64
    state.record(tokens)


@pytest.mark.gpu
def test_sample_and_record_capture_in_a_cuda_graph_and_replay_like_eager():
    device = torch.device("cuda")
    V, steps = 1000, 8
    rows = [(params, 77 + r, list(range(r, r + 6))) for r, params in enumerate(MIXED)]
    g = torch.Generator().manual_seed(0)
    logits = [(torch.randn(len(MIXED), V, generator=g) * 2).to(device) for _ in range(steps)]

    eager_state = _state(rows, V, device)
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in eager mode raises
    try:
        expected = _run_steps(eager_state, logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    state = _state(rows, V, device)
    static_logits = torch.zeros(len(MIXED), V, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        state.record(sample(static_logits, state))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_tokens = sample(static_logits, state)
        state.record(static_tokens)
    for r, row in enumerate(rows):  # the warm-up advanced the rows: start them again, in place
        state.set_row(r, *row)
    replayed = []
    for step_logits in logits:
        static_logits.copy_(step_logits)
        graph.replay()
        replayed.append(static_tokens.clone())
    assert torch.equal(torch.stack(replayed), expected)
    assert torch.equal(state.token_counts, eager_state.token_counts)


@pytest.mark.gpu
def test_gpu_uniform_and_greedy_match_the_cpu():
    seeds = [0, 1, 2**32 + 5, 2**63 - 1]
    V = 4096
    g = torch.Generator().manual_seed(1)
    logits = torch.round(torch.randn(len(seeds), V, generator=g) * 4) / 2  # many exact ties, also at the top
    history = list(range(0, V, 3))
    rows = [(SamplingParams(temperature=0.0, repetition_penalty=1.5), s, history) for s in seeds]
    cpu, gpu = _state(rows, V), _state(rows, V, torch.device("cuda"))
    tokens = sample(logits.cuda(), gpu).cpu()
    assert torch.equal(tokens, sample(logits, cpu))
    expected = [int(np.argmax(penalised_logits(l.numpy(), rows[0][0], history))) for l in logits]
    assert tokens.tolist() == expected
    for step in (0, 1, 2**40):
        gpu.step.fill_(step)
        u = counter_uniform(gpu.seed_lo, gpu.seed_hi, gpu.step).cpu().tolist()
        assert u == [reference_uniform(s, step) for s in seeds]


@pytest.mark.gpu
def test_top_k_ties_on_the_gpu_keep_the_lowest_ids():
    V, rows = 50_000, 64
    logits = np.round(_random_logits(V, seed=8) * 2) / 2  # thousands of ties per value
    params = SamplingParams(**{**PLAIN, "top_k": 7})
    support = set(np.flatnonzero(reference_probs(logits, params, [])).tolist())
    state = _state([(params, r, []) for r in range(rows)], V, torch.device("cuda"))
    batch = torch.tensor(logits, device="cuda").expand(rows, V).contiguous()
    drawn = set()
    for _ in range(8):
        drawn |= set(sample(batch, state).tolist())
        state.step.add_(1)
    assert drawn == support


@pytest.mark.parametrize("V", [7, 1024, 1025, 5000])
def test_row_cumsum_matches_a_float64_cumsum(V):
    x = torch.rand(3, V, generator=torch.Generator().manual_seed(V))
    expected = x.double().cumsum(dim=-1)
    actual = row_cumsum(x)
    assert actual.shape == (3, V)
    # float32 sums of <= 5000 terms in [0, 1): relative error well under 1e-5.
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=0)

"""The sampler's fast paths against its plain ones: the same kept set, the same values, the same seeded token."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from llmsample.config import SamplingConfig
from llmsample.sampling import Sampler, stages, truncation
from llmsample.sampling.candidates import Candidates

NEG_INF = float("-inf")


@contextlib.contextmanager
def plain_paths():
    """The sync-free paths: fixed shapes, no compaction, eta's floor the plain way (the reference)."""
    token = stages._SYNC_FREE.set(True)
    try:
        yield
    finally:
        stages._SYNC_FREE.reset(token)


def wide_rows(trial: int) -> torch.Tensor:
    """Rows wider than SMALL_ROW, each of its own kind: ties, removed tokens, a peak, flat, differing scales."""
    g = torch.Generator().manual_seed(trial)
    batch = 1 + trial % 4
    width = 4_096 + 1_021 * trial
    logits = torch.randn(batch, width, generator=g) * (0.5 + 4 * torch.rand(batch, 1, generator=g))
    kind = trial % 5
    if kind == 1:
        logits = (logits * 2).round() / 2  # many ties, at the cut too
    elif kind == 2:
        logits[torch.rand(batch, width, generator=g) < 0.4] = NEG_INF  # removed upstream
    elif kind == 3:
        logits[:, :7] += 15  # a peak over a flat tail
    elif kind == 4:
        logits[0] = 0.0  # a uniform row beside ordinary ones
    if trial % 7 == 6:
        logits = logits * 1e3  # huge logits: their normaliser's float32 spacing is coarse
    return logits


@pytest.mark.parametrize("trial", range(30))
@pytest.mark.parametrize("stage", ["epsilon", "eta"])
@pytest.mark.parametrize("given", [False, True], ids=["", "engine-stats"])
def test_epsilon_and_eta_compacted_equal_the_mask(trial, stage, given):
    """The fast paths keep what the plain one keeps; with an engine's ``RowStats`` the cut may be decided from
    its list of highest logits (ties, removed tokens and huge logits among these rows)."""
    from llmsample.sampling.row_stats import RowStats

    g = torch.Generator().manual_seed(1000 + trial)
    logits = wide_rows(trial)
    cutoff = float(10 ** (-1 - 4 * torch.rand(1, generator=g).item()))  # 1e-5 .. 1e-1
    min_keep = 1 + trial % 2 if not given else 1
    cut = getattr(truncation, stage)
    fast = cut(Candidates.from_logits(logits), cutoff, min_keep, RowStats.of(logits) if given else None)
    with plain_paths():
        plain = cut(Candidates.from_logits(logits), cutoff, min_keep)
    assert plain.is_dense
    assert torch.equal(fast.dense(), plain.dense())


def _head_like(batch: int, seed: int) -> torch.Tensor:
    logits = torch.randn(batch, 262_144, generator=torch.Generator().manual_seed(seed))
    logits[:, 1_000:1_100] += 12  # a model's head: a hundred likely tokens above a long tail
    return logits


@pytest.mark.parametrize("stage", ["epsilon", "eta"])
def test_an_engines_list_of_highest_logits_decides_the_cut_without_reading_the_row(stage):
    """On a model-like row the cut comes from the list (the row itself is never read: here it is all NaN), the
    survivors in vocabulary order, a shorter row of the batch padded with removed columns."""
    from llmsample.sampling.row_stats import RowStats

    logits = _head_like(3, 11)
    logits[1, 1_050:1_100] -= 3  # fewer survivors in this row
    stats = RowStats.of(logits)
    cut = getattr(truncation, stage)
    with plain_paths():
        plain = cut(Candidates.from_logits(logits), 3e-3)
    unread = Candidates.from_logits(torch.full_like(logits, float("nan")))
    listed = cut(unread, 3e-3, 1, stats)
    assert not listed.is_dense and torch.equal(listed.dense(), plain.dense())
    for ids, values in zip(listed.ids, listed.logits):
        assert bool((ids[1:] > ids[:-1]).all())
    counts = listed.logits.isfinite().sum(-1)
    assert counts[1] < counts[0]


@pytest.mark.parametrize("stage", ["epsilon", "eta"])
def test_a_token_at_the_cut_sends_the_decision_to_the_plain_softmax(stage):
    """A listed logit within float32 softmax rounding of the cut: the list does not decide (None), and the stage's
    result is the plain one's, which keeps a token whose probability equals the floor."""
    from llmsample.sampling.row_stats import RowStats

    logits = _head_like(1, 12)
    probs = torch.softmax(logits, -1)
    stats = RowStats.of(logits)
    j = int(stats.top_columns[0, 40])
    if stage == "epsilon":
        floor = float(probs[0, j])  # exactly this token's float32 probability
    else:  # a cutoff whose floor √η·e^(−H) lands on the token (the floor's own rounding aside)
        entropy = float(stats.entropy[0])
        floor = float(probs[0, j])
        floor_eta = (floor * torch.exp(torch.tensor(entropy, dtype=torch.float64))) ** 2
        floor = float(floor_eta)
    cut = getattr(truncation, stage)
    margin = truncation._softmax_margin(logits.shape[-1])
    log_floor = [float(torch.log(probs[0, j].double()))]
    assert truncation._cut_from_listed(Candidates.from_logits(logits), stats, log_floor, margin) is None
    with plain_paths():
        plain = cut(Candidates.from_logits(logits), floor)
    assert torch.equal(cut(Candidates.from_logits(logits), floor, 1, stats).dense(), plain.dense())
    if stage == "epsilon":
        assert bool(plain.dense()[0, j].isfinite())


def test_an_engines_list_too_short_for_the_survivors_leaves_the_cut_to_the_row():
    from llmsample.sampling.row_stats import RowStats

    logits = torch.randn(2, 262_144, generator=torch.Generator().manual_seed(13))  # flat: thousands survive
    stats = RowStats.of(logits)
    assert truncation._cut_from_listed(Candidates.from_logits(logits), stats, [-12.0, -12.0], 1e-3) is None
    with plain_paths():
        plain = truncation.epsilon(Candidates.from_logits(logits), 1e-6)
    assert torch.equal(truncation.epsilon(Candidates.from_logits(logits), 1e-6, 1, stats).dense(), plain.dense())


def test_the_compacted_path_runs_and_keeps_vocabulary_order():
    logits = torch.randn(3, 262_144, generator=torch.Generator().manual_seed(3)) * 3
    logits[:, :300] += 8  # a model's head: eta's floor stays above the tail
    logits[1, 100:110] = logits[1].max()  # tied tops
    for cut in (truncation.epsilon, truncation.eta):
        fast = cut(Candidates.from_logits(logits), 3e-4)
        assert not fast.is_dense and fast.logits.shape[-1] < 3_400  # at most 1/3e-4 reach the floor
        for ids, values in zip(fast.ids, fast.logits):  # the survivors in vocabulary order, as the dense row's
            kept = ids[values.isfinite()]
            assert bool((kept[1:] > kept[:-1]).all())
        assert all(len(set(row.tolist())) == row.numel() for row in fast.ids)  # a shorter row's padding: distinct
        with plain_paths():
            assert torch.equal(fast.dense(), cut(Candidates.from_logits(logits), 3e-4).dense())


def test_eta_near_its_floor_takes_the_plain_floor(monkeypatch):
    """A margin that always finds a token near the floor sends every row the plain way: the same kept set."""
    logits = torch.randn(4, 50_000, generator=torch.Generator().manual_seed(4)) * 2
    quick = truncation.eta(Candidates.from_logits(logits), 3e-4)
    monkeypatch.setattr(truncation, "ETA_FLOOR_MARGIN", 1.0)
    assert torch.equal(quick.dense(), truncation.eta(Candidates.from_logits(logits), 3e-4).dense())


@pytest.mark.parametrize("name", ["epsilon", "eta"])
def test_a_seed_draws_the_same_token_from_the_compacted_row_as_from_the_dense_one(name):
    """The draw over the few survivors in vocabulary order maps each uniform number onto the same token as the
    draw over the whole masked row (equal up to float rounding at an interval's edge: none in these seeds)."""
    logits = torch.randn(4, 262_144, generator=torch.Generator().manual_seed(5)) * 2.5
    logits[:, :300] += 6
    cfg = SamplingConfig(do_sample=True, order="hf", temperature=0.8, **{f"{name}_cutoff": 3e-4})
    ids = torch.zeros(4, 1, dtype=torch.long)
    for seed in range(40):
        fast = Sampler(cfg).sample(ids, logits, generator=torch.Generator().manual_seed(seed))
        plain = Sampler(cfg, sync_free=True).sample(ids, logits, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(fast, plain), seed


def test_logsumexp_is_torchs():
    rows = torch.randn(5, 262_144, generator=torch.Generator().manual_seed(6)) * 4
    rows[1, ::3] = NEG_INF
    odd = torch.tensor([[NEG_INF] * 4, [1.0, float("inf"), 0.0, 2.0], [float("nan"), 1.0, 2.0, 3.0], [0.0, 1, 2, 3]])
    for x in (rows, odd):
        ours, theirs = stages.logsumexp(x), torch.logsumexp(x, -1, keepdim=True)
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert torch.equal(ours.nan_to_num(7.0), theirs.nan_to_num(7.0))  # bit for bit, ±inf included


def test_the_quick_logsumexp_is_close_and_keeps_unusable_rows_unusable():
    x = torch.randn(6, 262_144, generator=torch.Generator().manual_seed(7)) * 3
    x[2, ::2] = NEG_INF
    x[3, 5], x[4, :], x[5, 9] = float("inf"), NEG_INF, float("nan")
    quick, exact = stages.quick_logsumexp(x), torch.logsumexp(x, -1, keepdim=True)
    torch.testing.assert_close(quick[:3], exact[:3], atol=1e-5, rtol=0)
    assert not torch.isfinite(quick[3:]).any()
    assert quick[3, 0] == float("inf") and quick[4, 0] == NEG_INF and quick[5, 0].isnan()


def test_sample_leaves_the_raw_normaliser_alone_until_a_step_needs_it():
    """In transformers' order nothing in ``sample`` reads the raw row's logsumexp (a full-vocabulary pass);
    ``step`` computes it once, for the raw probability."""
    logits = torch.randn(2, 262_144, generator=torch.Generator().manual_seed(8)) * 3
    sampler = Sampler(SamplingConfig(do_sample=True, order="hf", temperature=0.7, top_p=0.9))
    ids = torch.zeros(2, 1, dtype=torch.long)
    history, _ = sampler._run(ids, logits, 0)
    assert history.raw_log_total is None
    choice = sampler.step(ids, logits, generator=torch.Generator().manual_seed(0))
    expected = torch.softmax(logits, -1).gather(1, choice.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(choice.raw_prob, expected, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("trial", range(12))
def test_top_p_on_batches_of_unlike_rows_keeps_what_a_full_sort_keeps(trial):
    """Rows of one batch that take different routes (a peaked row whose cut the first window holds, a flat one
    whose lower bound sends the batch to the histogram, one whose cut lies within 1e-5 of a token's edge and
    needs its own total) keep what sorting each whole row keeps."""
    g = torch.Generator().manual_seed(2000 + trial)
    width = 20_000 + 3_001 * trial
    peaked = torch.randn(1, width, generator=g) * 3
    peaked[0, :40] += 12
    flat = torch.randn(1, width, generator=g) * (0.2 + torch.rand(1, generator=g).item())
    tied = (torch.randn(1, width, generator=g) * 2).round()
    rows = [peaked, flat, tied][: 1 + trial % 3] + [peaked.roll(trial, -1)]
    logits = torch.cat(rows)
    p = 0.5 + 0.49 * torch.rand(1, generator=g).item()
    ours = stages.top_p(Candidates.from_logits(logits), p).dense().isfinite()
    with plain_paths():
        expected = stages.top_p(Candidates.from_logits(logits), p).dense().isfinite()
    assert torch.equal(ours, expected)


def test_top_p_sums_a_row_only_where_its_cut_is_that_close():
    """A cut placed on a token's edge (mass above it exactly p) needs the row's total; its batch neighbour
    does not, and both keep what a full sort keeps."""
    probs = torch.full((2, 4_096), 0.5 / 4_094)
    probs[:, 0], probs[:, 1] = 0.3, 0.2  # p = 0.5: the mass above token 2 is exactly p
    logits = probs.log()
    logits[1] = torch.randn(4_096, generator=torch.Generator().manual_seed(9)) * 3
    for p in (0.5, 0.3, 0.7):
        ours = stages.top_p(Candidates.from_logits(logits), p).dense().isfinite()
        with plain_paths():
            assert torch.equal(ours, stages.top_p(Candidates.from_logits(logits), p).dense().isfinite())


@pytest.mark.parametrize("trial", range(12))
@pytest.mark.parametrize("chain", [{}, {"do_sample": True, "temperature": 0.8}])  # dense rows at the draw
def test_dense_step_entropy_probability_and_greedy_pick(trial, chain):
    """Greedy and a temperature alone leave the row dense: the entropy from one softmax is within 2e-5 nats of a
    float64 computation (for logits up to 100), the token's probabilities are the plain softmax's, and greedy picks the first of tied
    maxima, as argmax does."""
    logits = wide_rows(trial)
    if trial % 3 == 0:
        logits[:, 100:110] = logits.amax(-1, keepdim=True)  # tied maxima: the first one wins
    cfg = SamplingConfig(**chain)
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    choice = Sampler(cfg).step(ids, logits, generator=torch.Generator().manual_seed(trial))
    processed = logits.double() / (cfg.temperature if cfg.do_sample else 1.0)
    log_probs = torch.log_softmax(processed, -1)
    expected = -(log_probs.exp() * log_probs).nansum(-1)
    scale = max(1.0, float(logits.abs().max()) / 100)  # huge logits: float32's spacing grows with them
    torch.testing.assert_close(choice.entropy.double(), expected, atol=2e-5 * scale, rtol=1e-6)
    if not cfg.do_sample:
        assert torch.equal(choice.token_ids, logits.argmax(-1))
        assert torch.equal(choice.token_ids, stages.first_argmax(logits))
    picked = choice.token_ids.unsqueeze(1)
    torch.testing.assert_close(choice.prob.double(), log_probs.gather(1, picked).squeeze(1).exp(), rtol=2e-4,
                               atol=1e-7)
    raw = torch.log_softmax(logits.double(), -1).gather(1, picked).squeeze(1).exp()
    torch.testing.assert_close(choice.raw_prob.double(), raw, rtol=2e-5 * scale, atol=1e-7)


@pytest.mark.parametrize("trial", range(10))
def test_dynamic_temperature_on_wide_rows_matches_a_float64_computation(trial):
    """Wide rows take one softmax for their entropy: the distribution is llama.cpp's formula computed in float64,
    within 1e-5 (removed tokens, ties and huge logits included)."""
    logits = wide_rows(trial)
    t, spread, exponent = 0.9, 0.6, 1.3
    out = stages.dynamic_temperature(Candidates.from_logits(logits), t, spread, exponent).logits
    x = logits.double()
    log_probs = torch.log_softmax(x, -1)
    entropy = -(log_probs.exp() * log_probs).nansum(-1, keepdim=True)
    count = torch.isfinite(x).sum(-1, keepdim=True).clamp(min=2)
    temp = max(0.0, t - spread) + 2 * spread * (entropy / count.double().log()).clamp(min=0) ** exponent
    expected = torch.softmax(x / temp, -1)
    scale = max(1.0, float(logits[torch.isfinite(logits)].abs().max()) / 100)
    torch.testing.assert_close(torch.softmax(out.double(), -1), expected, atol=1e-5 * scale, rtol=1e-4)
    assert torch.equal(torch.isfinite(out), torch.isfinite(logits))


@pytest.mark.parametrize("settings", [
    {}, {"do_sample": True}, {"do_sample": True, "top_k": 64, "top_p": 0.95},
    {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.3},
    {"do_sample": True, "min_p": 0.05}, {"do_sample": True, "epsilon_cutoff": 3e-4},
    {"do_sample": True, "temperature": 0.7, "eta_cutoff": 3e-4}, {"do_sample": True, "top_k": 300},
    {"do_sample": True, "temperature": 0.7, "top_p": 0.5},
    {"do_sample": True, "repetition_penalty": 1.2, "top_k": 40, "temperature": 0.8},
    {"do_sample": True, "repetition_penalty": 1.5, "epsilon_cutoff": 3e-4},
    {"repetition_penalty": 1.3},
])
def test_a_step_given_the_engines_row_statistics_equals_one_without(settings):
    """``RowStats`` only spare passes over the raw row: the same tokens, and probabilities and entropies within
    float rounding (the statistics are float64 sums; the sampler's own fused softmax of a wide row is up to ~3e-5
    off, relatively, on these rows)."""
    from llmsample.sampling.row_stats import RowStats

    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 1000, (3, 12), generator=g)
    cfg = SamplingConfig(**settings)
    for trial in range(8):
        logits = torch.randn(3, 262_144, generator=g) * (1 + trial)
        logits[:, :40] += 6
        given = Sampler(cfg).step(ids, logits, torch.Generator().manual_seed(trial), stats=RowStats.of(logits))
        plain = Sampler(cfg).step(ids, logits, torch.Generator().manual_seed(trial))
        assert torch.equal(given.token_ids, plain.token_ids)
        for field in ("prob", "raw_prob", "entropy"):
            assert torch.allclose(getattr(given, field), getattr(plain, field), rtol=6e-5, atol=1e-6), field


def test_row_statistics_of_a_row_with_nan_are_refused_as_the_row_is():
    from llmsample.errors import SamplingError
    from llmsample.sampling.row_stats import RowStats

    logits = torch.randn(2, 4_096)
    logits[1, 9] = float("nan")
    for stats in (None, RowStats.of(logits)):
        with pytest.raises(SamplingError, match="NaN"):
            Sampler(SamplingConfig()).step(torch.zeros(2, 1, dtype=torch.long), logits, stats=stats)


def test_statistics_derived_after_a_repetition_penalty_are_the_penalised_rows():
    """``RowStats.lowered``: the normaliser within float32 rounding and the list a sort's (no ties here), with
    repeated ids in the history and rows of a batch that lose unlike numbers of listed tokens; None where the
    penalty took most of a row's mass (the normaliser's rounding would grow past top_p's margin)."""
    from llmsample.sampling.row_stats import RowStats

    g = torch.Generator().manual_seed(21)
    logits = torch.randn(3, 262_144, generator=g) * 2
    logits[:, :50] += 7
    ids = torch.cat((torch.randint(0, 60, (3, 40), generator=g), torch.randint(0, 262_144, (3, 24), generator=g)),
                    dim=1)
    ids[1, :10] = 3  # a repeated id
    history = stages.History(ids, raw_logits=logits, raw_stats=RowStats.of(logits))
    out = stages.penalties(Candidates.from_logits(logits), history, 1.3)
    assert history.derived is not None and history.derived[0] is out.logits
    derived, exact = history.derived[1], RowStats.of(out.logits)
    assert torch.allclose(derived.log_total, exact.log_total, rtol=0, atol=5e-6)
    n = derived.top_values.shape[1]
    assert n >= stages.FIRST_WINDOW
    assert torch.equal(derived.top_values, exact.top_values[:, :n])
    assert torch.equal(derived.top_columns, exact.top_columns[:, :n])
    assert torch.equal(derived.top, exact.top) and torch.equal(derived.argmax, exact.argmax)

    peaked = torch.randn(1, 262_144, generator=g)
    peaked[0, 5] = 30.0  # nearly all the mass
    history = stages.History(torch.tensor([[5]]), raw_logits=peaked, raw_stats=RowStats.of(peaked))
    stages.penalties(Candidates.from_logits(peaked), history, 3.0)
    assert history.derived is None


@pytest.mark.parametrize("trial", range(20))
def test_counting_through_chunk_maxima_counts_what_a_comparison_counts(trial):
    logits = wide_rows(trial)[:, : 4_096 + 997 * trial]  # ragged ends too
    g = torch.Generator().manual_seed(3000 + trial)
    if trial % 5 == 0:
        logits[0, 17] = float("nan")  # a NaN hides its chunk from the maxima: the plain count
    floor = torch.quantile(logits.nan_to_num(nan=0.0, neginf=-1e30).float(), 1 - 10 ** -(1 + 3 * torch.rand(1, generator=g).item()),
                           dim=-1, keepdim=True)
    assert torch.equal(stages.count_at_least(logits, floor), (logits >= floor).sum(-1))


@pytest.mark.parametrize("trial", range(20))
def test_xtc_with_a_quick_normaliser_removes_what_the_exact_one_removes(trial):
    """XTC's normaliser from the fused softmax (or the history's) decides only where no token lies within its margin
    of the threshold; a token placed on the threshold sends the row to ``torch.logsumexp``."""
    logits = wide_rows(trial)
    threshold = [0.1, 0.02, 0.3, 0.005][trial % 4]
    if trial % 3 == 2:  # a token at the threshold: p = t where the rest sums to S means ℓ = log(t/(1 − t)·S)
        logits[0, 5] = NEG_INF
        logits[0, 5] = torch.logsumexp(logits[0], -1) + math.log(threshold / (1 - threshold))
    history = stages.History(torch.zeros(logits.shape[0], 1, dtype=torch.long), generator=torch.Generator())
    quick = truncation.xtc(Candidates.from_logits(logits), history, 1.0, threshold)
    with plain_paths():
        exact = truncation.xtc(Candidates.from_logits(logits), history, 1.0, threshold)
    assert torch.equal(quick.dense(), exact.dense())


def test_xtc_near_its_threshold_takes_the_exact_normaliser(monkeypatch):
    calls = []
    plain = torch.logsumexp
    monkeypatch.setattr(torch, "logsumexp", lambda *a, **k: calls.append(1) or plain(*a, **k))
    logits = torch.randn(1, 50_000, generator=torch.Generator().manual_seed(1)) * 3
    logits[0, :3] += 20
    history = stages.History(torch.zeros(1, 1, dtype=torch.long), generator=torch.Generator())
    truncation.xtc(Candidates.from_logits(logits), history, 1.0, 0.1)
    assert not calls  # decided by the quick normaliser
    logits[0, 9] = NEG_INF
    logits[0, 9] = plain(logits[0], -1) + math.log(0.1 / 0.9)  # its probability: 0.1, within rounding
    truncation.xtc(Candidates.from_logits(logits), history, 1.0, 0.1)
    assert calls

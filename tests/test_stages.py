"""Each stage pinned on hand-computed examples, including the seed documents' worked examples."""

from __future__ import annotations

import math

import pytest
import torch

from llmsample.config import SamplingConfig
from llmsample.sampling import Sampler
from llmsample.sampling import stages
from llmsample.sampling.candidates import Candidates
from llmsample.sampling.stages import History, min_p, no_repeat_ngram, penalties, temperature, top_k, top_p

INF = float("inf")


def kept(c: Candidates) -> list[bool]:
    return torch.isfinite(c.dense())[0].tolist()


def from_probs(*probs: float) -> Candidates:
    return Candidates.from_logits(torch.tensor([probs], dtype=torch.float32).log())


def test_seed_001_softmax_example():
    # 晴朗=3.0, 多云=2.5, 阴天=2.0, 雨天=1.0 → 0.47 / 0.29 / 0.17 / 0.06
    probs = torch.softmax(Sampler(SamplingConfig(do_sample=True)).process(
        torch.zeros(1, 0, dtype=torch.long), torch.tensor([[3.0, 2.5, 2.0, 1.0]])), -1)
    assert [round(p, 2) for p in probs[0].tolist()] == [0.47, 0.29, 0.17, 0.06]


# Seed 001's weather contexts. Context 1: 晴朗 dominates and the top two hold 85%. Context 2: close probabilities,
# the top three hold 80% and 雨天 20%.
CONTEXT_1 = (0.60, 0.25, 0.10, 0.05)
CONTEXT_2 = (0.30, 0.28, 0.22, 0.20)


@pytest.mark.parametrize(
    "probs, stage, expected",
    [
        (CONTEXT_1, lambda c: top_k(c, 3), [True, True, True, False]),  # keeps the needless 阴天
        (CONTEXT_2, lambda c: top_k(c, 3), [True, True, True, False]),  # drops 雨天 at 20%
        (CONTEXT_1, lambda c: top_p(c, 0.85), [True, True, False, False]),  # 晴朗 + 多云 = 85%
        (CONTEXT_2, lambda c: top_p(c, 0.85), [True, True, True, True]),  # 80% < 85%: 雨天 joins
    ],
)
def test_seed_001_weather_examples(probs, stage, expected):
    assert kept(stage(from_probs(*probs))) == expected


@pytest.mark.parametrize(
    "probs, p, expected",
    [
        # llama.cpp's test_top_p table, with p moved off the exact sums (0.4 + 0.3 = 0.7 in exact arithmetic
        # rounds to either side in float32, in transformers as here)
        ((0.1, 0.2, 0.3, 0.4), 0.0001, [False, False, False, True]),
        ((0.1, 0.2, 0.3, 0.4), 0.35, [False, False, False, True]),
        ((0.1, 0.2, 0.3, 0.4), 0.65, [False, False, True, True]),
        ((0.1, 0.2, 0.3, 0.4), 0.75, [False, True, True, True]),
        ((0.1, 0.2, 0.3, 0.4), 1.0, [True, True, True, True]),
        ((0.5, 0.5), 0.3, [True, True]),  # a tie on the boundary is kept whole
    ],
)
def test_top_p_table(probs, p, expected):
    assert kept(top_p(from_probs(*probs), p)) == expected


@pytest.mark.parametrize(
    "logits, k, expected",
    [
        ((1.0, 3.0, 2.0, 0.0), 1, [False, True, False, False]),
        ((1.0, 3.0, 2.0, 2.0), 2, [False, True, True, True]),  # ties with the k-th are kept
        ((1.0, 3.0), 5, [True, True]),  # k larger than the vocab
        ((1.0, 3.0, 2.0), 0, [True, True, True]),  # neutral
    ],
)
def test_top_k_table(logits, k, expected):
    assert kept(top_k(Candidates.from_logits(torch.tensor([logits])), k)) == expected


@pytest.mark.parametrize(
    "probs, m, expected",
    [
        ((0.5, 0.3, 0.15, 0.05), 0.2, [True, True, True, False]),  # keeps p ≥ 0.1
        ((0.5, 0.3, 0.15, 0.05), 0.5, [True, True, False, False]),
        ((0.5, 0.3, 0.15, 0.05), 1.0, [True, False, False, False]),
    ],
)
def test_min_p_table(probs, m, expected):
    assert kept(min_p(from_probs(*probs), m)) == expected


def test_temperature_scales_and_zero_keeps_the_top_token():
    c = Candidates.from_logits(torch.tensor([[1.0, 4.0, 2.0]]))
    assert temperature(c, 2.0).logits.tolist() == [[0.5, 2.0, 1.0]]
    assert kept(temperature(c, 0.0)) == [False, True, False]


def test_repetition_penalty_whole_history_frequency_presence_generated_only():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    history = History(torch.tensor([[0, 3, 3, 1]]), prompt_len=2)  # prompt: 0 3; generated: 3 1
    out = penalties(Candidates.from_logits(logits), history, 2.0, 0.5, 0.25).logits
    # token 0: prompt only → repetition only: 2/2 = 1.0
    # token 1: generated once → −1·2 − 0.5 − 0.25 = −2.75
    # token 3: prompt + generated once → 1/2 − 0.5 − 0.25 = −0.25
    assert out.tolist() == [[1.0, -2.75, 0.5, -0.25]]


def test_frequency_penalty_counts_repeats():
    history = History(torch.tensor([[2, 2, 2, 1]]), prompt_len=0)
    out = penalties(Candidates.from_logits(torch.zeros(1, 3)), history, 1.0, 0.5, 0.0).logits
    assert out.tolist() == [[0.0, -0.5, -1.5]]


def test_penalties_on_compacted_candidates_match_dense():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5000, generator=g) * 3
    ids = torch.randint(0, 5000, (3, 40), generator=g)
    ids[:, 20:] = ids[:, :20]  # repeats
    cfg = dict(do_sample=True, repetition_penalty=1.4, frequency_penalty=0.3, presence_penalty=0.7)
    first = Sampler(SamplingConfig(order="penalties,top_k", top_k=60, **cfg)).process(ids, logits, prompt_len=10)
    after = Sampler(SamplingConfig(order="top_k,penalties", top_k=60, **cfg)).process(ids, logits, prompt_len=10)
    # penalties after top_k judge only the 60 survivors; on them the values agree with the dense computation
    both = torch.isfinite(first) & torch.isfinite(after)
    assert both.sum() > 100
    assert torch.equal(first[both], after[both])


def test_no_repeat_ngram_bans_completions_and_falls_back_when_everything_is_banned():
    hist = History(torch.tensor([[1, 2, 3, 1, 2]]))
    assert kept(no_repeat_ngram(Candidates.from_logits(torch.zeros(1, 5)), hist, 3)) == [
        True, True, True, False, True
    ]
    # vocab 2, unigrams: both tokens already used; the best one comes back
    out = no_repeat_ngram(Candidates.from_logits(torch.tensor([[0.3, 0.9]])), History(torch.tensor([[0, 1]])), 1)
    assert kept(out) == [False, True]


def test_stages_never_modify_their_inputs():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3000, generator=g)
    ids = torch.randint(0, 30, (2, 12), generator=g)
    before_logits, before_ids = logits.clone(), ids.clone()
    cfg = SamplingConfig(do_sample=True, temperature=0.7, top_k=100, top_p=0.8, min_p=0.01, typical_p=0.95,
                         repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2, no_repeat_ngram_size=2)
    s = Sampler(cfg)
    s.process(ids, logits, prompt_len=4)
    s.sample(ids, logits, generator=torch.Generator().manual_seed(0), prompt_len=4)
    s.trace(ids, logits, 5, prompt_len=4)
    assert torch.equal(logits, before_logits) and torch.equal(ids, before_ids)


def test_length_penalty_formula_is_documented_in_beam_only():
    # With sampling it has no effect: the config says so instead of ignoring it silently.
    notes = dict(SamplingConfig(do_sample=True, length_penalty=0.9).inactive_settings())
    assert "beam search only" in notes["length_penalty"]
    assert math.isclose(SamplingConfig(num_beams=4, length_penalty=0.9).length_penalty, 0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [262_144, 100_003, 40_000])
@pytest.mark.parametrize("k", [1, 7, 51, 256, 423, 1024, 4000])  # the larger k: smaller chunks
def test_fast_topk_equals_torch_topk(dtype, width, k):
    from llmsample.sampling.stages import fast_topk

    g = torch.Generator().manual_seed(width + k)
    x = (torch.randn(3, width, generator=g) * 3).to(dtype).float()  # bf16 rounding makes many ties
    x[1, :] = 0.0  # every value tied
    x[2, 1::3] = float("-inf")  # removed tokens: a third of the row
    values, columns = fast_topk(x, k)
    expected = torch.topk(x, k).values
    assert torch.equal(values, expected)
    assert torch.equal(x.gather(1, columns), values)
    assert all(len(set(row)) == k for row in columns.tolist())
    from llmsample.sampling.row_stats import RowStats

    given = fast_topk(x, k, RowStats.of(x).chunk_maxima)  # an engine's chunk maxima: the same answer
    assert torch.equal(given[0], values) and torch.equal(given[1], columns)


@pytest.mark.parametrize("width", [262_144, 100_003, 4_100, 64])
@pytest.mark.parametrize("batch", [1, 3])
def test_at_least_finds_each_rows_columns_in_order(width, batch):
    """Every column whose value reaches its row's floor, in column order, the ragged end of a row included; a
    shorter row padded with distinct columns it does not hold; None past the limit or for a row without any."""
    from llmsample.sampling.stages import at_least

    g = torch.Generator().manual_seed(width + batch)
    x = torch.randn(batch, width, generator=g)
    x[:, 1], x[0, -1] = 9.0, 9.0  # every row finds one; the last column is in the ragged end, when there is one
    x[:, ::5] = float("-inf")
    floor = torch.tensor([2.5, 3.0, 3.5][:batch]).unsqueeze(1)
    columns, values = at_least(x, floor)
    for row in range(batch):
        expected = (x[row] >= floor[row]).nonzero().flatten()
        n = expected.numel()
        assert torch.equal(columns[row, :n], expected) and torch.equal(values[row, :n], x[row, expected])
        assert bool(values[row, n:].isneginf().all())
        assert columns[row].unique().numel() == columns.shape[1] and int(columns[row].max()) < width
    assert at_least(x, floor, limit=int((x >= floor).sum(-1).max()) - 1) is None
    assert at_least(x, torch.full((batch, 1), 100.0)) is None
    assert at_least(torch.full((batch, width), float("nan")), floor) is None  # a softmax of a row with NaN


def _top_p_sorted(logits, p, min_keep):
    """top_p by its one-sort path (the one a sync-free step takes): the reference for the faster ones."""
    from llmsample.sampling import stages

    token = stages._SYNC_FREE.set(True)
    try:
        return stages.top_p(Candidates.from_logits(logits), p, min_keep).dense().isfinite()
    finally:
        stages._SYNC_FREE.reset(token)


@pytest.mark.parametrize("trial", range(40))
def test_top_p_on_wide_flat_rows_keeps_what_a_full_sort_keeps(trial):
    """Flat rows (a large nucleus) take the histogram path: the same kept set as sorting the whole row, with
    ties, removed tokens, a peak over a flat tail, nearly uniform rows and min_tokens_to_keep."""
    from llmsample.sampling import stages

    g = torch.Generator().manual_seed(trial)
    batch = 1 + trial % 3
    width = 16_384 + 997 * trial
    logits = torch.randn(batch, width, generator=g) * (0.05 + 4 * torch.rand(1, generator=g).item())
    kind = trial % 5
    if kind == 1:
        logits = (logits * 4).round() / 4  # many ties, across bins' edges too
    elif kind == 2:
        logits[torch.rand(batch, width, generator=g) < 0.3] = float("-inf")
    elif kind == 3:
        logits[:, :5] += 20  # a peak, then a flat tail
    elif kind == 4:
        logits = logits * 0.001  # nearly uniform: too crowded for the histogram, sorted instead
    p = 0.01 + 0.98 * torch.rand(1, generator=g).item()
    min_keep = 1 + trial % 3
    ours = stages.top_p(Candidates.from_logits(logits), p, min_keep).dense().isfinite()
    assert torch.equal(ours, _top_p_sorted(logits, p, min_keep))


def test_the_histogram_path_runs_on_a_flat_row():
    """The test above would pass if the histogram were never used: make sure it answers for a typical flat row."""
    from llmsample.sampling import stages

    logits = torch.randn(2, 262_144, generator=torch.Generator().manual_seed(5)) * 3
    log_total = torch.logsumexp(logits, -1, keepdim=True)
    cut = torch.tensor(1 - 0.9, dtype=torch.float32)
    threshold = stages._top_p_threshold_from_histogram(logits, log_total, cut, 1)
    assert threshold is not None
    expected = _top_p_sorted(logits, 0.9, 1)
    assert torch.equal(logits >= threshold, expected)
    assert int(expected.sum(-1).min()) > 5_000  # a large nucleus indeed


def test_remove_below_equals_a_mask():
    from llmsample.sampling.stages import remove_below

    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(1)).round(decimals=1)
    logits[0, :10] = float("-inf")
    threshold = logits[:, 7:8].clone()  # ties with the threshold are kept
    assert torch.equal(remove_below(logits, threshold), logits.masked_fill(logits < threshold, float("-inf")))


@pytest.mark.parametrize("width", [10, 4096])  # a narrow row, and one wide enough for the compacting stages
def test_repetition_penalty_ignores_history_ids_past_the_row(width):
    """A prompt token the logits have no column for (a tokenizer wider than the model's head) penalises nothing;
    the ids inside the row are penalised once each, however often they repeat."""
    logits = torch.randn(2, width, generator=torch.Generator().manual_seed(width))
    inside = torch.tensor([[3, 3, 7, 1], [0, 2, 2, 2]])
    past = torch.tensor([[3, width, 7, 1], [width + 5, 0, 2, 2]])
    c = Candidates.from_logits(logits)
    expected = penalties(c, History(inside), repetition_penalty=1.5).logits
    assert torch.equal(penalties(c, History(torch.cat((inside, past), 1)), repetition_penalty=1.5).logits, expected)
    by_hand = logits.clone()
    for row, ids in enumerate(inside.tolist()):
        for j in set(ids):
            by_hand[row, j] = by_hand[row, j] / 1.5 if by_hand[row, j] > 0 else by_hand[row, j] * 1.5
    assert torch.equal(expected, by_hand)


@pytest.mark.parametrize("width", [10, 4096])
def test_add_bias_ignores_ids_past_the_row_and_leaves_the_input_alone(width):
    from llmsample.sampling.biases import add_bias

    logits = torch.randn(2, width, generator=torch.Generator().manual_seed(width))
    before = logits.clone()
    inside, bias = torch.tensor([[3, 7], [0, 0]]), torch.tensor([[1.5, float("-inf")], [0.25, 0.5]])
    expected = logits.clone()
    expected[0, 3] += 1.5
    expected[0, 7] = float("-inf")
    expected[1, 0] += 0.75  # a repeated id takes each of its biases
    c = Candidates.from_logits(logits)
    assert torch.equal(add_bias(c, inside, bias).logits, expected)
    past = torch.cat((inside, torch.tensor([[width], [width + 3]])), 1)
    assert torch.equal(add_bias(c, past, torch.cat((bias, torch.tensor([[9.0], [9.0]])), 1)).logits, expected)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("trial", range(6))
def test_top_p_after_top_k_reads_the_sorted_survivors_as_they_are(trial):
    """top_k hands over its survivors highest first (``Candidates.descending``), so top_p does not sort them
    again: the same kept set as on the same survivors in another order; temperature keeps the order."""
    g = torch.Generator().manual_seed(trial)
    logits = (torch.randn(3, 40_000, generator=g) * 3).round()  # ties at the k-th and at top_p's cut
    kept = stages.top_k(Candidates.from_logits(logits), 50)
    assert kept.descending and bool((kept.logits[:, 1:] <= kept.logits[:, :-1]).all())
    warm = stages.temperature(kept, 0.7)
    assert warm.descending
    order = torch.randperm(kept.logits.shape[1], generator=g).expand(3, -1)
    shuffled = Candidates(kept.logits.gather(1, order), kept.ids.gather(1, order), kept.vocab_size)
    for c in (kept, warm):
        other = shuffled if c is kept else stages.temperature(shuffled, 0.7)
        assert not other.descending
        assert torch.equal(stages.top_p(c, 0.8).dense(), stages.top_p(other, 0.8).dense())


def test_penalties_keep_finite_logits_finite_and_removed_ones_removed():
    """What lets a chain with penalties skip the emptied-row pass: no penalty overflows a logit to ±inf."""
    logits = torch.tensor([[-3.0e38, 3.0e38, 1.0, float("-inf")]])
    history = History(torch.tensor([[0, 1, 3, 0, 1, 3]]), prompt_len=0)
    out = penalties(Candidates.from_logits(logits), history, 1e30, frequency_penalty=2.0, presence_penalty=2.0)
    assert torch.isfinite(out.logits[0, :3]).all() and out.logits[0, 3] == float("-inf")
    raised = penalties(Candidates.from_logits(logits), history, 1e-30, frequency_penalty=-2.0, presence_penalty=-2.0)
    assert torch.isfinite(raised.logits[0, :3]).all() and raised.logits[0, 3] == float("-inf")

"""Sampler behaviour: selection, seeds, order, trace, edge cases and invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsample.config import SamplingConfig
from llmsample.errors import SamplingError
from llmsample.sampling import Sampler

NO_HISTORY = torch.zeros(1, 0, dtype=torch.long)


def history(batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, 0, dtype=torch.long)


def test_same_seed_same_tokens_and_greedy_ignores_the_seed():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50_000, generator=g) * 2
    s = Sampler(SamplingConfig(do_sample=True, temperature=0.9, top_p=0.95))
    draws = [s.sample(history(4), logits, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    zero = Sampler(SamplingConfig(do_sample=True, temperature=0.0))
    picks = {tuple(zero.sample(history(4), logits, generator=torch.Generator().manual_seed(s)).tolist())
             for s in range(5)}
    assert picks == {tuple(logits.argmax(-1).tolist())}


def test_draws_follow_the_processed_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0]]).expand(20_000, -1)
    s = Sampler(SamplingConfig(do_sample=True, top_k=3, temperature=0.5))
    ids = s.sample(history(20_000), logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=5).float() / ids.numel()
    expected = torch.softmax(s.process(history(1), logits[:1]), -1)[0]
    assert freq[3:].sum() == 0
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_greedy_is_argmax_after_penalties_and_skips_warpers():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    ids = torch.tensor([[0]])
    s = Sampler(SamplingConfig(do_sample=False, repetition_penalty=2.0, top_k=1, temperature=0.3))
    assert s.describe() == "logits -> penalties -> greedy"
    assert s.sample(ids, logits).tolist() == [1]


def test_temperature_zero_process_keeps_one_token():
    out = Sampler(SamplingConfig(do_sample=True, temperature=0.0)).process(NO_HISTORY, torch.tensor([[1.0, 5.0, 5.0]]))
    assert torch.isfinite(out).tolist() == [[False, True, False]]


def test_default_order_truncates_before_temperature_and_hf_order_after():
    # A flat-ish distribution: at T=0.25 temperature-first sharpens it before top_p judges it.
    logits = torch.tensor([[2.0, 1.8, 1.6, 1.4, 1.2, 1.0]])
    last = Sampler(SamplingConfig(do_sample=True, temperature=0.25, top_p=0.6)).process(NO_HISTORY, logits)
    first = Sampler(SamplingConfig(do_sample=True, temperature=0.25, top_p=0.6, order="hf")).process(NO_HISTORY, logits)
    assert torch.isfinite(last).sum() == 3 and torch.isfinite(first).sum() == 2
    assert Sampler(SamplingConfig(do_sample=True, temperature=0.25, top_p=0.6)).describe() == (
        "logits -> top_p -> temperature -> dist"
    )


def test_order_can_leave_a_stage_out_and_says_so():
    cfg = SamplingConfig(do_sample=True, top_k=2, top_p=0.5, order=["top_p", "temperature"])
    assert Sampler(cfg).describe() == "logits -> top_p -> dist"
    assert ("top_k", "the stage 'top_k' is not in order") in cfg.inactive_settings()


def test_trace_reports_each_stage_and_who_removed_what():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    s = Sampler(SamplingConfig(do_sample=True, top_k=3, top_p=0.7, temperature=0.5))
    t = s.trace(NO_HISTORY, logits, top_n=4)
    assert t.stage_names == ("top_k", "top_p", "temperature")
    assert t.token_ids[0].tolist() == [0, 1, 2, 3]
    assert t.removed_by[0] == [None, None, "top_p", "top_k"]
    assert t.kept[0].tolist() == [3, 2, 2]
    raw = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(t.raw_probs[0], raw[:4])
    final = torch.softmax(s.process(NO_HISTORY, logits), -1)[0]
    torch.testing.assert_close(t.final_probs[0], final[:4])
    assert t.stage_probs[0, 0, 3] == 0  # removed by top_k
    torch.testing.assert_close(t.raw_mass_outside, 1 - raw[:4].sum().unsqueeze(0))
    assert t.to_dict()["candidates"][2]["removed_by"] == "top_p"


def test_step_reports_processed_and_raw_probability():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    choice = Sampler(SamplingConfig(do_sample=True, top_k=2)).step(NO_HISTORY, logits, torch.Generator().manual_seed(1))
    token = choice.token_ids.item()
    torch.testing.assert_close(choice.raw_prob, torch.softmax(logits, -1)[0, token].unsqueeze(0))
    torch.testing.assert_close(choice.prob, torch.softmax(logits[:, :2], -1)[0, token].unsqueeze(0))


# ---- edge cases ------------------------------------------------------------------------------------------------


def test_nan_rows_get_a_clear_error():
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 1.0]])
    with pytest.raises(SamplingError, match=r"NaN \(batch row 1\)"):
        Sampler(SamplingConfig(do_sample=True)).sample(history(2), logits)
    with pytest.raises(SamplingError, match=r"\+inf"):
        Sampler(SamplingConfig()).sample(NO_HISTORY, torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(SamplingError, match="every logit is -inf"):
        Sampler(SamplingConfig()).sample(NO_HISTORY, torch.full((1, 3), float("-inf")))


@pytest.mark.parametrize("vocab", [2, 262_144])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(top_k=10**6),
        dict(top_p=1e-9),
        dict(temperature=1e-4),
        dict(temperature=100.0),
        dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, typical_p=0.9, repetition_penalty=1.3),
    ],
)
def test_edge_values_keep_a_valid_distribution(vocab, cfg):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(2, vocab, generator=g) * 5
    logits[0, 0] = float("-inf")
    ids = torch.randint(0, vocab, (2, 8), generator=g)
    s = Sampler(SamplingConfig(do_sample=True, **cfg))
    probs = torch.softmax(s.process(ids, logits), -1)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1).double(), torch.ones(2).double(), atol=1e-4, rtol=0)
    picked = s.sample(ids, logits, generator=torch.Generator().manual_seed(0))
    assert (probs.gather(1, picked[:, None]) > 0).all()


def test_all_candidates_tied():
    logits = torch.zeros(3, 1000)
    s = Sampler(SamplingConfig(do_sample=True, top_k=5, top_p=0.5, min_p=0.5))
    out = s.process(history(3), logits)
    assert torch.isfinite(out).all()  # every token ties with the boundary: all are kept
    ids = s.sample(history(3), logits, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3,)


def test_top_p_that_keeps_one_token():
    logits = torch.tensor([[10.0, 0.0, -1.0]])
    out = Sampler(SamplingConfig(do_sample=True, top_p=0.5)).process(NO_HISTORY, logits)
    assert torch.isfinite(out).tolist() == [[True, False, False]]


# ---- properties ------------------------------------------------------------------------------------------------


@st.composite
def logits_and_history(draw):
    vocab = draw(st.sampled_from([2, 7, 300, 4000]))
    batch = draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(batch, vocab, generator=g) * draw(st.sampled_from([0.01, 1.0, 20.0]))
    return logits, torch.randint(0, vocab, (batch, draw(st.integers(0, 12))), generator=g)


@st.composite
def sampling_configs(draw):
    return SamplingConfig(
        do_sample=True,
        temperature=draw(st.sampled_from([0.0, 0.1, 1.0, 3.0])),
        top_k=draw(st.integers(0, 20)),
        top_p=draw(st.floats(0.001, 1.0)),
        min_p=draw(st.floats(0.0, 1.0)),
        typical_p=draw(st.floats(0.001, 1.0)),
        repetition_penalty=draw(st.floats(0.2, 5.0)),
        frequency_penalty=draw(st.floats(-2.0, 2.0)),
        presence_penalty=draw(st.floats(-2.0, 2.0)),
        no_repeat_ngram_size=draw(st.integers(0, 3)),
        order=draw(st.permutations(list(SamplingConfig().order))),
    )


@settings(max_examples=300, deadline=None)
@given(sampling_configs(), logits_and_history())
def test_any_chain_keeps_a_token_and_sums_to_one(cfg, data):
    logits, ids = data
    out = Sampler(cfg).process(ids, logits, prompt_len=ids.shape[1] // 2)
    assert (torch.isfinite(out).sum(-1) >= 1).all()
    torch.testing.assert_close(torch.softmax(out, -1).sum(-1), torch.ones(len(out)))


@settings(max_examples=150, deadline=None)
@given(logits_and_history(), st.floats(0.01, 1.0), st.floats(0.01, 1.0), st.integers(1, 50), st.integers(1, 50))
def test_smaller_top_p_or_top_k_never_keeps_what_a_larger_one_removes(data, p1, p2, k1, k2):
    logits, ids = data
    small_p, big_p = sorted((p1, p2))
    small_k, big_k = sorted((k1, k2))
    for small, big in [(dict(top_p=small_p), dict(top_p=big_p)), (dict(top_k=small_k), dict(top_k=big_k))]:
        kept_small = torch.isfinite(Sampler(SamplingConfig(do_sample=True, **small)).process(ids, logits))
        kept_big = torch.isfinite(Sampler(SamplingConfig(do_sample=True, **big)).process(ids, logits))
        assert not (kept_small & ~kept_big).any()


@settings(max_examples=100, deadline=None)
@given(logits_and_history())
def test_neutral_values_change_nothing(data):
    logits, ids = data
    neutral = SamplingConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                             repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
    assert Sampler(neutral).describe() == "logits -> dist"
    assert torch.equal(Sampler(neutral).process(ids, logits), logits)

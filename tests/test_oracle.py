"""The sampling core against transformers' own logits processors, chained in transformers' order.

With ``order="hf"`` the removed set must be identical and the probabilities within 1e-5, over random configs,
logits, histories, batch sizes 1–8 and vocab sizes up to 262,144.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llmsample.config import SamplingConfig
from llmsample.sampling import Sampler

lp = pytest.importorskip("transformers.generation.logits_process")

VOCABS = [2, 3, 5, 50, 1000, 2049, 5000, 32768]


def hf_chain(cfg: SamplingConfig) -> list:
    """transformers' processors for ``cfg``, in the order GenerationMixin builds them."""
    chain = []
    keep = cfg.min_tokens_to_keep
    if cfg.sequence_bias:
        chain.append(lp.SequenceBiasLogitsProcessor([[list(k), v] for k, v in cfg.sequence_bias.items()]))
    if cfg.repetition_penalty != 1.0:
        chain.append(lp.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty,
                                                         prompt_ignore_length=cfg.prompt_ignore_length or None))
    if cfg.no_repeat_ngram_size > 0:
        chain.append(lp.NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.bad_words_ids:
        chain.append(lp.NoBadWordsLogitsProcessor([list(w) for w in cfg.bad_words_ids]))
    if cfg.temperature != 1.0:
        chain.append(lp.TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k > 0:
        chain.append(lp.TopKLogitsWarper(cfg.top_k, min_tokens_to_keep=keep))
    if cfg.top_p < 1.0:
        chain.append(lp.TopPLogitsWarper(cfg.top_p, min_tokens_to_keep=keep))
    if cfg.min_p > 0.0:
        chain.append(lp.MinPLogitsWarper(cfg.min_p, min_tokens_to_keep=keep))
    if cfg.typical_p < 1.0:
        chain.append(lp.TypicalLogitsWarper(cfg.typical_p, min_tokens_to_keep=keep))
    if cfg.epsilon_cutoff > 0.0:
        chain.append(lp.EpsilonLogitsWarper(cfg.epsilon_cutoff, min_tokens_to_keep=keep))
    if cfg.eta_cutoff > 0.0:
        chain.append(lp.EtaLogitsWarper(cfg.eta_cutoff, min_tokens_to_keep=keep))
    return chain


def run_hf(cfg: SamplingConfig, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    scores = logits.clone()
    for processor in hf_chain(cfg):
        scores = processor(input_ids, scores)
    return scores


def _scores_before(kind: type, cfg: SamplingConfig, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    scores = logits.clone()
    for processor in hf_chain(cfg):
        if isinstance(processor, kind):
            break
        scores = processor(input_ids, scores)
    return scores


def near_float_boundary(cfg: SamplingConfig, input_ids: torch.Tensor, logits: torch.Tensor) -> bool:
    """True where float32 rounding decides a cut, so that neither implementation is wrong and the case is not
    compared: a token's mass within 1e-6 of top_p's cut (transformers' float32 cumulative sum drifts by ~3e-7
    over 32k tokens; llmsample sums the same float32 probabilities exactly), or two typical_p distances within
    1e-5 of each other at its cut (the entropy's rounding depends on the summation order, and llmsample sums
    over the survivors only), or a protected (min_tokens_to_keep) token whose probability underflows to 0."""
    if cfg.top_p < 1.0:
        scores = _scores_before(lp.TopPLogitsWarper, cfg, input_ids, logits)
        ascending = torch.sort(torch.softmax(scores, -1), dim=-1).values.double().cumsum(-1)
        if ((ascending - (1.0 - cfg.top_p)).abs() < 1e-6).any():
            return True
    if cfg.min_tokens_to_keep > 1:
        # transformers protects the top tokens by probability: where the k-th underflows to 0 it protects any of
        # the tied zeros (often an already removed token); llmsample protects by logit. Checked before every
        # processor: a penalty or the temperature may be what pushes it to 0.
        keep = min(cfg.min_tokens_to_keep, logits.shape[-1])
        scores = logits.clone()
        for processor in [None, *hf_chain(cfg)]:
            if processor is not None:
                scores = processor(input_ids, scores)
            if (torch.topk(torch.softmax(scores.float(), -1), keep, -1).values == 0).any():
                return True
    if cfg.typical_p < 1.0:
        scores = _scores_before(lp.TypicalLogitsWarper, cfg, input_ids, logits)
        log_probs = torch.log_softmax(scores, -1)
        entropy = -(log_probs.exp() * log_probs).nansum(-1, keepdim=True)
        distance, order = torch.sort((-log_probs - entropy).abs(), dim=-1)
        cumulative = scores.gather(1, order).softmax(-1).cumsum(-1)
        last = (cumulative < cfg.typical_p).sum(-1, keepdim=True).clamp(max=scores.shape[-1] - 1)
        at_cut = distance.gather(1, last)
        near = ((distance - at_cut).abs() < 1e-5).sum(-1)  # the cut's own distance counts once
        if (near > 1).any():
            return True
    return False


def assert_same_distribution(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same removed set and probabilities, except our documented rule: a tie at a truncation's boundary is
    kept whole, where transformers keeps whichever tied token its sort put first (float32 logits tie too)."""
    ours_kept, theirs_kept = torch.isfinite(ours), torch.isfinite(theirs)
    assert not (theirs_kept & ~ours_kept).any(), f"we removed {(theirs_kept & ~ours_kept).nonzero().tolist()[:10]}"
    for row, token in (ours_kept & ~theirs_kept).nonzero().tolist():
        boundary = ours[row][theirs_kept[row]].min()
        assert ours[row, token] == boundary, f"an extra token that is not a tie at the boundary: {(row, token)}"
    same = (ours_kept == theirs_kept).all(-1)
    torch.testing.assert_close(torch.softmax(ours[same], -1), torch.softmax(theirs[same], -1), atol=1e-5, rtol=0)


@st.composite
def configs(draw) -> SamplingConfig:
    on = lambda: draw(st.booleans())  # noqa: E731
    return SamplingConfig(
        do_sample=True,
        temperature=draw(st.floats(0.05, 5.0)) if on() else 1.0,
        top_k=draw(st.integers(1, 300)) if on() else 0,
        top_p=draw(st.floats(0.01, 0.99)) if on() else 1.0,
        min_p=draw(st.floats(0.001, 1.0)) if on() else 0.0,
        typical_p=draw(st.floats(0.05, 0.99)) if on() else 1.0,
        repetition_penalty=draw(st.floats(0.5, 3.0)) if on() else 1.0,
        no_repeat_ngram_size=draw(st.integers(1, 3)) if on() else 0,
        epsilon_cutoff=draw(st.floats(1e-5, 0.2)) if draw(st.integers(0, 3)) == 0 else 0.0,
        eta_cutoff=draw(st.floats(1e-5, 0.2)) if draw(st.integers(0, 3)) == 0 else 0.0,
        min_tokens_to_keep=draw(st.sampled_from([1, 1, 2, 5])),
        prompt_ignore_length=draw(st.sampled_from([0, 0, 2])),
        # Token ids below 3 (the histories' small alphabet makes their prefixes match); one or two tokens long,
        # so that no entry is longer than the context (transformers skips those; see the pinned rule).
        sequence_bias={seq: draw(st.floats(-5, 5)) for seq in draw(
            st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=2).map(tuple), max_size=2))}
        if draw(st.integers(0, 3)) == 0 else {},
        bad_words_ids=tuple(draw(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=2).map(tuple),
                                          max_size=2))) if draw(st.integers(0, 3)) == 0 else (),
        order="hf",
    )


@st.composite
def cases(draw):
    cfg = draw(configs())
    vocab = draw(st.sampled_from(VOCABS))
    batch = draw(st.integers(1, 8))
    length = draw(st.integers(2, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0, 10.0]))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * scale
    if draw(st.booleans()):  # some tokens already removed upstream
        dead = torch.rand(batch, vocab, generator=g) < 0.3
        dead[:, 0] = False
        logits = logits.masked_fill(dead, float("-inf"))
    # A small id range makes repeated tokens and n-grams likely.
    id_range = min(vocab, draw(st.sampled_from([3, 10, vocab])))
    input_ids = torch.randint(0, id_range, (batch, length), generator=g)
    return cfg, input_ids, logits


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_matches_transformers_in_hf_order(case):
    cfg, input_ids, logits = case
    assume(logits.shape[-1] > 2 or not (cfg.sequence_bias or cfg.bad_words_ids))  # their ids are 0..2
    try:
        theirs = run_hf(cfg, input_ids, logits)
    except ValueError:  # transformers' eta rejects a row that an earlier ban emptied (NaN): not comparable
        assume(False)
    # transformers turns a row where no-repeat-ngram bans everything into NaN; we keep the best token there.
    assume(bool(torch.isfinite(theirs).any(-1).all()))
    assume(not near_float_boundary(cfg, input_ids, logits))
    # The whole history is prompt here, so prompt_ignore_length counts from its start, as transformers does.
    ours = Sampler(cfg).process(input_ids, logits, prompt_len=input_ids.shape[1])
    assert_same_distribution(ours, theirs)


@pytest.mark.parametrize(
    "settings_",
    [
        dict(temperature=0.7, top_k=50, top_p=0.9),
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=0.7, top_p=0.9, repetition_penalty=1.3),
        dict(min_p=0.05, temperature=1.5),
        dict(typical_p=0.9),
        dict(top_k=200, top_p=0.99, temperature=1.5),
    ],
)
@pytest.mark.parametrize("batch", [1, 8])
def test_matches_transformers_at_full_gemma_vocab(settings_, batch):
    vocab = 262_144
    g = torch.Generator().manual_seed(batch)
    # Heavy-tailed logits like a real LM's: most of the mass on a few hundred tokens.
    logits = torch.randn(batch, vocab, generator=g) * 2.5
    logits[:, :300] += torch.randn(batch, 300, generator=g) * 3 + 8
    input_ids = torch.randint(0, 400, (batch, 64), generator=g)
    cfg = SamplingConfig(do_sample=True, order="hf", **settings_)
    assert_same_distribution(Sampler(cfg).process(input_ids, logits), run_hf(cfg, input_ids, logits))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_match_transformers_in_float32(dtype):
    """Half-precision logits are processed in float32. They tie often; where a tie sits on the top_p boundary
    transformers keeps whichever tied token its sort put first, and we keep all of them (our documented rule)."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 5000, generator=g) * 4).to(dtype)
    input_ids = torch.randint(0, 50, (4, 10), generator=g)
    cfg = SamplingConfig(do_sample=True, order="hf", temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2)
    ours = Sampler(cfg).process(input_ids, logits)
    theirs = run_hf(cfg, input_ids, logits.float())
    assert ours.dtype == torch.float32
    ours_kept, theirs_kept = torch.isfinite(ours), torch.isfinite(theirs)
    assert not (theirs_kept & ~ours_kept).any(), "we removed a token transformers kept"
    for row, token in (ours_kept & ~theirs_kept).nonzero().tolist():
        boundary = ours[row][theirs_kept[row]].min()
        assert ours[row, token] == boundary, "an extra token that is not a tie at the boundary"
    same_rows = (ours_kept == theirs_kept).all(-1)
    assert same_rows.sum() >= 2
    torch.testing.assert_close(
        torch.softmax(ours[same_rows], -1), torch.softmax(theirs[same_rows], -1), atol=1e-5, rtol=0
    )

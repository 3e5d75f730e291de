"""Truncations beyond the seeds: top-n-sigma and XTC (llama.cpp), epsilon and eta sampling (transformers).

Each finds a per-row logit threshold and keeps ``logits >= threshold`` (see ``stages.keep_from``), so the
survivors of a wide row are compacted and ties at the boundary are kept.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from llmsample.sampling import narrow
from llmsample.sampling.candidates import NEG_INF, Candidates
from llmsample.sampling.stages import (SMALL_ROW, History, Stage, at_least, fast_topk, keep_from, kth_logit,
                                       protect, quick_logsumexp, row_finite, sync_free)


def top_n_sigma(c: Candidates, n: float, min_keep: int = 1, row_max: Optional[torch.Tensor] = None) -> Candidates:
    """Keep logits ≥ max − n·σ, σ the (population) standard deviation of the finite logits. Neutral: ≤ 0.
    ``row_max``: the rows' largest logits, when the caller knows them.

    >>> top_n_sigma(Candidates.from_logits(torch.tensor([[0.0, 1.0, 2.0, 3.0]])), 1.0).dense()
    tensor([[-inf, -inf, 2., 3.]])
    """
    logits = c.logits
    if n <= 0.0 or logits.shape[-1] <= 1:
        return c
    # σ as a vector norm: one fused pass over the deviations (torch.std is ~15x slower on a batch of wide rows).
    if row_finite(logits):  # nothing removed yet (raw logits)
        deviation = logits - logits.mean(-1, keepdim=True)
        count = torch.tensor(float(logits.shape[-1]))
    else:
        finite = torch.isfinite(logits)
        count = finite.sum(-1, keepdim=True).clamp(min=1).to(logits.dtype)
        mean = torch.where(finite, logits, torch.zeros_like(logits)).sum(-1, keepdim=True) / count
        deviation = torch.where(finite, logits - mean, torch.zeros_like(logits))
    sigma = torch.linalg.vector_norm(deviation, dim=-1, keepdim=True) / count.sqrt()
    if row_max is None:
        row_max = logits.amax(-1, keepdim=True)
    threshold = row_max - n * sigma
    return keep_from(c, protect(c, threshold, min_keep, row_max))


def xtc(c: Candidates, history: History, probability: float, threshold: float, min_keep: int = 1) -> Candidates:
    """Exclude Top Choices (llama.cpp): with ``probability``, a row whose tokens at or above ``threshold``
    number two or more loses all of them but the least likely (ties with it stay), if at least ``min_keep``
    tokens remain. Neutral: probability 0, or a threshold above 0.5.

    Whether each row fired is drawn from ``history.generator`` and recorded in ``history.record["xtc"]``.

    >>> h = History(torch.tensor([[0]]))
    >>> xtc(Candidates.from_logits(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()), h, 1.0, 0.1).dense().exp()
    tensor([[0.0000, 0.0000, 0.1500, 0.0500]])
    """
    logits = c.logits
    batch, width = logits.shape
    if probability <= 0.0 or threshold > 0.5 or width < 2:
        return c
    if history.replay is not None and "xtc" in history.replay:
        fired = history.replay["xtc"].to(logits.device)
    else:
        chance = torch.rand(batch, generator=history.generator, device=logits.device)
        fired = chance <= probability
    history.record["xtc"] = fired
    # At most 1/threshold tokens can reach the threshold: a small window holds them all.
    window = width if threshold <= 0.0 else min(width, int(1.0 / threshold) + 1)
    values, columns = fast_topk(logits, window)
    log_total = _xtc_log_total(logits, history.log_total(c), values, threshold)
    # a prefix of the sorted window; a removed token (−inf) is not a candidate, even at threshold 0 (llama.cpp's
    # list holds only the tokens still in the running)
    above = ((values - log_total).exp() >= threshold) & (values > NEG_INF)
    count = above.sum(-1, keepdim=True)
    cut = values.gather(1, (count - 1).clamp(min=0))  # the least likely token at or above the threshold
    acts = fired.unsqueeze(-1) & (count >= 2)
    if min_keep > 1:  # with one to keep, the least likely qualifying token always remains
        alive = torch.isfinite(logits).sum(-1, keepdim=True)
        acts &= alive - (count - 1) >= min_keep
    # Only tokens inside the window can be above the cut: remove them there, not with a full-row mask.
    removed = acts & (values > cut)
    return c.with_logits(logits.scatter(1, columns, values.masked_fill(removed, NEG_INF)))


# How far (in log-probability, plus four float32 spacings of the normaliser) a quick normaliser may put a token
# from XTC's threshold before the exact one decides it: the quick ones are within ≈1e-6 of torch.logsumexp.
XTC_MARGIN = 1e-5


def _xtc_log_total(logits: torch.Tensor, quick: Optional[torch.Tensor], values: torch.Tensor,
                   threshold: float) -> torch.Tensor:
    """XTC's normaliser: ``torch.logsumexp`` of the rows, or, off a sync-free step, the quick one (``quick``: what
    the history knows, else ``quick_logsumexp``: one fused softmax where logsumexp takes two exponential passes)
    wherever no window value lies within ``XTC_MARGIN`` of the threshold, so that the tokens it finds at or above
    the threshold are the ones the exact normaliser finds."""
    if sync_free() or threshold <= 0.0 or logits.shape[-1] <= SMALL_ROW:
        return torch.logsumexp(logits, dim=-1, keepdim=True)
    if quick is None:
        quick = quick_logsumexp(logits)
    spacing = torch.nextafter(quick, torch.full_like(quick, math.inf)) - quick
    gap = (values - quick - math.log(threshold)).abs_()
    if bool((gap > XTC_MARGIN + 4 * spacing).all()):
        return quick
    return torch.logsumexp(logits, dim=-1, keepdim=True)


def _cutoff(c: Candidates, probs: torch.Tensor, probability_floor: torch.Tensor, min_keep: int) -> Candidates:
    """Keep tokens whose probability (``probs``, the row's softmax) is ≥ the floor (``[batch, 1]``), or whose logit
    reaches the ``min_keep``-th largest (ties kept). Compared in probability space, as transformers does, so the
    boundary rounds the same way.

    A wide row whose survivors are few is compacted (``stages.at_least``: only the chunks holding survivors are
    read), its columns in vocabulary order, so the draw walks them in the order it walks the dense row and a seed
    picks the same token.
    """
    logits = c.logits
    if min_keep <= 1 and logits.shape[-1] > SMALL_ROW and not sync_free():
        found = at_least(probs, probability_floor)
        if found is not None:
            return _take_found(c, *found)
    kept = probs >= probability_floor
    kept |= logits >= (kth_logit(c, min_keep) if min_keep > 1 else logits.amax(-1, keepdim=True))
    return c.with_logits(logits.masked_fill(~kept, NEG_INF))


def _take_found(c: Candidates, columns: torch.Tensor, found: torch.Tensor) -> Candidates:
    """``c`` compacted to what ``at_least`` found (``found``: its values, −inf where a row's list was padded)."""
    values = c.logits.gather(1, columns)
    if columns.shape[0] > 1:
        values = values.masked_fill(torch.isneginf(found), NEG_INF)
    return c.take(columns, values)


# How far an engine's normaliser (RowStats: float sums of 128 terms added in double) can lie from the exact one, in
# float32 spacings.
ENGINE_NORMALISER_SPACINGS = 128


def _softmax_margin(width: int) -> float:
    """How far, in log-probability, a float32 softmax's value can lie from the one an engine's normaliser gives."""
    return (narrow.softmax_spacings(width) + ENGINE_NORMALISER_SPACINGS) * narrow.FLOAT32_SPACING


def _cut_from_listed(c: Candidates, stats: Any, log_floor: list[float], margin: float) -> Optional[Candidates]:
    """Keep the tokens whose probability reaches ``exp(log_floor[row])``, decided in logit space from an engine's
    ``RowStats`` of the raw row ``c``: its normaliser and its sorted list of highest logits, so that nothing reads
    the row. None (the caller cuts the plain way) unless every survivor is in the list, some survive in every row,
    and no listed logit lies within ``margin`` of the cut, where a float32 softmax's rounding could decide it.
    Survivors come in vocabulary order, as ``_cutoff`` gives them.
    """
    if stats.top_values is None:
        return None
    listed = stats.top_values.tolist()  # a few hundred numbers a row: the decisions below are a bisection each
    counts = []
    for row, (values, log_total, floor) in enumerate(zip(listed, stats.log_total.flatten().tolist(), log_floor)):
        cut = log_total + floor  # log p >= floor  <=>  logit >= cut
        if values[-1] >= cut - margin:  # the list may end before the survivors do
            return None
        count = narrow.reaching(values, cut)
        if count == 0 or abs(values[count - 1] - cut) <= margin or abs(values[count] - cut) <= margin:
            return None
        counts.append(count)
    widest = max(counts)
    rows = []  # each row's survivors in vocabulary order; a shorter row's extra columns removed
    for values, columns, count in zip(listed, stats.top_columns[:, :widest].tolist(), counts):
        rows.append(sorted(zip(columns, values[:count] + [NEG_INF] * (widest - count))))
    columns = narrow.as_tensor([[column for column, _ in row] for row in rows], torch.long, c.logits.device)
    return c.take(columns, narrow.as_tensor([[value for _, value in row] for row in rows], device=c.logits.device))


def epsilon(c: Candidates, eps: float, min_keep: int = 1, stats: Any = None) -> Candidates:
    """transformers' EpsilonLogitsWarper: remove tokens with p < ε, keeping the top ``min_keep``. Neutral: 0.

    ``stats``: the engine's ``RowStats`` of ``c`` (the raw row), when it has them; the cut is then found from its
    list of highest logits where that decides it exactly.

    >>> epsilon(Candidates.from_logits(torch.tensor([[0.6, 0.35, 0.05]]).log()), 0.1).dense().isfinite()
    tensor([[ True,  True, False]])
    """
    if eps <= 0.0:
        return c
    if stats is not None and min_keep <= 1:
        log_floor = [math.log(eps)] * c.logits.shape[0]
        found = _cut_from_listed(c, stats, log_floor, _softmax_margin(c.logits.shape[-1]))
        if found is not None:
            return found
    floor = torch.full((c.logits.shape[0], 1), eps, dtype=c.logits.dtype, device=c.logits.device)
    return _cutoff(c, torch.softmax(c.logits, dim=-1), floor, min_keep)


# eta's quick entropy differs from the plain computation by float32 rounding: its normaliser is rounded apart by up
# to a float32 spacing of the normaliser, and the rest measured ≤ 3e-6 nats on 262,144-wide rows (the floor moves
# by as much, relatively). Where a token's probability lies within this margin plus four such spacings of the
# floor, relatively, the floor is computed the plain way, so the kept set is the plain computation's.
ETA_FLOOR_MARGIN = 1e-5


def eta(c: Candidates, eps: float, min_keep: int = 1, stats: Any = None) -> Candidates:
    """transformers' EtaLogitsWarper: remove tokens with p < min(η, √η·e^(−H)), H the row's entropy in nats.
    Neutral: 0.

    ``stats``: the engine's ``RowStats`` of ``c`` (the raw row), when it has them; the cut is then found from its
    entropy, normaliser and list of highest logits where that decides it exactly.

    >>> eta(Candidates.from_logits(torch.tensor([[0.9, 0.09, 0.01]]).log()), 0.05).dense().isfinite()
    tensor([[ True,  True, False]])
    """
    if eps <= 0.0:
        return c
    logits = c.logits
    if stats is not None and stats.entropy is not None and min_keep <= 1:
        log_floor = [min(math.log(eps), 0.5 * math.log(eps) - entropy) for entropy in stats.entropy.tolist()]
        # the floor's own rounding (see ETA_FLOOR_MARGIN) on top of the softmax's
        found = _cut_from_listed(c, stats, log_floor, _softmax_margin(logits.shape[-1]) + 2 * ETA_FLOOR_MARGIN)
        if found is not None:
            return found
    probs = torch.softmax(logits, dim=-1)  # the cut compares these, and the entropy weighs by them
    floor = None
    if logits.shape[-1] > SMALL_ROW and not sync_free():
        log_total = quick_logsumexp(logits, probs)
        floor = _eta_floor(eps, logits, probs, log_total)
        spacing = torch.nextafter(log_total, torch.full_like(log_total, math.inf)) - log_total
        margin = floor * (ETA_FLOOR_MARGIN + 4 * spacing)
        if not bool(torch.isfinite(margin).all()):  # a row with nothing finite: the plain way
            floor = None
        else:
            # Everything within the margin of the floor, and above it, sits in the chunks at_least reads: when
            # none of what it finds is that close, the floor cuts where the plain one would, and all it found stays.
            found = at_least(probs, floor - margin) if min_keep <= 1 else None
            if found is not None:
                near = ((found[1] - floor).abs_() <= margin).any()
            else:  # many survivors (or none): every probability's distance to the floor
                near = (torch.sub(probs, floor).abs_().amin(-1, keepdim=True) <= margin).any()
            if found is not None and not bool(near):
                return _take_found(c, *found)
            if bool(near):  # a token this close to the floor: the plain way
                floor = None
    if floor is None:
        floor = _eta_floor(eps, logits, probs, logits.logsumexp(-1, keepdim=True))
    return _cutoff(c, probs, floor, min_keep)


def _eta_floor(eps: float, logits: torch.Tensor, probs: torch.Tensor, log_total: torch.Tensor) -> torch.Tensor:
    """min(η, √η·e^(−H)), the entropy H as torch's Categorical computes it (what transformers uses), so the floor
    rounds the same way."""
    log_probs = torch.sub(logits, log_total).clamp_(min=torch.finfo(logits.dtype).min)
    entropy = -log_probs.mul_(probs).sum(-1, keepdim=True)
    return torch.minimum(torch.tensor(eps, device=entropy.device), math.sqrt(eps) * torch.exp(-entropy))


def top_n_sigma_stage(cfg: Any) -> Stage:
    return lambda c, h: top_n_sigma(c, cfg.top_n_sigma, cfg.min_tokens_to_keep, h.row_max(c))


def xtc_stage(cfg: Any) -> Stage:
    return lambda c, h: xtc(c, h, cfg.xtc_probability, cfg.xtc_threshold, cfg.min_tokens_to_keep)


def epsilon_stage(cfg: Any) -> Stage:
    return lambda c, h: epsilon(c, cfg.epsilon_cutoff, cfg.min_tokens_to_keep, h.stats(c))


def eta_stage(cfg: Any) -> Stage:
    return lambda c, h: eta(c, cfg.eta_cutoff, cfg.min_tokens_to_keep, h.stats(c))

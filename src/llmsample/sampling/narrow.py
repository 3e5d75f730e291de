"""A step's last decisions on a narrow row, made on the host in float64.

Once the survivors are a few hundred numbers, each small torch operation (a cumulative sum, a search, a gather)
costs more in dispatch than in arithmetic, and in the decode loop each kind of operation is cold after the model's
step. So the draw, top_p's count and a repetition penalty's changed logits are computed here, in plain Python over
the numbers read back once. Each decision is the one the tensor path makes: where a float32 rounding of the tensor
path could tip it (the number compared lies within a stated margin of the edge), the caller is told to take the
tensor path instead, so a seed picks the same token either way; the penalty's float32 arithmetic is reproduced
exactly.
"""

from __future__ import annotations

import array
import bisect
import itertools
import math
import operator
from typing import Any, Optional

import torch

# Rows up to this many values in all are decided here: plain Python takes 0.1–0.2 µs a value, about what the
# dozen small kernels it replaces take together (≈30 µs warm, more in the decode loop) at 150–250 values.
HOST_LIMIT = 256
# A repetition penalty's history is read back up to this many ids (its changed logits and the statistics derived
# from them: ≈0.16 ms at 64 ids, ≈0.3 at 256, ≈1 at 1,024), which spares top_p a pass over the row (0.5–0.7 ms).
PENALTY_HOST_LIMIT = 1024

FLOAT32_SPACING = 2.0**-24
SOFTMAX_LANES = 8


def softmax_spacings(width: int) -> float:
    """How many float32 spacings, relatively, a probability from torch's float32 CPU softmax over ``width`` values
    can lie from the exact one: the kernel sums the exponentials in at least 8 vector lanes, each in order (width/8,
    then 8 to add the lanes), and rounds the exponential and the scaling (8 more, generously)."""
    return width / SOFTMAX_LANES + 8 + 8


def _draw_margin(width: int) -> float:
    """How far, relative to the total, torch's float32 softmax and cumulative sum can put a row's cumulative
    probability from the exact one: each probability within ``softmax_spacings``, the sum's and the draw's
    roundings a few spacings more; doubled, generously."""
    return 2 * (softmax_spacings(width) + 4) * FLOAT32_SPACING


def draw(rows: list[list[float]], uniforms: list[float],
         entropy: bool = True) -> Optional[list[tuple[int, float, float]]]:
    """What ``sampler.draw`` picks for these rows' logits given its uniform numbers, and the picked token's
    probability and the row's entropy (nats; NaN unless ``entropy``): ``(column, probability, entropy)`` per row,
    or None where a rounding of the tensor path could move the pick (the uniform number lies within the margin of
    an interval's edge).

    >>> draw([[0.0, 0.0, float("-inf")]], [0.25])
    [(0, 0.5, 0.6931471805599453)]
    """
    picked = []
    for values, u in zip(rows, uniforms):
        top = max(values)
        if not math.isfinite(top):
            return None
        shifted = list(map((-top).__add__, values))
        weights = list(map(math.exp, shifted))  # exp(−inf) is 0: a removed token's interval is empty
        cdf = list(itertools.accumulate(weights))
        total = cdf[-1]
        target = u * total
        margin = _draw_margin(len(values)) * total
        column = bisect.bisect_right(cdf, target)  # searchsorted(right=True): the first interval ending past it
        if target >= total - margin or cdf[column] - target <= margin or (column and target - cdf[column - 1] <= margin):
            return None
        spread = math.nan
        if entropy:  # H = log S − Σ w·(v − top) / S, a removed token (weight 0) counting nothing
            if min(shifted) == -math.inf:
                spread = math.fsum(w * s for w, s in zip(weights, shifted) if w > 0.0)
            else:
                spread = math.fsum(map(operator.mul, weights, shifted))
            spread = math.log(total) - spread / total
        picked.append((column, weights[column] / total, spread))
    return picked


def _float32_above(x: float) -> float:
    """The float32 number after ``x``, a positive normal float32 number."""
    return x + math.ldexp(1.0, math.frexp(x)[1] - 24)


def reaching(values: list[float], x: float) -> int:
    """How many of ``values`` (highest first) are at least ``x``.

    >>> reaching([3.0, 2.0, 2.0, 1.0], 2.0)
    3
    """
    return bisect.bisect_right(values, -x, key=operator.neg)


def top_p_count(rows: list[list[float]], log_totals: list[float], cut: float) -> Optional[list[int]]:
    """How many of each row's highest logits (``rows``: sorted, highest first) ``stages.top_p``'s window keeps
    before ``min_keep``: the count of tokens j with fl32(1 − mass above j) > ``cut`` (1 − p in float32), the masses
    from ``log_totals``. None where float32 rounding, or top_p's own 1e-5 band, could decide a token (the caller
    then computes the window the tensor way), or where the window ends before the cut.

    The tensor path takes each probability as a float32 exponential of a float32 difference; here in float64, so
    the masses differ by at most the mass times (the largest |logit − log total| + 4) float32 spacings.
    """
    cut_up = _float32_above(cut)
    counts = []
    for values, log_total in zip(rows, log_totals):
        error_scale = (abs(values[-1] - log_total) + abs(values[0] - log_total) + 4) * FLOAT32_SPACING
        above = 0.0
        count = None
        for j, value in enumerate(values):
            slack = above * error_scale + 1e-12
            if 1.0 - 1e-5 - above - slack >= cut_up:  # kept in the tensor path's low and high counts alike
                above += math.exp(value - log_total)
                continue
            if 1.0 + 1e-5 - above + slack <= cut:  # removed in both
                count = j
                break
            return None  # within the band: the tensor path settles it
        if count is None:  # every listed token kept: the window ends before the cut
            return None
        counts.append(count)
    return counts


def top_p_sorted_count(rows: list[list[float]], cut: float,
                       log_totals: Optional[list[float]] = None) -> Optional[list[int]]:
    """How many of each narrow row's logits (``rows``: each sorted, highest first) ``stages.top_p``'s sorted path
    keeps before ``min_keep``: the count of tokens j with fl32(mass from j down) > ``cut``, the probabilities
    normalised by ``log_totals`` (else by the row's own logsumexp, as that path computes it in float32). None
    where the tensor path's float32 rounding could decide a token.

    The tensor path's probabilities are float32 exponentials of float32 differences from a float32 normaliser:
    each within (|logit − log total| + |log total| + the row's width + 8) float32 spacings of the exact one,
    relatively; a decision is taken here only where the mass lies further than that from the cut.
    """
    cut_up = _float32_above(cut)
    counts = []
    for r, values in enumerate(rows):
        finite = [v for v in values if v != -math.inf]
        if not finite or not all(math.isfinite(v) for v in finite):
            return None
        top = finite[0]
        log_total = log_totals[r] if log_totals is not None else top + math.log(math.fsum(math.exp(v - top)
                                                                                         for v in finite))
        error = (max(abs(finite[-1] - log_total), abs(top - log_total)) + abs(log_total) + len(values) + 8)
        error *= FLOAT32_SPACING
        probs = [math.exp(v - log_total) for v in values]
        from_here = list(itertools.accumulate(reversed(probs)))[::-1]  # the mass from token j down
        count = 0
        for mass in from_here:
            if mass * (1.0 - error) >= cut_up:
                count += 1
            elif mass * (1.0 + error) <= cut:
                break
            else:
                return None
        counts.append(count)
    return counts


FLOAT32_MAX = 3.4028234663852886e38


def repetition(rows: list[list[float]], penalty: float) -> list[list[float]]:
    """``stages._repetition`` on float32 numbers read back: ℓ > 0 → ℓ/r, else ℓ·r, in float32 (r rounded to
    float32 as torch rounds a Python number it divides a float32 tensor by), a finite logit kept finite.

    Float64 arithmetic rounded once to float32 is float32's own: a product of two float32 numbers is exact in
    float64, and a quotient rounded to float64 first still rounds to float32 correctly (53 ≥ 2·24 + 2 bits).

    >>> repetition([[2.0, -1.0, float("-inf")]], 2.0)
    [[1.0, -2.0, -inf]]
    """
    factor = array.array("f", [penalty])[0]
    out = []
    for row in rows:
        changed = [v / factor if v > 0 else v * factor for v in row]
        out.append(array.array("f", [min(max(x, -FLOAT32_MAX), FLOAT32_MAX) if math.isfinite(v) else x
                                     for x, v in zip(changed, row)]).tolist())
    return out


def as_tensor(rows: list[list[Any]], dtype: torch.dtype = torch.float32,
              device: Optional[torch.device] = None) -> torch.Tensor:
    """``[len(rows), n]`` tensor of equal-length rows of float32 (or, with ``dtype=torch.long``, int64) numbers,
    through a typed array: a third of ``torch.tensor``'s time on a few hundred Python numbers.

    >>> as_tensor([[1.5, 2.0]])
    tensor([[1.5000, 2.0000]])
    """
    flat = rows[0] if len(rows) == 1 else [x for row in rows for x in row]
    if not flat:
        out = torch.empty((len(rows), 0), dtype=dtype)
    else:
        out = torch.frombuffer(array.array("q" if dtype == torch.long else "f", flat), dtype=dtype)
        out = out.view(len(rows), -1)
    return out if device is None or torch.device(device).type == "cpu" else out.to(device)

"""What an engine may hand the sampler with a step's logits: each row's largest logit and its column, its
log-normaliser, its entropy, its chunks' largest logits, its highest logits in order and whether every row is usable,
computed where the row was written (llmsample's compiled decode kernel), so that the sampler does not pass over the
vocabulary again for them. Without them it computes what it needs itself.
"""

from __future__ import annotations

import bisect
import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch

from llmsample.sampling import narrow
from llmsample.sampling.stages import CHUNK, FIRST_WINDOW

# How many of a row's highest logits an engine lists (decode_kernel.c's STATS_TOP): top_p's first window, and 64
# more, so that the list a repetition penalty over the last 64 tokens leaves (``RowStats.lowered``) still holds it.
TOP = FIRST_WINDOW + 64


@dataclass(frozen=True)
class RowStats:
    """Per row of a ``[batch, vocab]`` logits tensor, as ``RowStats.of`` computes them.

    >>> s = RowStats.of(torch.tensor([[0.0, 2.0, 2.0, -1.0]]))
    >>> s.top.tolist(), s.argmax.tolist(), round(float(s.log_total), 4), round(float(s.entropy), 4)
    ([[2.0]], [1], 2.7817, 0.9739)
    """

    top: torch.Tensor  # [batch, 1] float32: the largest logit; NaN when the row holds one, +inf when it holds +inf
    argmax: torch.Tensor  # [batch] long: the first column holding it
    log_total: torch.Tensor  # [batch, 1] float32: the row's logsumexp, within float32 rounding
    entropy: Optional[torch.Tensor]  # [batch] float32: the entropy (nats) of the row's softmax (None: not known)
    # [batch, chunks]: the largest logit of each whole chunk of columns, in order (``stages.fast_topk`` reads them
    # where its chunks are those: ``CHUNK`` columns each)
    chunk_maxima: Optional[torch.Tensor] = None
    finite: Optional[bool] = None  # every row's largest logit is finite (None: not known without reading it back)
    # [batch, n] each: the row's n highest logits, highest first, ties in column order (a stable descending sort's
    # first n), and their columns; n = min(TOP, vocab). Unspecified for a row whose largest logit is not finite.
    top_values: Optional[torch.Tensor] = None
    top_columns: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, logits: torch.Tensor) -> "RowStats":
        """The reference, in float64 (what an engine's own are tested against)."""
        wide = logits.double()
        top = wide.amax(-1, keepdim=True)
        shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        weights = torch.exp(wide - shift)
        total = weights.sum(-1, keepdim=True)
        spread = torch.where(weights > 0, wide - shift, torch.zeros_like(wide))  # 0·(−inf) counts as 0
        entropy = torch.log(total) - (weights * spread).sum(-1, keepdim=True) / total
        batch, width = logits.shape
        chunks = width // CHUNK
        maxima = logits[:, : chunks * CHUNK].reshape(batch, chunks, CHUNK).amax(-1)
        listed, order = torch.sort(logits.float(), dim=-1, descending=True, stable=True)
        n = min(TOP, width)
        return cls(top.float(), logits.argmax(-1), (torch.log(total) + shift).float(), entropy.squeeze(1).float(),
                   maxima.float(), bool(torch.isfinite(top).all()), listed[:, :n].contiguous(),
                   order[:, :n].contiguous())

    def lowered(self, columns: list[list[int]], before: list[list[float]],
                after: list[list[float]]) -> Optional["RowStats"]:
        """The statistics of these rows after the logits at ``columns`` (per row, repeats allowed) went from
        ``before`` to ``after``, each lower or equal (a repetition penalty above 1). None when they cannot be
        derived within float32 rounding.

        The normaliser loses the changed tokens' share of the mass, e^(before − L) − e^(after − L) summed once per
        column in float64; where that leaves less than a quarter of it, the stored normaliser's rounding (≈1e-7,
        relatively) would grow past what top_p's margin allows, and None is returned. The list of highest logits
        keeps its entries still above its last raw value (nothing outside it can have risen past that), sorted
        again (a changed entry that ties an unchanged one follows its old place, not its column). Entropy and
        chunk maxima are not derived. All of it on the host: a few hundred numbers a row.
        """
        if self.top_values is None or self.finite is not True:
            return None
        log_totals, rows, counts = [], [], []
        for ids, old, new, log_total, values, listed_columns in zip(
                columns, before, after, self.log_total.flatten().tolist(), self.top_values.tolist(),
                self.top_columns.tolist()):
            changed = dict(zip(ids, zip(old, new)))  # each column once
            lost = sum(math.exp(b - log_total) - math.exp(a - log_total) for b, a in changed.values())
            if lost > 0.75:
                return None
            log_totals.append(log_total + math.log1p(-lost))
            updated = list(values)
            position = dict(zip(listed_columns, range(len(values))))
            for column, (_, value) in changed.items():
                if column in position:
                    updated[position[column]] = value
            order = sorted(range(len(updated)), key=updated.__getitem__, reverse=True)  # stable, as torch's
            ordered = [updated[i] for i in order]
            rows.append((ordered, [listed_columns[i] for i in order]))
            counts.append(bisect.bisect_left(ordered, -values[-1], key=operator.neg))  # how many lie above it
        listed = min(counts)
        if listed < 1:
            return None
        device = self.top_values.device
        values = narrow.as_tensor([row[:listed] for row, _ in rows], device=device)
        listed_columns = narrow.as_tensor([row[:listed] for _, row in rows], torch.long, device)
        log_total = narrow.as_tensor([[x] for x in log_totals], device=device)
        return RowStats(values[:, :1], listed_columns[:, 0], log_total, None, None, True, values, listed_columns)

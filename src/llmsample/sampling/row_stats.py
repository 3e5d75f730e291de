"""What an engine may hand the sampler with a step's logits: each row's largest logit and its column, its
log-normaliser, its entropy, its chunks' largest logits, its highest logits in order and whether every row is usable,
computed where the row was written (llmsample's compiled decode kernel), so that the sampler does not pass over the
vocabulary again for them. Without them it computes what it needs itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from llmsample.sampling.stages import CHUNK

TOP = 256  # how many of a row's highest logits an engine lists (decode_kernel.c's STATS_TOP)


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
    entropy: torch.Tensor  # [batch] float32: the entropy (nats) of the row's softmax
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

    def highest(self, n: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The rows' ``n`` highest logits and their columns (``[batch, n]`` each, sorted as ``torch.topk`` sorts),
        when the list holds that many; else None."""
        if self.top_values is None or n > self.top_values.shape[1]:
            return None
        return self.top_values[:, :n], self.top_columns[:, :n]

"""What an engine may hand the sampler with a step's logits: each row's largest logit and its column, its
log-normaliser and its entropy, computed where the row was written (llmsample's compiled decode kernel), so that
the sampler does not pass over the vocabulary again for them. Without them it computes what it needs itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

CHUNK_MAXIMA_WIDTH = 256  # the chunks of ``chunk_maxima``: the width ``stages.fast_topk`` reads for a small k


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
    # [batch, vocab // CHUNK_MAXIMA_WIDTH]: the largest logit of each whole chunk of that many columns, in order
    chunk_maxima: Optional[torch.Tensor] = None
    finite: Optional[bool] = None  # every row's largest logit is finite (None: not known without reading it back)

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
        chunks = width // CHUNK_MAXIMA_WIDTH
        maxima = logits[:, : chunks * CHUNK_MAXIMA_WIDTH].reshape(batch, chunks, CHUNK_MAXIMA_WIDTH).amax(-1)
        return cls(top.float(), logits.argmax(-1), (torch.log(total) + shift).float(), entropy.squeeze(1).float(),
                   maxima.float(), bool(torch.isfinite(top).all()))

    @classmethod
    def unpack(cls, packed: torch.Tensor, chunk_maxima: Optional[torch.Tensor] = None,
               finite: Optional[bool] = None) -> "RowStats":
        """From the ``[batch, 4]`` float64 rows an engine writes (top, argmax, log_total, entropy), its chunk
        maxima and whether it found every row's top finite."""
        return cls(packed[:, 0:1].float(), packed[:, 1].long(), packed[:, 2:3].float(), packed[:, 3].float(),
                   chunk_maxima, finite)

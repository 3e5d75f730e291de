"""The value every stage takes and returns: the logits of the tokens still in the running.

A row starts dense (column j is token j). Once a truncation stage has bounded the survivors, the row is
*compacted* to those columns plus their vocabulary ids, so the stages after it work on tens of values instead
of the whole vocabulary. Tokens outside a compacted row are removed (−inf): a stage that only looks at the values
(top_k, top_p, min_p, typical_p, temperature) gives the same answer on either form, and the ones that need ids
(penalties, no-repeat-ngram) map them through ``ids``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Candidates:
    """Logits of the tokens still alive.

    ``logits``: ``[batch, n]`` float32, −inf where removed. ``ids``: ``[batch, n]`` vocabulary ids of the
    columns, or ``None`` when the row is dense (``n == vocab_size``, column j is token j).
    """

    logits: torch.Tensor
    ids: Optional[torch.Tensor]
    vocab_size: int
    # Each row's values are in descending order (a stage that found them sorted says so; a later stage that needs
    # them sorted, top_p, then does not sort again).
    descending: bool = False

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> "Candidates":
        return cls(logits, None, logits.shape[-1])

    @property
    def is_dense(self) -> bool:
        return self.ids is None

    def with_logits(self, logits: torch.Tensor, descending: bool = False) -> "Candidates":
        """Same columns, new values (``descending``: the caller knows each row's are in descending order)."""
        return Candidates(logits, self.ids, self.vocab_size, descending)

    def take(self, columns: torch.Tensor, values: Optional[torch.Tensor] = None,
             descending: bool = False) -> "Candidates":
        """Keep only ``columns`` (``[batch, k]`` indices into the current row); everything else is removed.

        ``values`` may carry the logits at those columns when the caller already has them (from ``topk``);
        ``descending``: the caller knows each row's are in descending order.
        """
        if values is None:
            values = self.logits.gather(-1, columns)
        ids = columns if self.ids is None else self.ids.gather(-1, columns)
        return Candidates(values, ids, self.vocab_size, descending)

    def dense(self) -> torch.Tensor:
        """``[batch, vocab]`` logits, −inf for every removed token."""
        if self.ids is None:
            return self.logits
        out = torch.full(
            (self.logits.shape[0], self.vocab_size), NEG_INF, dtype=self.logits.dtype, device=self.logits.device
        )
        return out.scatter_(-1, self.ids, self.logits)  # in place on our own new tensor: no second copy

    def token_ids(self) -> torch.Tensor:
        """``[batch, n]`` vocabulary ids of the columns."""
        if self.ids is not None:
            return self.ids
        row = torch.arange(self.vocab_size, device=self.logits.device)
        return row.expand(self.logits.shape[0], -1)

    def to_vocab(self, columns: torch.Tensor) -> torch.Tensor:
        """Map column indices ``[batch]`` to vocabulary ids."""
        if self.ids is None:
            return columns
        return self.ids.gather(-1, columns.unsqueeze(-1)).squeeze(-1)

    def alive_count(self) -> torch.Tensor:
        """``[batch]`` number of tokens still in the running."""
        return torch.isfinite(self.logits).sum(-1)

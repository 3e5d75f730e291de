"""The constraint stage: remove every token a JSON schema, grammar, regex or choice forbids at this step.

The grammar itself lives outside the sampling core (``llmsample.grammar`` binds it to a tokenizer with llguidance);
the stage finds it in the sampler's state (``history.state["grammar"]``) and asks it, through one method, which
tokens each row may take next: ``allowed(generated [batch, n] long, width) -> [batch, width] bool``. Each row's
answer depends only on its own generated tokens, so ``-n`` rows, beams and replayed steps need nothing more.

The survivors keep their logits, so their probabilities are the unconstrained ones renormalised. EOS is allowed
only where the text may end (the grammar decides). ``history.record["grammar_cut"]`` gets, per row, the raw
probability mass (model softmax at T=1) of the tokens the grammar forbade.
"""

from __future__ import annotations

from typing import Any

import torch

from llmsample.sampling.candidates import NEG_INF, Candidates
from llmsample.sampling.stages import COMPACT_LIMIT, SMALL_ROW, History, Stage


def constrain(c: Candidates, history: History, allowed: torch.Tensor) -> Candidates:
    """Remove the tokens ``allowed`` (``[batch, vocab]`` bool) forbids. Neutral: everything allowed.

    A row whose earlier stages already removed every allowed token (a ban on the only valid token) keeps the
    allowed tokens, equally likely: the constraint wins over bans, never the other way round. When few tokens are
    allowed (JSON's punctuation, a choice) the rows are compacted to them, so the later stages see only those.

    >>> c = Candidates.from_logits(torch.tensor([[1.0, 2.0, 3.0]]))
    >>> constrain(c, History(torch.zeros(1, 0, dtype=torch.long)), torch.tensor([[True, False, True]])).logits
    tensor([[1., -inf, 3.]])
    """
    counts = allowed.sum(-1)  # [batch]
    widest = int(counts.max())
    columns = None
    if c.is_dense and c.logits.shape[-1] > SMALL_ROW and widest <= COMPACT_LIMIT:
        columns, present = _columns(allowed, counts, widest)
        values = c.logits.gather(1, columns)
        out = c.take(columns, torch.where(present, values, NEG_INF))
    else:
        present = allowed if c.is_dense else allowed.gather(1, c.ids)
        out = c.with_logits(torch.where(present, c.logits, NEG_INF))
    if history.raw_logits is not None:
        raw = history.raw_logits.float()
        kept = raw if columns is None else raw.gather(1, columns)  # the whole row, or its compacted columns
        history.record["grammar_cut"] = _raw_mass_cut(raw, kept, allowed if columns is None else present)
    emptied = torch.isneginf(out.logits.amax(-1, keepdim=True))  # [batch, 1]
    if bool(emptied.any()):
        out = out.with_logits(torch.where(emptied & present, torch.zeros_like(out.logits), out.logits))
    return out


def _columns(allowed: torch.Tensor, counts: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's allowed token ids, left-aligned in ``[batch, width]`` (padding: column 0, ``present`` False)."""
    rows, ids = allowed.nonzero(as_tuple=True)  # row-major: each row's ids in order
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(rows.shape[0], device=allowed.device) - starts[rows]
    columns = torch.zeros(allowed.shape[0], max(width, 1), dtype=torch.long, device=allowed.device)
    columns[rows, slots] = ids
    present = torch.arange(columns.shape[1], device=allowed.device) < counts.unsqueeze(-1)
    return columns, present


def _raw_mass_cut(raw: torch.Tensor, kept: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``[batch]`` Σ softmax(raw) over the forbidden tokens: 1 − e^(lse(allowed) − lse(all)), exact near 0.

    ``kept`` holds the raw logits of the allowed tokens where ``present`` (the whole row, or its compacted columns).
    """
    allowed_mass = torch.logsumexp(torch.where(present, kept, NEG_INF), dim=-1)
    return (-torch.expm1(allowed_mass - torch.logsumexp(raw, dim=-1))).clamp(min=0.0)


def grammar_stage(cfg: Any) -> Stage:
    """The stage for ``cfg``'s constraint; the bound grammar comes with the sampler's state."""

    def stage(c: Candidates, history: History) -> Candidates:
        grammar = history.state.get("grammar")
        if grammar is None:
            raise ValueError("the settings hold a constraint (json_schema, grammar, regex or choice): bind it to the "
                             "model's tokenizer first, Sampler(cfg, state=llmsample.grammar.bind(cfg, tokenizer, "
                             "eos_ids))")
        return constrain(c, history, grammar.allowed(history.generated, c.vocab_size).to(c.logits.device))

    return stage

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
from llmsample.sampling.stages import History, Stage


def constrain(c: Candidates, history: History, allowed: torch.Tensor) -> Candidates:
    """Remove the tokens ``allowed`` (``[batch, vocab]`` bool) forbids. Neutral: everything allowed.

    A row whose earlier stages already removed every allowed token (a ban on the only valid token) keeps the
    allowed tokens, equally likely: the constraint wins over bans, never the other way round.

    >>> c = Candidates.from_logits(torch.tensor([[1.0, 2.0, 3.0]]))
    >>> constrain(c, History(torch.zeros(1, 0, dtype=torch.long)), torch.tensor([[True, False, True]])).logits
    tensor([[1., -inf, 3.]])
    """
    if history.raw_logits is not None:
        raw = torch.log_softmax(history.raw_logits.float(), dim=-1)
        history.record["grammar_cut"] = raw.masked_fill(allowed, NEG_INF).exp().sum(-1)
    keep = allowed if c.is_dense else allowed.gather(1, c.ids)
    out = c.logits.masked_fill(~keep, NEG_INF)
    emptied = torch.isneginf(out.amax(-1, keepdim=True))  # [batch, 1]
    if bool(emptied.any()):
        out = torch.where(emptied & keep, torch.zeros_like(out), out)
    return c.with_logits(out)


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

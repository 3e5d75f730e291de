"""The constraint stage: remove every token a JSON schema, grammar, regex or choice forbids at this step.

The grammar itself lives outside the sampling core (``llmsample.grammar`` binds it to a tokenizer with llguidance);
the stage finds it in the sampler's state (``history.state["grammar"]``) and asks it, through one method, which
tokens each row may take next: ``allowed_bits(generated [batch, n] long) -> [batch, words] int32``, the allowed
set packed 32 tokens to a word (token i is bit i % 32 of word i // 32: llguidance's layout, which it writes
directly, so a step never unpacks a mask it does not need). Each row's answer depends only on its own generated
tokens, so ``-n`` rows, beams and replayed steps need nothing more.

The survivors keep their logits, so their probabilities are the unconstrained ones renormalised. EOS is allowed
only where the text may end (the grammar decides). ``history.record["grammar_cut"]`` gets, per row, the raw
probability mass (model softmax at T=1) of the tokens the grammar forbade.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch

from llmsample.sampling.candidates import NEG_INF, Candidates
from llmsample.sampling.stages import (COMPACT_LIMIT, SMALL_ROW, History, Stage, left_aligned_columns,
                                       quick_logsumexp)

WORD_BITS = 32
_SHIFTS = torch.arange(WORD_BITS, dtype=torch.int32)
# Each byte's 8 bits, lowest first, and how many are set: unpacking is one table lookup per byte.
_BYTE_BITS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool()  # [256, 8]
_BYTE_COUNTS = _BYTE_BITS.sum(-1, dtype=torch.int32)  # [256]


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """``[batch, width]`` bool → ``[batch, ⌈width/32⌉]`` int32, token i in bit i % 32 of word i // 32.

    >>> pack(torch.tensor([[True, False, True]]))
    tensor([[5]], dtype=torch.int32)
    """
    batch, width = allowed.shape
    padded = torch.nn.functional.pad(allowed, (0, -width % WORD_BITS)).view(batch, -1, WORD_BITS)
    words = (padded.long() << _SHIFTS.to(allowed.device).long()).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(bits: torch.Tensor, width: int) -> torch.Tensor:
    """``[batch, words]`` packed int32 → ``[batch, width]`` bool (columns past the words: False).

    >>> unpack(torch.tensor([[0b101]], dtype=torch.int32), 4)
    tensor([[ True, False,  True, False]])
    """
    batch = bits.shape[0]
    if sys.byteorder == "little":  # a word's bytes lowest first: one lookup per byte
        table = _BYTE_BITS.to(bits.device)
        out = table.index_select(0, bits.contiguous().view(torch.uint8).flatten().int()).view(batch, -1)
    else:
        out = ((bits.unsqueeze(-1) >> _SHIFTS.to(bits.device)) & 1).ne(0).reshape(batch, -1)
    have = out.shape[1]
    return out[:, :width] if width <= have else torch.nn.functional.pad(out, (0, width - have), value=False)


def _fit(bits: torch.Tensor, width: int) -> torch.Tensor:
    """``bits`` with no token at or past ``width`` (a tokenizer wider than the model's logits)."""
    words = -(-width // WORD_BITS)
    if bits.shape[1] * WORD_BITS <= width:
        return bits
    bits = bits[:, :words].clone()
    if width % WORD_BITS:
        bits[:, -1] &= (1 << (width % WORD_BITS)) - 1
    return bits


def _counts(bits: torch.Tensor) -> torch.Tensor:
    """``[batch]`` number of set bits per row."""
    if sys.byteorder != "little":
        return unpack(bits, bits.shape[1] * WORD_BITS).sum(-1)
    table = _BYTE_COUNTS.to(bits.device)
    return table.index_select(0, bits.contiguous().view(torch.uint8).flatten().int()).view(bits.shape[0], -1).sum(-1)


def _columns(bits: torch.Tensor, counts: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's allowed token ids in order, left-aligned in ``[batch, width]`` (padding: ids the row does not
    allow, ``present`` False), found from the nonzero words: the row is never unpacked."""
    rows, words = bits.nonzero(as_tuple=True)  # row-major: each row's words in order
    set_bits = ((bits[rows, words].unsqueeze(-1) >> _SHIFTS.to(bits.device)) & 1).nonzero(as_tuple=True)
    rows, ids = rows[set_bits[0]], words[set_bits[0]] * WORD_BITS + set_bits[1]
    return left_aligned_columns(rows, counts, max(width, 1), ids)


def constrain(c: Candidates, history: History, allowed_bits: torch.Tensor) -> Candidates:
    """Remove the tokens ``allowed_bits`` (packed, ``[batch, words]`` int32; see ``pack``) forbids. Neutral:
    everything allowed.

    A row whose earlier stages already removed every allowed token (a ban on the only valid token) keeps the
    allowed tokens, equally likely: the constraint wins over bans, never the other way round. When few tokens are
    allowed (JSON's punctuation, a choice) the rows are compacted to them, so the later stages see only those.

    >>> c = Candidates.from_logits(torch.tensor([[1.0, 2.0, 3.0]]))
    >>> constrain(c, History(torch.zeros(1, 0, dtype=torch.long)), pack(torch.tensor([[True, False, True]]))).logits
    tensor([[1., -inf, 3.]])
    """
    bits = _fit(allowed_bits, c.vocab_size)
    counts = _counts(bits)  # [batch]
    fewest, widest = (int(v) for v in torch.aminmax(counts))
    columns: Optional[torch.Tensor] = None
    allowed: Optional[torch.Tensor] = None
    present: Optional[torch.Tensor] = None  # of out's columns; None: all
    if fewest == c.vocab_size:  # everything allowed: nothing to remove, nothing cut
        out = c
    elif c.is_dense and c.logits.shape[-1] > SMALL_ROW and widest <= COMPACT_LIMIT:
        columns, present = _columns(bits, counts, widest)
        values = c.logits.gather(1, columns)
        out = c.take(columns, torch.where(present, values, NEG_INF))
    else:
        allowed = unpack(bits, c.vocab_size)
        present = allowed if c.is_dense else allowed.gather(1, c.ids)
        out = c.with_logits(torch.where(present, c.logits, NEG_INF))
    if history.raw_logits is not None:
        masked_raw = out.logits if allowed is not None and c.logits is history.raw_logits else None  # same values
        history.record["grammar_cut"] = _raw_mass_cut(history, columns, present, allowed, counts, c.vocab_size,
                                                      masked_raw)
    emptied = torch.isneginf(out.logits.amax(-1, keepdim=True))  # [batch, 1]
    if bool(emptied.any()):
        revived = emptied if present is None else emptied & present
        out = out.with_logits(torch.where(revived, torch.zeros_like(out.logits), out.logits))
    return out


def _raw_mass_cut(history: History, columns: Optional[torch.Tensor], present: Optional[torch.Tensor],
                  allowed: Optional[torch.Tensor], counts: torch.Tensor, vocab_size: int,
                  masked_raw: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[batch]`` Σ softmax(raw) over the forbidden tokens: 1 − e^(lse(allowed) − lse(all)), exact near 0.

    The allowed tokens are ``columns`` (compacted; ``present`` says which slots hold one), or the ``allowed``
    mask, or (both ``None``) every token. The normalisers are ``quick_logsumexp``'s (float32 rounding, ≈1e-6: a
    number to report); the whole row's is the step's own, which the raw probability of its token reads too.
    ``masked_raw``: the raw row with the forbidden tokens removed, when the caller has it (the stage's output, when
    no stage before it changed the row).
    """
    raw = history.raw_logits.float()
    if columns is None and allowed is None:
        return torch.zeros(raw.shape[0], device=raw.device)
    if columns is not None:
        allowed_mass = torch.logsumexp(torch.where(present, raw.gather(1, columns), NEG_INF), dim=-1, keepdim=True)
    else:
        allowed_mass = quick_logsumexp(masked_raw if masked_raw is not None else torch.where(allowed, raw, NEG_INF))
    cut = (-torch.expm1(allowed_mass - history.raw_log_normaliser(quick=True))).clamp(min=0.0)
    # A row that allows everything cut nothing, whatever the rounding of two normalisers says.
    return torch.where(counts == vocab_size, 0.0, cut.squeeze(1))


def grammar_stage(cfg: Any) -> Stage:
    """The stage for ``cfg``'s constraint; the bound grammar comes with the sampler's state."""

    def stage(c: Candidates, history: History) -> Candidates:
        grammar = history.state.get("grammar")
        if grammar is None:
            raise ValueError("the settings hold a constraint (json_schema, grammar, regex or choice): bind it to the "
                             "model's tokenizer first, Sampler(cfg, state=llmsample.grammar.bind(cfg, tokenizer, "
                             "eos_ids))")
        return constrain(c, history, grammar.allowed_bits(history.generated).to(c.logits.device))

    return stage

"""Fixed biases on chosen tokens: ``logit_bias`` (OpenAI/vLLM), ``sequence_bias`` and ``bad_words_ids``
(transformers' SequenceBias / NoBadWords processors).

A multi-token entry acts on its last token only where the tokens before it end the sequence; unlike
transformers, that includes a prefix that is the whole sequence (DESIGN.md §4). Bans hold even when the prefix
lies in the prompt.
"""

from __future__ import annotations

from typing import Any

import torch

from llmsample.sampling.candidates import NEG_INF, Candidates
from llmsample.sampling.stages import History, Stage


def add_bias(c: Candidates, token_ids: torch.Tensor, bias: torch.Tensor) -> Candidates:
    """Add ``bias`` (``[batch, n]``) to the logits of ``token_ids`` (``[batch, n]`` vocabulary ids).

    Ids past the vocabulary are ignored; −inf removes a token; the input is not modified.

    >>> c = Candidates.from_logits(torch.zeros(1, 3))
    >>> add_bias(c, torch.tensor([[2, 0]]), torch.tensor([[-100.0, 1.5]])).logits
    tensor([[   1.5000,    0.0000, -100.0000]])
    """
    vocab = c.vocab_size
    if c.is_dense:  # an id past the vocabulary adds 0 to the last column: one copy of the row, nothing padded
        inside = token_ids < vocab
        bias = torch.where(inside, bias.to(c.logits.dtype), 0.0)
        return c.with_logits(c.logits.scatter_add(1, token_ids.clamp(max=vocab - 1), bias))
    dense_bias = torch.zeros(c.logits.shape[0], vocab + 1, dtype=c.logits.dtype, device=c.logits.device)
    dense_bias.scatter_add_(1, token_ids.clamp(max=vocab), bias.to(dense_bias.dtype))
    return c.with_logits(c.logits + dense_bias.gather(1, c.ids))


def logit_bias(c: Candidates, bias: dict[int, float]) -> Candidates:
    """Add each token's bias to its logit. Neutral: ``{}``.

    >>> logit_bias(Candidates.from_logits(torch.zeros(1, 3)), {1: float("-inf"), 2: 2.0}).logits
    tensor([[0., -inf, 2.]])
    """
    if not bias:
        return c
    batch, device = c.logits.shape[0], c.logits.device
    ids = torch.tensor(list(bias), dtype=torch.long, device=device).expand(batch, -1)
    values = torch.tensor(list(bias.values()), dtype=torch.float32, device=device).expand(batch, -1)
    return add_bias(c, ids, values)


def sequence_bias(c: Candidates, history: History, bias: dict[tuple[int, ...], float]) -> Candidates:
    """transformers' SequenceBias: a one-token entry always applies; a longer one applies to its last token in
    the rows whose sequence ends with the entry's other tokens. Neutral: ``{}``.

    >>> hist = History(torch.tensor([[4, 1], [4, 2]]))
    >>> sequence_bias(Candidates.from_logits(torch.zeros(2, 5)), hist, {(1, 3): -2.0}).logits
    tensor([[ 0.,  0.,  0., -2.,  0.],
            [ 0.,  0.,  0.,  0.,  0.]])
    """
    if not bias:
        return c
    ids = history.input_ids
    batch, length = ids.shape
    device = c.logits.device
    targets, values = [], []
    for sequence, value in bias.items():
        prefix = sequence[:-1]
        if len(prefix) > length:
            continue
        if prefix:
            wanted = torch.tensor(prefix, dtype=ids.dtype, device=ids.device)
            matches = (ids[:, length - len(prefix) :] == wanted).all(-1).to(device)
        else:
            matches = torch.ones(batch, dtype=torch.bool, device=device)
        targets.append(torch.full((batch,), sequence[-1], dtype=torch.long, device=device))
        values.append(torch.where(matches, torch.tensor(value, device=device), torch.tensor(0.0, device=device)))
    if not targets:
        return c
    return add_bias(c, torch.stack(targets, 1), torch.stack(values, 1))


def bad_words(c: Candidates, history: History, sequences: tuple[tuple[int, ...], ...]) -> Candidates:
    """transformers' NoBadWords: ban the last token of each sequence where the rest ends the text. Neutral: ``()``.

    >>> bad_words(Candidates.from_logits(torch.zeros(1, 3)), History(torch.tensor([[0]])), ((0, 2), (1,))).logits
    tensor([[0., -inf, -inf]])
    """
    return sequence_bias(c, history, {sequence: NEG_INF for sequence in sequences})


def logit_bias_stage(cfg: Any) -> Stage:
    return lambda c, h: logit_bias(c, cfg.logit_bias)


def sequence_bias_stage(cfg: Any) -> Stage:
    return lambda c, h: sequence_bias(c, h, cfg.sequence_bias)


def bad_words_stage(cfg: Any) -> Stage:
    return lambda c, h: bad_words(c, h, cfg.bad_words_ids)

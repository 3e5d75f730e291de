"""DRY ("Don't Repeat Yourself", llama.cpp's sampler): penalise the tokens that would extend a repeat.

For each earlier place in the window whose preceding tokens match the end of the text for n ≥ allowed_length
tokens, the token that followed there would extend the repeat to n + 1; it loses
``multiplier · base^(n − allowed_length)`` from its logit (the largest n counts). A sequence breaker resets the
match: no repeat reaches back past the latest breaker, and a token that is a breaker on its own is never
penalised. The window includes the prompt. The exponent is capped where ``base^e`` would overflow float32; a
penalty that still overflows removes the token, as in llama.cpp.

Match lengths are found with a polynomial hash of the window and a binary search per candidate place, all
vectorised: O(L log L) per row and step, no Python loop over the text.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from llmsample.sampling.candidates import Candidates
from llmsample.sampling.stages import History, Stage

FLOAT_MAX_LOG = 88.7228391  # ln of float32's largest value: llama.cpp's exponent cap
MODULI = (2_147_483_647, 2_147_483_629)  # two primes below 2**31: products stay inside int64
BASE = 1_000_003
_POWERS: dict[int, torch.Tensor] = {}


def _powers(length: int) -> torch.Tensor:
    """``[len(MODULI), length]`` BASE**j mod each modulus (grown and kept)."""
    have = _POWERS.get(0)
    if have is None or have.shape[1] < length:
        size = max(length, 2 * (0 if have is None else have.shape[1]), 1024)
        rows = []
        for m in MODULI:
            value, row = 1, []
            for _ in range(size):
                row.append(value)
                value = value * BASE % m
            rows.append(row)
        _POWERS[0] = torch.tensor(rows, dtype=torch.long)
    return _POWERS[0][:, :length]


class _Hashes:
    """Equality of any two equal-length slices of one id sequence, in O(1) tensor ops per batch of queries."""

    def __init__(self, ids: torch.Tensor):
        n = ids.shape[0]
        self.mod = torch.tensor(MODULI, dtype=torch.long, device=ids.device).unsqueeze(1)  # [2, 1]
        self.pow = _powers(n + 1).to(ids.device)
        terms = (ids.unsqueeze(0) + 1) * self.pow[:, :n] % self.mod
        self.prefix = torch.nn.functional.pad(terms.cumsum(1) % self.mod, (1, 0))  # [2, n + 1]

    def equal(self, a1: torch.Tensor, a2: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """``ids[a1:a1+length] == ids[a2:a2+length]`` elementwise, for ``a1 <= a2`` (``[c]`` long each)."""
        first = (self.prefix[:, a1 + length] - self.prefix[:, a1]) % self.mod
        second = (self.prefix[:, a2 + length] - self.prefix[:, a2]) % self.mod
        return ((first * self.pow[:, a2 - a1] % self.mod) == second).all(0)


class Breakers:
    """Sequence breakers grouped by length as tensors, built once per stage (there can be thousands)."""

    def __init__(self, sequences: Sequence[tuple[int, ...]]):
        groups: dict[int, list[tuple[int, ...]]] = {}
        for sequence in sequences:
            groups.setdefault(len(sequence), []).append(tuple(sequence))
        self.groups = {size: torch.tensor(items, dtype=torch.long) for size, items in groups.items()}
        self.singles = self.groups[1][:, 0] if 1 in self.groups else torch.zeros(0, dtype=torch.long)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def limit(self, window: torch.Tensor) -> int:
        """How far back a repeat may reach: the tokens after the latest breaker (llama.cpp's ``rep_limit``).

        As in llama.cpp, the scan finds the latest breaker *start* and takes the longest breaker starting there.
        """
        length = window.shape[0]
        best_start, best_len = -1, 0
        for size, wanted in self.groups.items():
            if size > length:
                continue
            wanted = wanted.to(window.device)
            if size == 1:
                hits = torch.isin(window, wanted[:, 0])
            else:
                hits = (window.unfold(0, size, 1).unsqueeze(1) == wanted).all(-1).any(-1)
            starts = hits.nonzero()
            if starts.numel():
                start = int(starts[-1])
                if start > best_start or (start == best_start and size > best_len):
                    best_start, best_len = start, size
        if best_start < 0:
            return length
        return length - (best_start + best_len)


def repeat_lengths(window: torch.Tensor, limit: int, allowed_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each earlier place that matches the end of ``window`` for n ≥ ``allowed_length`` tokens (n capped at
    ``limit``): ``(next_token_ids, n)``.

    >>> repeat_lengths(torch.tensor([1, 2, 3, 9, 1, 2]), 6, 2)
    (tensor([3]), tensor([2]))
    """
    length = window.shape[0]
    empty = window.new_zeros(0)
    if length < 2 or limit < allowed_length or allowed_length < 1:
        return empty, empty
    ends = (window[:-1] == window[-1]).nonzero().flatten()  # places j whose token equals the last one
    if ends.numel() == 0:
        return empty, empty
    longest = torch.minimum(ends + 1, torch.full_like(ends, limit))  # a match cannot reach before the window
    ends, longest = ends[longest >= allowed_length], longest[longest >= allowed_length]
    hashes = _Hashes(window)
    at_least = torch.full_like(ends, allowed_length)
    matched = hashes.equal(ends + 1 - at_least, length - at_least, at_least)
    ends, longest = ends[matched], longest[matched]
    if ends.numel() == 0:
        return empty, empty
    low = torch.full_like(ends, allowed_length)  # known to match
    high = longest
    while bool((low < high).any()):
        mid = (low + high + 1) // 2
        same = hashes.equal(ends + 1 - mid, torch.full_like(ends, length) - mid, mid)
        low = torch.where(same, mid, low)
        high = torch.where(same, high, mid - 1)
    return window[ends + 1], low


def dry(c: Candidates, history: History, multiplier: float, base: float, allowed_length: int, last_n: int,
        breakers: "Sequence[tuple[int, ...]] | Breakers") -> Candidates:
    """Subtract DRY's penalty from the logits of the tokens that would extend a repeat. Neutral: multiplier 0.

    >>> hist = History(torch.tensor([[5, 6, 7, 1, 5, 6]]))
    >>> dry(Candidates.from_logits(torch.zeros(1, 8)), hist, 0.8, 1.75, 2, -1, ()).logits[0, 7].item()
    -0.800000011920929
    """
    if multiplier == 0.0 or base < 1.0 or last_n == 0:
        return c
    ids = history.window(last_n)
    if not isinstance(breakers, Breakers):
        breakers = Breakers(breakers)
    singles = breakers.singles.to(ids.device)
    max_exponent = int(FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else 0
    token_rows, token_ids, penalties = [], [], []
    for row in range(ids.shape[0]):
        window = ids[row]
        if window.shape[0] <= allowed_length:
            continue
        limit = breakers.limit(window) if breakers else window.shape[0]
        tokens, lengths = repeat_lengths(window, limit, allowed_length)
        if tokens.numel() == 0:
            continue
        tokens, lengths = _max_per_token(tokens, lengths)
        keep = ~torch.isin(tokens, singles) & (tokens < c.vocab_size)
        tokens, lengths = tokens[keep], lengths[keep]
        exponent = lengths - allowed_length
        if max_exponent > 0:
            exponent = exponent.clamp(max=max_exponent)
        penalty = multiplier * torch.pow(torch.tensor(base, dtype=torch.float32), exponent.float())
        token_rows.append(torch.full_like(tokens, row))
        token_ids.append(tokens)
        penalties.append(penalty)
    if not token_ids:
        return c
    rows, tokens, penalty = torch.cat(token_rows), torch.cat(token_ids), torch.cat(penalties).to(c.logits.device)
    delta = torch.zeros(c.logits.shape[0], c.vocab_size, dtype=c.logits.dtype, device=c.logits.device)
    delta[rows.to(delta.device), tokens.to(delta.device)] = penalty
    if not c.is_dense:
        delta = delta.gather(1, c.ids)
    return c.with_logits(c.logits - delta)


def _max_per_token(tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    unique, inverse = torch.unique(tokens, return_inverse=True)
    best = torch.zeros_like(unique).scatter_reduce(0, inverse, lengths, reduce="amax", include_self=False)
    return unique, best


def dry_stage(cfg: Any) -> Stage:
    breakers = Breakers(cfg.dry_sequence_breakers)
    return lambda c, h: dry(c, h, cfg.dry_multiplier, cfg.dry_base, cfg.dry_allowed_length,
                            cfg.dry_penalty_last_n, breakers)

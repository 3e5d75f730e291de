"""Seed 000's monitoring metrics for a set of generated samples. Pure Python over token-id lists.

Tokens, not words: the seeds' texts are Chinese, which has no spaces to split words on.
"""

from __future__ import annotations

import math
from typing import Sequence


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams across the samples (Li et al. 2016, corpus level); 0 when there are none.

    >>> distinct_n([[1, 2, 1, 2], [1, 2, 3]], 1)
    0.42857142857142855
    >>> distinct_n([[1, 2, 1, 2], [1, 2, 3]], 2)
    0.6
    """
    grams = [g for sample in samples for g in ngrams(sample, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(samples: Sequence[Sequence[int]], n: int = 3) -> float:
    """Share of n-grams that already occurred earlier in the same sample, averaged over samples with any n-gram.

    >>> repeated_ngram_rate([[1, 2, 3, 1, 2, 3]], 3)  # 123 231 312 123: the last one repeats
    0.25
    """
    rates = []
    for sample in samples:
        grams = ngrams(sample, n)
        if not grams:
            continue
        seen: set[tuple[int, ...]] = set()
        repeats = 0
        for gram in grams:
            repeats += gram in seen
            seen.add(gram)
        rates.append(repeats / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def perplexity(logprobs: Sequence[float]) -> float:
    """exp(−mean log p) of the chosen tokens.

    >>> round(perplexity([math.log(0.5), math.log(0.25)]), 4)
    2.8284
    """
    return math.exp(-mean(logprobs)) if logprobs else float("nan")


def entropy(probs: Sequence[float]) -> float:
    """Shannon entropy in nats of a distribution given as probabilities.

    >>> round(entropy([0.5, 0.5]), 4)
    0.6931
    """
    return -sum(p * math.log(p) for p in probs if p > 0)

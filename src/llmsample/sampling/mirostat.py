"""Mirostat v1 and v2 (llama.cpp's): a selector that keeps the surprise of the drawn tokens near τ.

μ (per row, starting at 2τ) sets a truncation; after the draw, μ ← μ − η·(surprise − τ), the surprise being
−log2 of the drawn token's probability in the truncated distribution. v2 keeps the tokens whose surprise is at
most μ (at least one); v1 estimates the Zipf exponent ŝ from the top 100 probabilities and keeps the top k,
k = (ε̂·2^μ / (1 − N^(−ε̂)))^(1/ŝ), ε̂ = ŝ − 1, N the vocabulary size.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from llmsample.sampling.candidates import Candidates
from llmsample.sampling.stages import History, fast_topk, keep_from

ZIPF_TOKENS = 100  # llama.cpp's m: how many of the top probabilities estimate ŝ
LN2 = math.log(2.0)


def v2_threshold(c: Candidates, mu: torch.Tensor) -> torch.Tensor:
    """``[batch, 1]`` logit threshold: surprise ≤ μ ⇔ ℓ ≥ logsumexp(ℓ) − μ·ln 2 (never above the best logit)."""
    log_total = torch.logsumexp(c.logits, dim=-1, keepdim=True)
    return torch.minimum(log_total - mu.unsqueeze(-1) * LN2, c.logits.amax(-1, keepdim=True))


def v1_threshold(c: Candidates, mu: torch.Tensor) -> torch.Tensor:
    """``[batch, 1]`` logit threshold of mirostat v1's top k."""
    logits = c.logits
    width = logits.shape[-1]
    values, _ = fast_topk(logits, min(ZIPF_TOKENS, width))
    probs = (values - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
    alive = torch.isfinite(logits).sum(-1, keepdim=True)
    pairs = values.shape[-1] - 1
    i = torch.arange(pairs, device=logits.device, dtype=torch.float32)
    t = torch.log((i + 2) / (i + 1)).unsqueeze(0)  # [1, pairs]
    b = torch.log(probs[:, :-1] / probs[:, 1:])
    used = (i.unsqueeze(0) < (alive - 1)) & torch.isfinite(b)
    s_hat = (torch.where(used, t * b, 0.0).sum(-1, keepdim=True)
             / torch.where(used, t * t, 0.0).sum(-1, keepdim=True).clamp(min=1e-30))
    e_hat = s_hat - 1
    k = ((e_hat * torch.pow(2.0, mu.unsqueeze(-1))) / (1 - torch.pow(float(c.vocab_size), -e_hat))).pow(1 / s_hat)
    k = torch.nan_to_num(k, nan=1.0, posinf=float(width)).floor().clamp(min=1).minimum(alive.to(k.dtype))
    k = k.long()
    largest = int(k.max())
    top, _ = fast_topk(logits, min(max(largest, 1), width))
    return top.gather(1, k - 1)


class Mirostat:
    """The chain's last stage when mirostat is on: truncates by μ; ``after_draw`` updates μ."""

    def __init__(self, version: int, tau: float, eta: float):
        self.version, self.tau, self.eta = version, tau, eta

    def mu(self, c: Candidates, history: History) -> torch.Tensor:
        if history.replay is not None and "mirostat_mu" in history.replay:
            return history.replay["mirostat_mu"].to(c.logits.device)
        mu = history.state.get("mirostat_mu")
        if mu is None or mu.shape[0] != c.logits.shape[0]:
            mu = torch.full((c.logits.shape[0],), 2.0 * self.tau, device=c.logits.device)
            history.state["mirostat_mu"] = mu
        return mu

    def __call__(self, c: Candidates, history: History) -> Candidates:
        mu = self.mu(c, history)
        history.record["mirostat_mu"] = mu
        threshold = v2_threshold(c, mu) if self.version == 2 else v1_threshold(c, mu)
        return keep_from(c, threshold)

    def after_draw(self, c: Candidates, columns: torch.Tensor, history: History,
                   removed: Optional[torch.Tensor] = None, token_ids: Optional[torch.Tensor] = None) -> None:
        """μ ← μ − η·(−log2 p_drawn − τ), p_drawn in the truncated distribution ``c``.

        A forced token (``generate --force``) counts as drawn. One the chain removed (``removed``, or probability 0)
        would have an infinite surprise and send μ to −∞ for good, so it counts with its raw probability (the
        model's, T=1) instead; a token the model itself gives probability 0 leaves μ as it was.
        """
        log_probs = torch.log_softmax(c.logits, dim=-1).gather(1, columns.unsqueeze(-1)).squeeze(-1)
        if token_ids is not None and history.raw_logits is not None:
            raw = (history.raw_logits.gather(1, token_ids.unsqueeze(-1)) - history.raw_log_normaliser()).squeeze(-1)
            gone = ~torch.isfinite(log_probs) if removed is None else removed | ~torch.isfinite(log_probs)
            log_probs = torch.where(gone, raw, log_probs)
        surprise = -log_probs / LN2
        mu = history.record["mirostat_mu"]
        updated = mu - self.eta * (surprise - self.tau)
        history.state["mirostat_mu"] = torch.where(torch.isfinite(updated), updated, mu)


def mirostat_stage(cfg: Any) -> Mirostat:
    return Mirostat(cfg.mirostat, cfg.mirostat_tau, cfg.mirostat_eta)

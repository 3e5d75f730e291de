"""``sweep`` and ``inspect`` against a serving engine, with only what the server reports.

sweep: every grid point is one ``generate`` run on the server (``n`` samples, the same seed); the metrics come from
the token texts (distinct-n, repeated 3-grams, length) and the chosen tokens' raw log-probabilities (perplexity).
The mean entropy of the final distributions needs the whole distribution, which no server returns: it is ``null``.

inspect: each step asks the server for one token and its top-N. llama-server reports probabilities after its own
sampler chain (``post_sampling_probs``), so each setting gets its own panel, as locally; the other servers report
only raw log-probabilities, which no sampling setting changes, so they get one panel, "raw top-N from the server".
The greedy path is followed as text (the top token's text appended to the prompt), since the servers take text.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

from llmsample import metrics, presets
from llmsample.config import Settings
from llmsample.errors import ConfigError
from llmsample.remote import generate as remote
from llmsample.remote.server import Server
from llmsample.render import Renderer


class Collector(Renderer):
    """A renderer that keeps each sample's token texts and raw probabilities, and says each warning once."""

    wants_probs = True  # perplexity needs the chosen tokens' probabilities

    def __init__(self, err: Any, post_sampling: bool = True):
        super().__init__(err, err)
        self.post_sampling = post_sampling  # False: raw log-probabilities (the perplexity under the model)
        self.tokens: dict[int, list[str]] = {}
        self.raw: dict[int, list[Optional[float]]] = {}
        self.tables: list[Optional[dict]] = []
        self.said: set[str] = set()

    def token(self, sample, index, token_id, text, raw_prob, prob, temperature, candidates=None,
              stage_state=None) -> None:
        self.tokens.setdefault(sample, []).append(text)
        self.raw.setdefault(sample, []).append(raw_prob)
        self.tables.append(candidates)

    def warn(self, message: str) -> None:
        if message not in self.said:
            self.said.add(message)
            super().warn(message)


def _options(prompt: str, settings: Settings, server: Server, candidates: int = 0) -> Any:
    from llmsample.run import GenerateOptions

    return GenerateOptions(prompt=prompt, settings=settings, model=server.model, candidates=candidates,
                           server=server)


def _with(settings: Settings, **generation: Any) -> Settings:
    return dataclasses.replace(settings, generation=dataclasses.replace(settings.generation, **generation))


def sweep(server: Server, prompt: str, base_preset: Optional[str], grid: dict[str, list], samples: int, seed: int,
          max_new_tokens: int, err: Any, on_point: Optional[Callable[[], None]] = None) -> list[dict[str, Any]]:
    """One row per grid point, as ``lab.sweep`` gives locally (``mean_entropy`` None: see the module docstring)."""
    from llmsample.lab import grid_points

    collector = Collector(err, post_sampling=False)
    rows = []
    for point in grid_points(grid):
        settings = presets.resolve_settings(base_preset, {"sampling": point})
        if settings.sampling.num_beams > 1:
            raise ConfigError("sweep samples: beam search (num_beams > 1) is not swept")
        settings = _with(settings, max_new_tokens=max_new_tokens, seed=seed, num_samples=samples)
        collector.tokens, collector.raw = {}, {}
        remote.generate(_options(prompt, settings, server), collector, server)
        texts = [collector.tokens.get(i, []) for i in range(samples)]
        logprobs = [math.log(max(p, 1e-45)) for i in range(samples) for p in collector.raw.get(i, []) if p is not None]
        row = {"point": point,
               "distinct_1": metrics.distinct_n(texts, 1), "distinct_2": metrics.distinct_n(texts, 2),
               "repeated_3gram_rate": metrics.repeated_ngram_rate(texts, 3), "mean_entropy": None,
               "mean_logprob": metrics.mean(logprobs) if logprobs else None,
               "perplexity": metrics.perplexity(logprobs) if logprobs else None,
               "mean_length": metrics.mean([len(t) for t in texts]),
               "chain": settings.sampling.describe_chain(), "sample": "".join(texts[0])}
        rows.append(row)
        if on_point:
            on_point()
    return rows


def inspect_steps(server: Server, prompt: str, chosen: Sequence[Any], steps: int, top: int,
                  err: Any) -> dict[str, Any]:
    """The server's next-token top-N after ``prompt`` under each variant (llama-server) or raw (the others),
    following ``steps`` greedy steps; the same shape as ``lab.inspect_steps`` where the server says as much."""
    post = server.dialect.logprobs == "llama-server"
    if not server.dialect.logprobs:
        raise ConfigError(f"inspect needs probabilities, and {server.dialect.title} reports none")
    collector = Collector(err)
    if not post and len(chosen) > 1:
        collector.warn(f"{server.dialect.title} reports only raw probabilities, which no sampling setting changes: "
                       "one panel, not one per setting (llama-server reports them after its sampler chain)")
    result: dict[str, Any] = {"prompt": prompt, "steps": [], "source": "server",
                              "kind": "post_sampling" if post else "raw"}
    context = ""
    for step in range(steps):
        variants = []
        for variant in (chosen if post else chosen[:1]):
            settings = _with(variant.settings, max_new_tokens=1, seed=0, num_samples=1)
            collector.tables = []
            remote.generate(_options(prompt + context, settings, server, candidates=top), collector, server)
            table = next((t for t in collector.tables if t), None)
            rows = [r for r in (table or {}).get("candidates", []) if (r["prob"] or 0) > 0]
            variants.append({"label": variant.label if post else "raw top-N from the server",
                             "chain": variant.settings.sampling.describe_chain() if post else "server",
                             "entropy": None, "kept": None, "order_sensitive": None,
                             "top": [{"token_id": r["token_id"], "token": r["token"], "prob": r["prob"]}
                                     for r in rows[:top]]})
        result["steps"].append({"index": step, "context": context, "variants": variants, "differences": [],
                                "differing_count": 0})
        greedy = _with(chosen[0].settings, max_new_tokens=1, seed=0, num_samples=1)
        greedy = dataclasses.replace(greedy, sampling=greedy.sampling.replace(do_sample=False))
        follow = Collector(err)
        follow.warn = lambda message: None  # type: ignore[method-assign]  # the path's own settings: not the user's
        remote.generate(_options(prompt + context, greedy, server), follow, server)
        context += "".join(follow.tokens.get(0, []))
    return result


__all__ = ["sweep", "inspect_steps"]

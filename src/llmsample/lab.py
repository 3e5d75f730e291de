"""The sampling lab: ``inspect`` (the next-token distribution under several settings) and ``sweep`` (seed 003's
experiment: generate over a grid of settings and measure seed 000's monitoring metrics)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from llmsample import metrics, presets
from llmsample.config import Settings
from llmsample.sampling.registry import FIELDS, STAGE_FIELDS

# Numeric stage settings: the ones a grid can vary (beam count and mode switches are not samplers).
SWEEPABLE = tuple(f.name for f in STAGE_FIELDS if f.kind in ("float", "int", "choice")) + ("min_tokens_to_keep",)
from llmsample.errors import ConfigError
from llmsample.token_text import decode_text, for_model

# ---- settings variants ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    label: str
    settings: Settings


def variants(preset_names: Sequence[str], flag_values: dict[str, list], fixed: Optional[dict] = None) -> list[Variant]:
    """One variant per position: ``--temperature 0.9 --temperature 0.1`` is two; a flag given once applies to all.

    >>> [v.label for v in variants([], {"temperature": [0.9, 0.1]})]
    ['temperature=0.9', 'temperature=0.1']
    """
    lengths = {name: len(values) for name, values in flag_values.items() if values}
    if preset_names:
        lengths["preset"] = len(preset_names)
    count = max(lengths.values(), default=1)
    for name, length in lengths.items():
        if length not in (1, count):
            shown = "--" + name.replace("_", "-")
            raise ConfigError(f"{shown} is given {length} times but another setting {count} times: give each once "
                              f"or the same number of times")
    out = []
    for i in range(count):
        preset = preset_names[i if len(preset_names) > 1 else 0] if preset_names else None
        layer = dict(fixed or {})
        label_parts = [preset] if preset and len(preset_names) > 1 else []
        for name, values in flag_values.items():
            if values:
                value = values[i if len(values) > 1 else 0]
                layer[name] = value
                if len(values) > 1:
                    label_parts.append(f"{name}={value}")
        settings = presets.resolve_settings(preset, {"sampling": layer})
        out.append(Variant(" ".join(label_parts) or preset or "settings", settings))
    return out


# ---- inspect --------------------------------------------------------------------------------------------------


def inspect_steps(lm: Any, prompt: str, chosen: Sequence[Variant], steps: int, top: int) -> dict[str, Any]:
    """The next-token distribution after ``prompt`` under each variant, following ``steps`` greedy steps."""
    import torch

    from llmsample.sampling import Sampler

    tokenizer = lm.tokenizer
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    prompt_len = ids.shape[1]
    result: dict[str, Any] = {"prompt": prompt, "steps": []}
    configs = [for_model(lm, variant.settings.sampling) for variant in chosen]  # texts tokenised once, not per step
    states = [constraint_state(lm, cfg) for cfg in configs]  # a constraint bound to the tokenizer once
    model, cache, new_ids = lm.language_model, None, ids
    for step in range(steps):
        with torch.inference_mode():
            logits, cache = model.forward(new_ids, cache)
        logits = logits.float()  # [1, vocab]
        raw = torch.softmax(logits, -1)[0]
        step_out: dict[str, Any] = {"index": step, "context": tokenizer.decode(ids[0, prompt_len:]), "variants": []}
        kept_sets = []
        for variant, cfg, state in zip(chosen, configs, states):
            # XTC draws: a fixed generator shows the same decision on every run.
            processed = Sampler(cfg, state=state).process(ids, logits, prompt_len=prompt_len,
                                             generator=torch.Generator(device=logits.device).manual_seed(0))[0]
            probs = torch.softmax(processed, -1)
            kept = torch.isfinite(processed)
            kept_sets.append(set(kept.nonzero().flatten().tolist()))
            values, order = torch.topk(probs, min(top, probs.numel()))
            step_out["variants"].append({
                "label": variant.label,
                "chain": cfg.describe_chain(),
                "entropy": metrics.entropy(probs[kept].tolist()),
                "kept": int(kept.sum()),
                "order_sensitive": order_sensitive(cfg, ids, logits, prompt_len, state),
                "top": [{"token_id": int(t), "token": tokenizer.decode([int(t)]), "prob": float(p),
                         "raw_prob": float(raw[t])} for p, t in zip(values.tolist(), order.tolist()) if p > 0],
            })
        # Where the kept sets differ: tokens some variants keep and others cut, most likely first.
        union = set().union(*kept_sets)
        common = set.intersection(*kept_sets) if kept_sets else set()
        differing = sorted(union - common, key=lambda t: -float(raw[t]))
        step_out["differences"] = [
            {"token_id": t, "token": tokenizer.decode([t]), "raw_prob": float(raw[t]),
             "kept_by": [v.label for v, s in zip(chosen, kept_sets) if t in s]}
            for t in differing[:12]
        ]
        step_out["differing_count"] = len(differing)
        result["steps"].append(step_out)
        new_ids = logits.argmax(-1, keepdim=True)  # follow the greedy path
        ids = torch.cat([ids, new_ids], dim=1)
    return result


def constraint_state(lm: Any, cfg: Any) -> dict:
    """The sampler state that carries ``cfg``'s constraint for ``lm`` (``{}`` without one)."""
    from llmsample import grammar
    from llmsample.run import eos_ids

    return grammar.bind(cfg, lm.tokenizer, eos_ids(lm))


def order_sensitive(cfg: Any, ids: Any, logits: Any, prompt_len: int,
                    state: Optional[dict] = None) -> Optional[dict[str, int]]:
    """When temperature-first and temperature-last keep different candidate sets here, how many each keeps."""
    import torch

    from llmsample.config import DEFAULT_ORDER, HF_ORDER
    from llmsample.sampling import Sampler

    gen = torch.Generator(device=logits.device)

    if cfg.greedy or cfg.temperature == 1.0:
        return None
    last = Sampler(cfg.replace(order=DEFAULT_ORDER), state=state).process(ids, logits, prompt_len, gen.manual_seed(0))
    first = Sampler(cfg.replace(order=HF_ORDER), state=state).process(ids, logits, prompt_len, gen.manual_seed(0))
    kept_last, kept_first = torch.isfinite(last), torch.isfinite(first)
    if torch.equal(kept_last, kept_first):
        return None
    return {"temperature_last": int(kept_last.sum()), "temperature_first": int(kept_first.sum())}


# ---- sweep ----------------------------------------------------------------------------------------------------


def parse_grid(specs: Sequence[str]) -> dict[str, list]:
    """``["top_p=0.1,0.3", "temperature=0.5"]`` → ``{"top_p": [0.1, 0.3], "temperature": [0.5]}``.

    >>> parse_grid(["top_p=0.1,0.5", "top-k=10,20"])
    {'top_p': [0.1, 0.5], 'top_k': [10, 20]}
    """
    grid: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ConfigError(f"--grid takes NAME=V1,V2,…, got {spec!r}")
        if name not in SWEEPABLE:
            raise ConfigError(f"--grid: {name!r} is not a sweepable setting; use one of {', '.join(SWEEPABLE)}")
        if name in grid:
            raise ConfigError(f"--grid names {name!r} twice")
        parsed = []
        for raw in values.split(","):
            try:
                number = float(raw)
            except ValueError:
                raise ConfigError(f"--grid {name}: {raw.strip()!r} is not a number") from None
            parsed.append(int(number) if FIELDS[name].kind != "float" and number.is_integer() else number)
        grid[name] = parsed
    if not grid:
        raise ConfigError("sweep needs at least one --grid NAME=V1,V2,…")
    return grid


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def point_metrics(samples: list[list[int]], raw_logprobs: list[float], entropies: list[float]) -> dict[str, float]:
    """Seed 000's monitoring metrics for the K samples of one grid point."""
    return {
        "distinct_1": metrics.distinct_n(samples, 1),
        "distinct_2": metrics.distinct_n(samples, 2),
        "repeated_3gram_rate": metrics.repeated_ngram_rate(samples, 3),
        "mean_entropy": metrics.mean(entropies),
        "mean_logprob": metrics.mean(raw_logprobs),
        "perplexity": metrics.perplexity(raw_logprobs),
        "mean_length": metrics.mean([len(s) for s in samples]),
    }


def ensure_sweep_fits(lm: Any, prompt: str, samples: int, max_new_tokens: int) -> None:
    """Refuse up front (exit 3, with an estimate) a batch of ``samples`` that cannot fit in memory."""
    from llmsample.models import ensure_fits

    prompt_len = len(lm.tokenizer(prompt, return_tensors="pt").input_ids[0])
    ensure_fits(lm, samples, prompt_len, max_new_tokens, f"--samples {samples}")


def sweep(lm: Any, prompt: str, base_preset: Optional[str], base_flags: dict, grid: dict[str, list], samples: int,
          seed: int, max_new_tokens: int, eos_token_ids: Sequence[int] = (),
          on_step: Optional[Callable[[], None]] = None) -> list[dict[str, Any]]:
    """Generate ``samples`` samples (one batch) at each grid point with the same seed; measure each point."""
    import torch

    from llmsample.decode import sample_loop
    from llmsample.sampling import Sampler

    tokenizer = lm.tokenizer
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    rows = []
    for point in grid_points(grid):
        settings = presets.resolve_settings(base_preset, {"sampling": {**base_flags, **point}})
        if settings.sampling.num_beams > 1:
            raise ConfigError("sweep samples: beam search (num_beams > 1) is not swept")
        generator = torch.Generator(device=lm.device).manual_seed(seed)
        batch = prompt_ids.expand(samples, -1)
        tokens: list[list[int]] = [[] for _ in range(samples)]
        logprobs: list[float] = []
        entropies: list[float] = []
        cfg = for_model(lm, settings.sampling)
        for step in sample_loop(lm.language_model, batch, Sampler(cfg, state=constraint_state(lm, cfg)),
                                max_new_tokens,
                                eos_token_ids,
                                generator=generator):
            for row in step.active.nonzero().flatten().tolist():
                tokens[row].append(int(step.token_ids[row]))
                logprobs.append(math.log(max(float(step.raw_prob[row]), 1e-45)))
                entropies.append(float(step.entropy[row]))
            if on_step:
                on_step()
        row = {"point": point, **point_metrics(tokens, logprobs, entropies),
               "chain": settings.sampling.describe_chain(),
               "sample": decode_text(tokenizer, tokens[0])}
        rows.append(row)
    return rows

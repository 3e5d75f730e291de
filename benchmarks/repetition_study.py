"""Repetition study: at equal perplexity, which cuts repetition more — the repetition penalty over the whole text,
the same penalty over a window (``penalty_last_n``), or DRY?

    python benchmarks/repetition_study.py            # the real run (about 15 CPU-minutes on 2 busy cores)
    python benchmarks/repetition_study.py --quick    # a smoke run: few tokens, few samples, two values per family

Everything goes through the CLI (``sys.executable -m llmsample sweep … --format json``), so set ``PYTHONPATH`` to
run another checkout's code. Each family is one sweep from a shared base (sampling at T 0.8, top_p 0.95, written to
a temporary preset); the family's knob is the grid. The baseline (no penalty) is the same configuration in every
family, so it is generated once (in the first family's grid) and shared; it is also generated with NOISE_SEEDS to
show how far the metrics move from one set of SAMPLES samples to another at fixed settings.

It prints a markdown table (family, value, perplexity, repeated-3-gram rate, distinct-2), the repeated-3-gram rate
each family reaches at a few perplexities inside the range every family covers (linear interpolation between
measured points, sorted by perplexity), and draws repeated-3-gram rate against perplexity, one line per family, to
``docs/repetition_study.png``. Perplexity is the model's raw (unprocessed) distribution's perplexity of the tokens
drawn, so a penalty that forces unlikely tokens pays for it there.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# ---- the experiment ---------------------------------------------------------------------------------------------

# A prose continuation that a small base model tends to fill with "The town was … The church was …" loops.
PROMPT = "The history of the town of Millbrook\n\nMillbrook is a small town in the north of England. The town"
SEED = 1
NOISE_SEEDS = (2,)  # the baseline again with these seeds: the run-to-run spread of the metrics
SAMPLES = 8
MAX_NEW_TOKENS = 128
BASE_SAMPLING = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}
WINDOW = 64  # llama.cpp's default penalty_last_n

# family label → (grid setting, extra fixed sampling settings, values without the baseline)
FAMILIES: dict[str, tuple[str, dict[str, Any], tuple[float, ...]]] = {
    "repetition_penalty (whole text)": ("repetition_penalty", {}, (1.02, 1.05, 1.1, 1.2, 1.3, 1.5)),
    f"repetition_penalty, penalty_last_n={WINDOW}": ("repetition_penalty", {"penalty_last_n": WINDOW},
                                                      (1.02, 1.05, 1.1, 1.2, 1.3, 1.5)),
    "DRY (base 1.75, allowed_length 2)": ("dry_multiplier", {}, (0.4, 0.8, 1.6, 3.2)),
}
BASELINE_VALUE = {"repetition_penalty": 1.0, "dry_multiplier": 0.0}  # the knob's "off"

QUICK = {"samples": 2, "max_new_tokens": 24, "values_per_family": 2, "noise_seeds": ()}
# Small penalties (1.02, 1.05) are there so the penalty families reach the low perplexities DRY stays at: without
# them the "equal perplexity" comparison would only interpolate between "off" and 1.1.

ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "docs" / "repetition_study.png"
THREADS = "1"  # torch threads in the child: on a shared 2-core machine one thread runs ~4x faster than two


# ---- running the CLI ----------------------------------------------------------------------------------------------


def write_preset(folder: Path, name: str, extra: dict[str, Any]) -> Path:
    lines = [f'description = "repetition study: {name}"', "", "[sampling]"]
    for key, value in {**BASE_SAMPLING, **extra}.items():
        lines.append(f"{key} = {json.dumps(value)}")  # true / numbers: JSON and TOML agree
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sweep(python: str, preset: Path, setting: str, values: list[float], seed: int, samples: int,
          max_new_tokens: int) -> list[dict[str, Any]]:
    cmd = [python, "-m", "llmsample", "sweep", PROMPT, "--grid", f"{setting}={','.join(map(str, values))}",
           "--samples", str(samples), "--seed", str(seed), "--max-new-tokens", str(max_new_tokens),
           "--format", "json", "--preset", str(preset)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", THREADS)
    print("$ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"sweep failed ({done.returncode}):\n{done.stderr}")
    print(f"  {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return json.loads(done.stdout)["points"]


# ---- analysis ----------------------------------------------------------------------------------------------------


def interpolate(points: list[dict[str, Any]], x: float) -> float:
    """Repeated-3-gram rate at perplexity ``x``: linear between the measured points sorted by perplexity."""
    ordered = sorted(points, key=lambda p: p["perplexity"])
    for a, b in zip(ordered, ordered[1:]):
        if a["perplexity"] <= x <= b["perplexity"]:
            span = b["perplexity"] - a["perplexity"]
            t = 0.0 if span == 0 else (x - a["perplexity"]) / span
            return a["repeated_3gram_rate"] + t * (b["repeated_3gram_rate"] - a["repeated_3gram_rate"])
    raise ValueError(f"perplexity {x} outside the measured range")


def monotone(points: list[dict[str, Any]]) -> bool:
    ppl = [p["perplexity"] for p in points]
    return all(a <= b for a, b in zip(ppl, ppl[1:]))


def markdown(results: dict[str, list[dict[str, Any]]], noise: list[dict[str, Any]], seed: int) -> str:
    lines = ["| family | value | perplexity | rep-3 rate | distinct-2 |", "|---|---:|---:|---:|---:|"]
    for family, points in results.items():
        for p in points:
            lines.append(f"| {family} | {p['value']:g} | {p['perplexity']:.3f} | {p['repeated_3gram_rate']:.4f} | "
                         f"{p['distinct_2']:.4f} |")
    for p in noise:
        lines.append(f"| baseline, seed {p['seed']} (noise check; seed {seed} above) | off | {p['perplexity']:.3f} | "
                     f"{p['repeated_3gram_rate']:.4f} | {p['distinct_2']:.4f} |")
    return "\n".join(lines)


def _overlap(groups: list[list[dict[str, Any]]]) -> tuple[float, float]:
    lo = max(min(p["perplexity"] for p in pts) for pts in groups)
    hi = min(max(p["perplexity"] for p in pts) for pts in groups)
    return lo, hi


def _table(results: dict[str, list[dict[str, Any]]], lo: float, hi: float, count: int) -> tuple[list[str], list[float]]:
    # The baseline is shared, so one end of the overlap is usually that one point: compare away from it.
    targets = [lo + (hi - lo) * (i + 1) / (count + 1) for i in range(count)]
    lines = ["| family | " + " | ".join(f"rep-3 at ppl ≈ {x:.2f}" for x in targets) + " |",
             "|---|" + "---:|" * len(targets)]
    for family, points in results.items():
        cells = [f"{interpolate(points, x):.4f}" for x in targets]
        note = "" if monotone(points) else " (perplexity not monotone in the value)"
        lines.append(f"| {family}{note} | " + " | ".join(cells) + " |")
    return lines, targets


def comparison(results: dict[str, list[dict[str, Any]]], count: int = 3) -> tuple[str, list[float]]:
    """Interpolated rep-3 rates at ``count`` perplexities inside the range every family covers; failing that,
    inside the range each pair of families covers."""
    lo, hi = _overlap(list(results.values()))
    if hi > lo:
        lines, targets = _table(results, lo, hi, count)
        return "\n".join([f"Perplexity range every family covers: {lo:.3f} – {hi:.3f}", "", *lines]), targets
    out = [f"No perplexity range common to every family beyond one point (highest minimum {lo:.3f}, lowest maximum "
           f"{hi:.3f}); ranges:"]
    for family, points in results.items():
        ppl = [p["perplexity"] for p in points]
        out.append(f"- {family}: {min(ppl):.3f} – {max(ppl):.3f}")
    targets: list[float] = []
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            lo, hi = _overlap([results[a], results[b]])
            if hi > lo:
                lines, pair_targets = _table({a: results[a], b: results[b]}, lo, hi, count)
                out += ["", f"{a} vs {b}: common range {lo:.3f} – {hi:.3f}", "", *lines]
                targets += pair_targets
    return "\n".join(out), targets


def place_labels(ax: Any, labels: list[tuple[float, float, str, str]]) -> None:
    """Put each label at whichever of eight spots round its point lies farthest from every point and every label
    placed so far (greedy, in display pixels), so close points' labels do not print over each other."""
    import math

    scale = ax.figure.dpi / 72  # points → pixels
    spots = [(7 * math.cos(a), 7 * math.sin(a) - 3) for a in (math.pi * k / 4 for k in range(8))]
    anchors = [tuple(ax.transData.transform((x, y))) for x, y, _, _ in labels]
    taken: list[tuple[float, float]] = list(anchors)
    for (x, y, text, colour), (px, py) in zip(labels, anchors):
        width = 5.5 * len(text) * scale  # about 8-point text

        def centre(spot: tuple[float, float]) -> tuple[float, float]:
            dx, dy = spot
            return px + dx * scale + (width / 2 if dx >= 0 else -width / 2), py + dy * scale + 3 * scale

        def clearance(spot: tuple[float, float]) -> float:
            cx, cy = centre(spot)
            return min(math.hypot(cx - tx, cy - ty) for tx, ty in taken)

        best = max(spots, key=clearance)
        taken.append(centre(best))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=best, fontsize=8, color=colour,
                    ha="left" if best[0] >= 0 else "right", va="bottom")


def plot(results: dict[str, list[dict[str, Any]]], noise: list[dict[str, Any]], targets: list[float], path: Path,
         subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=130)
    markers = ("o", "s", "^", "D")
    labels = []  # (x, y, text, colour); the shared baseline is labelled once
    for (family, points), marker in zip(results.items(), markers):
        xs = [p["perplexity"] for p in points]
        ys = [p["repeated_3gram_rate"] for p in points]
        (line,) = ax.plot(xs, ys, marker=marker, label=family, linewidth=1.6, markersize=6, alpha=0.9)
        labels += [(p["perplexity"], p["repeated_3gram_rate"], f"{p['value']:g}", line.get_color())
                   for p in points[1:]]
    base = next(iter(results.values()))[0]
    labels.append((base["perplexity"], base["repeated_3gram_rate"], "off (all)", "black"))
    if noise:
        ax.scatter([p["perplexity"] for p in noise], [p["repeated_3gram_rate"] for p in noise], marker="x",
                   color="grey", zorder=3, label="off, other seeds (noise)")
    for x in targets:
        ax.axvline(x, color="lightgrey", linewidth=0.8, linestyle=":", zorder=0)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([5, 6, 7, 8, 10, 12, 15, 20, 30, 40, 50])
    ax.set_xlabel("perplexity of the drawn tokens under the raw model distribution (log scale)")
    ax.set_ylabel("repeated 3-gram rate (share of 3-grams already seen in the sample)")
    ax.set_title("Repetition vs perplexity: whole-text penalty, windowed penalty, DRY\n" + subtitle, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    place_labels(ax, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few tokens and samples, two values a family")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs llmsample")
    parser.add_argument("--plot", type=Path, help=f"where to draw (default {PLOT.relative_to(ROOT)}; "
                                                  "with --quick, a temporary file)")
    parser.add_argument("--save-json", type=Path, help="also write every measured point to this file")
    parser.add_argument("--reuse", type=Path, help="a --save-json file of an earlier run with the same prompt, seed, "
                                                   "samples, tokens and base: generate only the points it lacks")
    args = parser.parse_args()

    samples, max_new_tokens, noise_seeds = SAMPLES, MAX_NEW_TOKENS, NOISE_SEEDS
    families = dict(FAMILIES)
    if args.quick:
        samples, max_new_tokens, noise_seeds = QUICK["samples"], QUICK["max_new_tokens"], QUICK["noise_seeds"]
        families = {k: (s, f, v[:QUICK["values_per_family"]]) for k, (s, f, v) in families.items()}
    plot_path = args.plot or (Path(tempfile.gettempdir()) / "repetition_study_quick.png" if args.quick else PLOT)

    cached: dict[str, dict[float, dict[str, Any]]] = {}
    cached_noise: dict[int, dict[str, Any]] = {}
    if args.reuse:
        old = json.loads(args.reuse.read_text(encoding="utf-8"))
        same = {"prompt": PROMPT, "seed": SEED, "samples": samples, "max_new_tokens": max_new_tokens,
                "base": BASE_SAMPLING}
        differing = [k for k, v in same.items() if old.get(k) != v]
        if differing:
            sys.exit(f"--reuse {args.reuse}: a different experiment ({', '.join(differing)} differ)")
        cached = {family: {p["value"]: p for p in points} for family, points in old["families"].items()}
        cached_noise = {p["seed"]: p for p in old["noise"]}

    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    noise: list[dict[str, Any]] = []
    baseline = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (family, (setting, fixed, values)) in enumerate(families.items()):
            have = dict(cached.get(family, {}))
            if baseline is not None:
                have[BASELINE_VALUE[setting]] = {**baseline, "value": BASELINE_VALUE[setting]}
            grid = [v for v in (BASELINE_VALUE[setting], *values) if v not in have]
            if grid:
                preset = write_preset(Path(tmp), f"family{i}", fixed)
                rows = sweep(args.python, preset, setting, grid, SEED, samples, max_new_tokens)
                have.update({row["point"][setting]: {**row, "value": row["point"][setting]} for row in rows})
            points = [have[v] for v in (BASELINE_VALUE[setting], *values)]
            baseline = baseline or points[0]
            results[family] = points
        base_setting = next(iter(families.values()))[0]
        base_preset = write_preset(Path(tmp), "baseline", {})
        for seed in noise_seeds:
            if seed not in cached_noise:
                cached_noise[seed] = {**sweep(args.python, base_preset, base_setting, [BASELINE_VALUE[base_setting]],
                                              seed, samples, max_new_tokens)[0], "seed": seed}
            noise.append(cached_noise[seed])
    elapsed = time.perf_counter() - started

    settings = ", ".join(f"{k}={v}" for k, v in BASE_SAMPLING.items() if k != "do_sample")
    subtitle = f"Gemma 3 270M base, {settings}, {samples} samples × {max_new_tokens} tokens, seed {SEED}"
    print(f"## Repetition study\n\nPrompt: {PROMPT!r}\n\n{subtitle}\n")
    print(markdown(results, noise, SEED))
    text, targets = comparison(results)
    print("\n" + text)
    plot(results, noise, targets, plot_path, subtitle)
    reused = f" (generating only what --reuse {args.reuse} lacked)" if args.reuse else ""
    print(f"\nwrote {plot_path}; wall time {elapsed:.0f} s{reused}")
    if args.save_json:
        args.save_json.write_text(json.dumps({"prompt": PROMPT, "seed": SEED, "samples": samples,
                                              "max_new_tokens": max_new_tokens, "base": BASE_SAMPLING,
                                              "families": results, "noise": noise, "wall_s": elapsed},
                                             ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""explore's cost per step against generate's per-token time, and a setting change, on the default model.

    python benchmarks/bench_explore.py [--tokens 48] [--repeats 3]

1. generate: ``run.generate`` (the command's own function, output thrown away), sampled (the model's top_k 64,
   top_p 0.95, temperature 0.8), EOS ignored: its decode time per token (the prompt's reading left out).
2. explore, the model side: ``Explorer.sample()`` and the next step's table (``preview()``): what Enter costs
   before drawing.
3. explore, the whole program (headless, 80×24): ``a`` running on over ``--tokens`` sampled steps (the screen
   drawn a few times a second), and Enter pressed ``--tokens`` times through Pilot, each press waited for: model,
   table, the screen drawn, and Pilot's own waits for the program to be idle.
4. A setting change (``e top_p 0.5``, then ``e top_k 20``): new settings, the table recomputed from the logits
   already there and drawn (no forward pass; the program's own timer), and the model side alone.
5. Undo then step again: cutting the cache back (one token read) against reading the prompt and path again.

generate with ``--candidates 10`` (a table after each token, what explore shows) is measured too.

Each is the best of ``--repeats`` runs, interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from llmsample import chat, models, presets, render, run
    from llmsample.cli import model_sampling
    from llmsample.explore import stepper
    from llmsample.explore.app import ExploreApp
    from llmsample.explore.stepper import Explorer

    prompt = "The capital of France is"
    lm = models.load(None, device="cpu", dtype="float32")
    layer = {"sampling": {"do_sample": True, "temperature": 0.8},
             "generation": {"max_new_tokens": args.tokens, "seed": 1}}
    settings = presets.resolve_settings(None, layer, model_sampling(None, False))
    ids = chat.prepare(lm.tokenizer, lm.name, prompt, False).ids

    def generate_per_token(candidates: int = 0) -> float:
        out, err = render.make_consoles(no_color=True, stdout=io.StringIO(), stderr=io.StringIO())
        opts = run.GenerateOptions(prompt=prompt, settings=settings, ignore_eos=True, chat=False,
                                   candidates=candidates)
        summary = run.generate(opts, render.TextRenderer(out, err), loaded=(lm, 0.0))
        stats = summary["stats"]
        return stats["decode_s"] / (stats["new_tokens"] - 1)  # the first token's draw is in the prefill's time

    def explorer() -> Explorer:
        return Explorer(lm, ids, settings, seed=1, eos=[], prompt_text=prompt)

    def explore_model_side() -> float:
        e = explorer()
        e.preview()
        start = time.perf_counter()
        for _ in range(args.tokens - 1):
            e.sample()
            e.preview()
        return (time.perf_counter() - start) / (args.tokens - 1)

    def explore_program() -> float:
        app = ExploreApp(explorer())
        took: list[float] = []

        async def go() -> None:
            async with app.run_test(size=(80, 24)) as pilot:
                await pilot.pause()
                start = time.perf_counter()
                for _ in range(args.tokens - 1):
                    await pilot.press("enter")
                await pilot.pause()
                took.append(time.perf_counter() - start)
                await pilot.press("q")

        asyncio.run(go())
        return took[0] / (args.tokens - 1)

    def explore_run_on() -> float:
        """``a``: sampled steps one after another in the program (the screen drawn a few times a second)."""
        app = ExploreApp(explorer())
        took: list[float] = []

        async def go() -> None:
            async with app.run_test(size=(80, 24)) as pilot:
                await pilot.pause()
                app.explorer.sample()  # the first step is the prefill's in generate's time
                app.redraw()
                start = time.perf_counter()
                await pilot.press("a")
                while app.running:
                    await asyncio.sleep(0.005)
                took.append(time.perf_counter() - start)
                await pilot.press("q")

        asyncio.run(go())
        return took[0] / (args.tokens - 1)

    def setting_change() -> tuple[float, float]:
        from llmsample.cli import settings_with

        base = [prompt, "--temperature", "0.8", "--seed", "1"]
        app = ExploreApp(explorer(), lambda extra: settings_with("explore", base, extra, None))
        drawn: list[float] = []

        async def go() -> None:
            async with app.run_test(size=(80, 24)) as pilot:
                await pilot.pause()
                for line in ("top_p 0.5", "top_k 20"):
                    await pilot.press("e")
                    await pilot.pause()
                    await pilot.press(*line, "enter")
                    await pilot.pause()
                    drawn.append(app.last_redraw_ms or float("inf"))
                await pilot.press("q")

        asyncio.run(go())
        e = explorer()
        e.preview()
        changed = settings_with("explore", base, ["--top-p", "0.5"], None)
        forwards = e.forwards
        start = time.perf_counter()
        e.configure(changed)
        e.preview()
        model_side = (time.perf_counter() - start) * 1000
        assert e.forwards == forwards
        return max(drawn), model_side

    def undo_and_step(cut: bool) -> float:
        """Undo, then step again (the fastest of five), ``args.tokens - 6`` tokens into the text."""
        e = explorer()
        for _ in range(args.tokens - 6):
            e.sample()
        original = stepper.rewind
        if not cut:
            stepper.rewind = lambda cache, length: False  # what a cache that cannot be cut back costs
        took = []
        try:
            for _ in range(5):
                e.undo()
                start = time.perf_counter()
                e.sample()
                took.append((time.perf_counter() - start) * 1000)
        finally:
            stepper.rewind = original
        return min(took)

    results: dict[str, list] = {k: [] for k in ("generate", "tables", "model", "program", "run_on", "change",
                                                "cut", "reread")}
    generate_per_token(), explore_model_side(), undo_and_step(True)  # warm-up: first calls pay one-off costs
    for _ in range(args.repeats):
        results["generate"].append(generate_per_token())
        results["tables"].append(generate_per_token(10))
        results["model"].append(explore_model_side())
        results["program"].append(explore_program())
        results["run_on"].append(explore_run_on())
        results["change"].append(setting_change())
        results["cut"].append(undo_and_step(True))
        results["reread"].append(undo_and_step(False))
    gen = min(results["generate"])
    model = min(results["model"])
    program = min(results["program"])
    drawn = min(c[0] for c in results["change"])
    change_model = min(c[1] for c in results["change"])
    print(f"default model ({lm.name}, {lm.engine} engine, cpu float32), {args.tokens} tokens, best of "
          f"{args.repeats}; chain {settings.sampling.describe_chain()}")
    tables = min(results["tables"])
    print(f"generate, per token:                     {1000 * gen:7.1f} ms")
    print(f"generate --candidates 10, per token:     {1000 * tables:7.1f} ms  ({100 * (tables / gen - 1):+.1f}%)")
    print(f"explore, model side (step + next table):  {1000 * model:7.1f} ms  ({100 * (model / gen - 1):+.1f}%)")
    run_on = min(results["run_on"])
    print(f"explore, a (run on, in the program):      {1000 * run_on:7.1f} ms  ({100 * (run_on / gen - 1):+.1f}%)")
    print(f"explore, Enter pressed through Pilot:     {1000 * program:7.1f} ms  ({100 * (program / gen - 1):+.1f}%; "
          f"the screen drawn after every step, and Pilot's own waits)")
    print(f"setting change, table recomputed + drawn: {drawn:7.1f} ms (worst of two changes; model side "
          f"{change_model:.1f} ms; no forward pass)")
    print(f"undo then step, {args.tokens - 6} tokens in: cache cut back {min(results['cut']):.1f} ms · prompt and "
          f"path read again {min(results['reread']):.1f} ms")


if __name__ == "__main__":
    main()

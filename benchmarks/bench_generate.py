"""End-to-end generation on the default model: llmsample's decode loop against transformers' ``generate`` and a bare
forward loop (the model's own limit), side by side in one process; start-up and peak memory in fresh processes.

    python benchmarks/bench_generate.py                  # CPU, 128 new tokens
    python benchmarks/bench_generate.py --tokens 64 --repeats 1

Every contender generates exactly ``--tokens`` tokens (EOS ignored) from the same prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
import time

PROMPT = "The history of the printing press"

SETTINGS = {
    "greedy": dict(do_sample=False),
    "T0.7+top_k50+top_p0.9": dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9),
    "T0.7+top_p0.9+rep1.3": dict(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.3),
}


def decode_speeds(tokens: int, repeats: int, batch: int, device: str, only: tuple[str, ...] = ()) -> list[dict]:
    import torch

    from llmsample.config import SamplingConfig
    from llmsample.decode import sample_loop
    from llmsample.models import load
    from llmsample.sampling import Sampler

    lm = load(device=device)
    model, tok = lm.model, lm.tokenizer
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(lm.device)
    batch_ids = ids.expand(batch, -1)

    def ours(settings: dict) -> None:
        cfg = SamplingConfig(**settings)
        g = torch.Generator(device=lm.device).manual_seed(0)
        for _ in sample_loop(model, batch_ids, Sampler(cfg), tokens, [], generator=g):
            pass

    def theirs(settings: dict) -> None:
        hf = dict(settings)
        if hf.get("do_sample"):
            hf.setdefault("top_k", 0)  # transformers would add top_k=50 on its own
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, num_return_sequences=batch,
                           pad_token_id=tok.pad_token_id, **hf)

    def bare(_: dict) -> None:
        with torch.inference_mode():
            out = model(input_ids=batch_ids, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(tokens - 1):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    rows = []
    ours(SETTINGS["greedy"])  # warm up
    for name, settings in SETTINGS.items():
        if only and name not in only:
            continue
        row = {"setting": name, "batch": batch}
        for label, fn in (("llmsample", ours), ("transformers", theirs), ("bare_loop", bare)):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(settings)
                times.append(time.perf_counter() - start)
            row[label] = tokens * batch / statistics.median(times)  # tokens/s, all samples together
        row["vs_transformers"] = row["llmsample"] / row["transformers"]
        row["vs_bare_loop"] = row["llmsample"] / row["bare_loop"]
        rows.append(row)
    return rows


START_OURS = "llmsample {prompt!r} --greedy --max-new-tokens 1 --device cpu --format json"
START_PLAIN = textwrap.dedent("""
    import time, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmsample.models import default_model_dir
    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok({prompt!r}, return_tensors="pt").input_ids
    model.generate(ids, max_new_tokens=1, do_sample=False)
""")


def process_figures(repeats: int) -> dict:
    """Wall time from process start to the first token, and peak memory (max RSS), in fresh processes."""
    def run(argv: list[str]) -> tuple[float, float]:
        wrapped = [sys.executable, "-c",
                   "import resource, subprocess, sys, time; t = time.perf_counter(); "
                   "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
                   "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)",
                   *argv]
        out = subprocess.run(wrapped, capture_output=True, text=True, check=True).stdout.split()
        return float(out[0]), float(out[1]) / 1024  # seconds, MiB

    ours_argv = ["bash", "-c", START_OURS.format(prompt=PROMPT)]
    plain_argv = [sys.executable, "-c", START_PLAIN.format(prompt=PROMPT)]
    run(ours_argv)  # the first run may convert the default model
    ours = [run(ours_argv) for _ in range(repeats)]
    plain = [run(plain_argv) for _ in range(repeats)]
    return {
        "start_to_first_token_s": {"llmsample": statistics.median(t for t, _ in ours),
                                   "transformers_script": statistics.median(t for t, _ in plain)},
        "peak_rss_mib": {"llmsample": max(m for _, m in ours), "transformers_script": max(m for _, m in plain)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rows = decode_speeds(args.tokens, args.repeats, 1, args.device)
    rows += decode_speeds(args.tokens, args.repeats, 8, args.device, only=("T0.7+top_k50+top_p0.9",))
    figures = process_figures(max(3, args.repeats))
    if args.json:
        print(json.dumps({"decode": rows, **figures}))
        return
    print(f"{args.tokens} new tokens, prompt {PROMPT!r}, device {args.device}; tokens/s over all samples")
    print(f"{'setting':24} {'batch':>5} {'llmsample':>10} {'generate':>9} {'bare loop':>10} {'vs gen':>7} {'vs bare':>8}")
    for r in rows:
        print(f"{r['setting']:24} {r['batch']:>5} {r['llmsample']:10.1f} {r['transformers']:9.1f} "
              f"{r['bare_loop']:10.1f} {r['vs_transformers']:7.2f} {r['vs_bare_loop']:8.2f}")
    s = figures["start_to_first_token_s"]
    m = figures["peak_rss_mib"]
    print(f"start to first token: llmsample {s['llmsample']:.2f} s, transformers script "
          f"{s['transformers_script']:.2f} s (ratio {s['llmsample'] / s['transformers_script']:.2f})")
    print(f"peak memory: llmsample {m['llmsample']:.0f} MiB, transformers script {m['transformers_script']:.0f} MiB")


if __name__ == "__main__":
    main()

"""CUDA decode, side by side: llmsample against transformers' ``generate`` with a static cache and torch.compile.

One script for one GPU run (about 5-8 minutes, most of it transformers' compilation), prepared while no GPU was
lent to this project: it prints tokens/s of both at batch 1 and 8 for greedy, T0.7+top_k50+top_p0.9 and
T0.7+top_p0.9+repetition_penalty1.3 on the default model in bfloat16, the ratio, and checks that greedy decoding
gives the same tokens (float32, where both compute the same sums; and how far bfloat16 agrees).

llmsample runs its own engine with a static KV cache, the decode step captured as a CUDA graph, and the sampler in
its sync-free mode (nothing read back within a step); what the command runs on CUDA.

    python benchmarks/bench_cuda.py                     # 128 new tokens, 2 repeats
    python benchmarks/bench_cuda.py --tokens 64 --repeats 1 --batches 1

Reference (the issue, an H100, same architecture, random bf16 weights): generate static+compile ≈ 275–304 tok/s
at batch 1 and ≈ 2,000–2,640 at batch 8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

PROMPT = "The history of the printing press"
SETTINGS = {
    "greedy": dict(do_sample=False),
    "T0.7+top_k50+top_p0.9": dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9),
    "T0.7+top_p0.9+rep1.3": dict(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.3),
}


def synced() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def ours(lm, ids: torch.Tensor, settings: dict, tokens: int) -> tuple[float, torch.Tensor]:
    from llmsample.config import SamplingConfig
    from llmsample.decode import sample_loop
    from llmsample.sampling import Sampler

    sampler = Sampler(SamplingConfig(**settings), sync_free=ids.is_cuda)
    generator = torch.Generator(device=ids.device).manual_seed(0)
    start = synced()
    steps = [step.token_ids for step in sample_loop(lm.language_model, ids, sampler, tokens, [], generator=generator)]
    elapsed = synced() - start
    return ids.shape[0] * tokens / elapsed, torch.stack(steps, dim=1)


def theirs(lm, ids: torch.Tensor, settings: dict, tokens: int) -> tuple[float, torch.Tensor]:
    options = dict(settings)
    if options.get("do_sample"):
        options.setdefault("top_k", 0)  # transformers would add top_k=50 on its own
    start = synced()
    with torch.inference_mode():
        out = lm.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, cache_implementation="static",
                                pad_token_id=lm.tokenizer.pad_token_id, **options)
    elapsed = synced() - start
    return ids.shape[0] * tokens / elapsed, out[:, ids.shape[1]:].cpu()


def greedy_agreement(tokens: int, device: str) -> dict:
    """Both engines in float32, batch 1, greedy: the same tokens expected; bfloat16: where they first differ."""
    from llmsample.models import load

    result = {}
    for dtype in ("float32", "bfloat16"):
        mine = load(device=device, dtype=dtype)
        reference = load(device=device, dtype=dtype, engine="transformers")
        ids = mine.tokenizer(PROMPT, return_tensors="pt").input_ids.to(device)
        a = ours(mine, ids, SETTINGS["greedy"], tokens)[1][0]
        b = theirs(reference, ids, SETTINGS["greedy"], tokens)[1][0]
        same = int((a == b).int().cumprod(0).sum())
        result[dtype] = {"same_tokens": same, "of": tokens}
        del mine, reference
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself (slow, no graphs)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA device (--device cpu for a dry run)")
    from llmsample.models import load

    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    print(f"{name} · torch {torch.__version__}", flush=True)
    agreement = greedy_agreement(32 if device == "cuda" else 4, device)
    print(json.dumps({"greedy_agreement": agreement}), flush=True)
    mine = load(device=device, dtype="bfloat16")
    reference = load(device=device, dtype="bfloat16", engine="transformers")
    assert mine.engine == "llmsample" and reference.engine == "transformers"
    prompt = mine.tokenizer(PROMPT, return_tensors="pt").input_ids.to(device)
    rows = []
    for batch in args.batches:
        ids = prompt.expand(batch, -1).contiguous()
        for name, settings in SETTINGS.items():
            for run in (ours, theirs):  # warm-up: graph capture, compilation
                run(mine if run is ours else reference, ids, settings, min(args.tokens, 16))
                run(mine if run is ours else reference, ids, settings, min(args.tokens, 16))
            speeds = {"llmsample": [], "transformers": []}
            for _ in range(args.repeats):
                speeds["llmsample"].append(ours(mine, ids, settings, args.tokens)[0])
                speeds["transformers"].append(theirs(reference, ids, settings, args.tokens)[0])
            row = {"batch": batch, "setting": name, **{k: statistics.median(v) for k, v in speeds.items()}}
            row["ratio"] = row["llmsample"] / row["transformers"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.tokens} new tokens, bfloat16, tokens/s over all rows (median of {args.repeats})")
    print(f"{'batch':>5} {'setting':<24} {'llmsample':>10} {'transformers':>13} {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:5d} {r['setting']:<24} {r['llmsample']:10.0f} {r['transformers']:13.0f} {r['ratio']:6.2f}")
    for dtype, agree in agreement.items():
        print(f"greedy, {dtype}: the first {agree['same_tokens']} of {agree['of']} tokens are the same")
    if agreement["float32"]["same_tokens"] != agreement["float32"]["of"]:
        sys.exit("greedy float32 output differs between llmsample and transformers")


if __name__ == "__main__":
    main()

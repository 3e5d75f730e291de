"""Time llmsample's sampling core against transformers' logits warpers, side by side in one run.

    python benchmarks/bench_sampler.py                 # CPU, real logits from the default model + random logits
    python benchmarks/bench_sampler.py --device cuda   # on a GPU (random logits unless --real works there)
    python benchmarks/bench_sampler.py --share-only    # only the last part: the sampler's share of a token's time

For each setting and batch size it reports, per decoding step:
- "process": the processed distribution (our ``Sampler.process`` vs transformers' warpers in their order);
- "step": processed distribution plus the draw (our ``Sampler.sample`` vs warpers + softmax + multinomial,
  which is what ``generate`` does);
- "step()": our ``Sampler.step`` (what the decode loop calls: the draw plus the chosen token's processed and raw
  probabilities and the entropy, which ``generate`` does not compute) against the same transformers step.
Gathering a step's rows out of the pool happens outside the timed span, for both sides.
Both sides produce the same removed set on every step (checked while timing), so the ratio compares equal work.
Both run on a steady heap (``steady_heap``: glibc's malloc keeps freed blocks instead of handing them back), as a
decode loop's heap is, so that a figure does not depend on which rows ran before it.

Last, on the CPU, the sampler's share of a decoding step where it runs for real: the default model decoding as a
run does (int8, torch's threads), each setting for ``--share-tokens`` tokens, ``Sampler.step`` timed inside the
decode loop against the whole step (forward, draw and loop), median ms per token of ``--share-repeats`` runs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from typing import Callable

import torch

from llmsample.config import SamplingConfig
from llmsample.sampling import Sampler

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press. Within fifty years printers had produced "
    "millions of books across Europe, and the price of a book fell so far that ordinary people could own one. "
    "大语言模型在生成文本时，会先根据上下文计算下一个词的概率分布，然后按照采样参数从中选择一个词。"
    "温度越低，输出越确定；温度越高，输出越多样。top_k 只保留概率最高的 k 个候选词，top_p 则保留累计概率达到 p 的最小集合。"
)

SETTINGS = {
    "T0.7+top_k50+top_p0.9": dict(temperature=0.7, top_k=50, top_p=0.9),
    "T0.7+top_p0.9": dict(temperature=0.7, top_p=0.9),
    "T0.7+top_p0.9+rep1.3": dict(temperature=0.7, top_p=0.9, repetition_penalty=1.3),
    "T0.7+epsilon3e-4": dict(temperature=0.7, epsilon_cutoff=3e-4),
    "T0.7+eta3e-4": dict(temperature=0.7, eta_cutoff=3e-4),
}

# The sampler's share of a token is also measured for what a run of the packaged model uses when not told otherwise.
SHARE_EXTRA = {"defaults: top_k64+top_p0.95": dict(top_k=64, top_p=0.95)}

# The stages transformers lacks, timed alone (goal: DRY ≤ 1 ms over a 4,096-token history, top-n-sigma and XTC
# ≤ 0.5 ms at vocab 262,144, batch 1). DRY's history repeats a 50-token phrase, so there are matches to extend;
# its breakers stand in for the ~1,300 tokens the default texts expand to on the default model.
STAGE_SETTINGS = {
    "dry (4096 history)": dict(dry_multiplier=0.8, dry_sequence_breakers=tuple((i,) for i in range(1300))),
    "top_n_sigma 1.0": dict(top_n_sigma=1.0),
    "xtc 0.1 (fires)": dict(xtc_probability=1.0, xtc_threshold=0.1),
    "dynatemp 0.5": dict(temperature=0.8, dynatemp_range=0.5),
    "mirostat v2": dict(mirostat=2),
    "logit_bias (50 tokens)": dict(logit_bias={i * 997: -5.0 for i in range(50)}),
    "penalties last_n 64": dict(repetition_penalty=1.1, penalty_last_n=64),
}


def real_logits(device: str) -> torch.Tensor:
    """Next-token logits of the default model at every position of a fixed English + Chinese text."""
    from llmsample.models import load

    lm = load(device=device)
    ids = lm.tokenizer(TEXT, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        return lm.language_model.all_logits(ids)[0].float()  # [positions, vocab]


def flat_rows(real: torch.Tensor) -> torch.Tensor:
    """The quarter of the real positions with the flattest next-token distributions (highest entropy): where a
    text opens up, top_p without top_k keeps thousands of tokens."""
    log_probs = torch.log_softmax(real.float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).nansum(-1)
    return real[entropy.topk(max(8, real.shape[0] // 4)).indices]


def nucleus_sizes(pool: torch.Tensor, p: float = 0.9) -> list[int]:
    probs = torch.softmax(pool.float(), dim=-1).sort(-1, descending=True).values
    return ((probs.cumsum(-1) - probs) < p).sum(-1).tolist()


def random_logits(n: int, vocab: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, vocab, generator=g) * 3).to(device)


def hf_warpers(cfg: SamplingConfig) -> list:
    from transformers.generation import logits_process as lp

    chain = []
    if cfg.repetition_penalty != 1.0:
        chain.append(lp.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    chain.append(lp.TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        chain.append(lp.TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        chain.append(lp.TopPLogitsWarper(cfg.top_p))
    if cfg.epsilon_cutoff > 0.0:
        chain.append(lp.EpsilonLogitsWarper(cfg.epsilon_cutoff))
    if cfg.eta_cutoff > 0.0:
        chain.append(lp.EtaLogitsWarper(cfg.eta_cutoff, device=cfg_device))
    return chain


cfg_device = "cpu"


def steady_heap() -> None:
    """Have glibc's malloc serve every tensor of a step from its heap, both sides alike.

    By default a freed block above a threshold goes back to the system, and glibc moves that threshold with what was
    freed last; so whether a step's 1 MB tensors come back as fresh pages (a page fault per 4 KB: a 1 MB division
    then takes 2-3 times as long) depends on what ran before, and single figures moved by up to 1.5x with the order
    of the rows. A decode loop's heap is already past it (the model's own tensors are larger); these settings put the
    benchmark there too. Elsewhere than glibc: nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)


def timed(fn: Callable[[torch.Tensor], torch.Tensor], make: Callable[[int], torch.Tensor], steps: int,
          device: str) -> float:
    """Median milliseconds per call of ``fn(make(i))`` over ``steps`` calls (after two warm-up calls).

    ``make(i)`` (the step's logits, gathered from the pool: a fresh copy, as a model's output is) runs outside
    the timed span: copying rows out of the pool is neither side's work, and at batch 1 it took ≈0.3 ms, as
    long as a whole llmsample step.
    """
    fn(make(0))
    fn(make(1))
    times = []
    for i in range(steps):
        x = make(i)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench(pool: torch.Tensor, batch: int, name: str, settings: dict, steps: int, device: str) -> dict:
    cfg = SamplingConfig(do_sample=True, order="hf", **settings)
    ours = Sampler(cfg)
    theirs = hf_warpers(cfg)
    history = torch.randint(0, 2000, (batch, 64), generator=torch.Generator().manual_seed(1)).to(device)
    rows = pool.shape[0]

    def step_logits(i: int) -> torch.Tensor:
        return pool[[(i * batch + b) % rows for b in range(batch)]]

    def hf_process(scores: torch.Tensor) -> torch.Tensor:
        for warper in theirs:
            scores = warper(history, scores)
        return scores

    def hf_step(scores: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(torch.softmax(hf_process(scores), -1), 1).squeeze(1)

    gen = torch.Generator(device=device).manual_seed(0)

    for i in range(min(steps, 8)):  # the two sides must agree before their times mean anything
        a, b = ours.process(history, step_logits(i)), hf_process(step_logits(i))
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            raise SystemExit(f"{name}: removed sets differ at step {i}")

    result = {"setting": name, "batch": batch}
    result["hf_process_ms"] = timed(hf_process, step_logits, steps, device)
    result["ours_process_ms"] = timed(lambda x: ours.process(history, x), step_logits, steps, device)
    result["hf_step_ms"] = timed(hf_step, step_logits, steps, device)
    result["ours_step_ms"] = timed(lambda x: ours.sample(history, x, generator=gen), step_logits, steps, device)
    # What the decode loop calls: the draw plus the chosen token's processed and raw probability and the entropy
    # (transformers' generate computes none of these three).
    result["ours_full_step_ms"] = timed(lambda x: ours.step(history, x, generator=gen), step_logits, steps, device)
    result["process_speedup"] = result["hf_process_ms"] / result["ours_process_ms"]
    result["step_speedup"] = result["hf_step_ms"] / result["ours_step_ms"]
    result["full_step_speedup"] = result["hf_step_ms"] / result["ours_full_step_ms"]
    return result


def bench_stage(pool: torch.Tensor, batch: int, name: str, settings: dict, steps: int, device: str) -> dict:
    """One of the stages transformers lacks: ``process`` (the stage alone) and a whole ``step`` (with the draw)."""
    sampler = Sampler(SamplingConfig(do_sample=True, **settings))
    phrase = torch.randint(0, 2000, (50,), generator=torch.Generator().manual_seed(2))
    history = phrase.repeat(4096 // 50 + 1)[:4096].expand(batch, -1).contiguous().to(device)
    rows = pool.shape[0]
    gen = torch.Generator(device=device).manual_seed(0)

    def step_logits(i: int) -> torch.Tensor:
        return pool[[(i * batch + b) % rows for b in range(batch)]]

    return {"setting": name, "batch": batch,
            "process_ms": timed(lambda x: sampler.process(history, x, generator=gen), step_logits, steps, device),
            "step_ms": timed(lambda x: sampler.step(history, x, generator=gen), step_logits, steps, device)}


def decode_share(settings: dict[str, dict], tokens: int, repeats: int) -> list[dict]:
    """Median ms per token of ``Sampler.step`` and of the whole decoding step, per setting, on the default model as
    a run on the CPU loads it."""
    from llmsample.decode import sample_loop
    from llmsample.models import load

    lm = load(device="cpu", quantize="int8")
    ids = lm.tokenizer(TEXT[:200], return_tensors="pt").input_ids
    rows = []
    for name, chosen in {"greedy": {}, **SHARE_EXTRA, **settings}.items():
        cfg = SamplingConfig(do_sample=bool(chosen), **chosen)
        sampler_ms: list[float] = []
        step_ms: list[float] = []
        for _ in range(repeats):
            sampler = Sampler(cfg)
            plain_step = sampler.step

            def timed_step(*args, **kwargs):
                start = time.perf_counter()
                choice = plain_step(*args, **kwargs)
                sampler_ms.append((time.perf_counter() - start) * 1e3)
                return choice

            sampler.step = timed_step  # type: ignore[method-assign]
            last = time.perf_counter()
            for i, _ in enumerate(sample_loop(lm.language_model, ids, sampler, tokens, (),
                                              generator=torch.Generator().manual_seed(0))):
                now = time.perf_counter()
                if i:  # the first step holds the prompt's forward
                    step_ms.append((now - last) * 1e3)
                last = now
        rows.append({"setting": name, "sampler_ms": statistics.median(sampler_ms),
                     "token_ms": statistics.median(step_ms)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=262_144, help="vocab size of the random logits")
    parser.add_argument("--no-real", action="store_true", help="skip the default model's logits")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    parser.add_argument("--share-tokens", type=int, default=64)
    parser.add_argument("--share-repeats", type=int, default=3)
    parser.add_argument("--share-only", action="store_true", help="only the sampler's share of a decoding step")
    args = parser.parse_args()
    steady_heap()
    if args.share_only:
        print_share(args)
        return
    global cfg_device
    cfg_device = args.device

    pools = {}
    if not args.no_real:
        pools["real"] = real_logits(args.device)
        pools["flat"] = flat_rows(pools["real"])
    pools["random"] = random_logits(64, args.vocab, args.device)

    rows = []
    for source, pool in pools.items():
        for batch in (1, 8):
            for name, settings in SETTINGS.items():
                row = bench(pool, batch, name, settings, args.steps, args.device)
                row["logits"] = source
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
    if not args.json:
        print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
              f"vocab={pools['random'].shape[-1]}")
        for source, pool in pools.items():
            sizes = sorted(nucleus_sizes(pool))
            print(f"{source}: {pool.shape[0]} rows, raw top_p 0.9 nucleus median {sizes[len(sizes) // 2]} tokens "
                  f"(min {sizes[0]}, max {sizes[-1]})")
        header = f"{'logits':7} {'setting':24} {'batch':>5} {'hf proc':>8} {'ours':>7} {'x':>6}   " \
                 f"{'hf step':>8} {'ours':>7} {'x':>6}   {'step()':>7} {'x':>6}"
        print(header)
        for r in rows:
            print(f"{r['logits']:7} {r['setting']:24} {r['batch']:>5} {r['hf_process_ms']:8.2f} "
                  f"{r['ours_process_ms']:7.2f} {r['process_speedup']:6.1f}   {r['hf_step_ms']:8.2f} "
                  f"{r['ours_step_ms']:7.2f} {r['step_speedup']:6.1f}   {r['ours_full_step_ms']:7.2f} "
                  f"{r['full_step_speedup']:6.1f}")
        print("times: median ms per decoding step; x = transformers time / llmsample time; step() = "
              "Sampler.step, the draw plus the token's probabilities and the entropy, against the same hf step")
    stage_rows = []
    pool = pools.get("real", pools["random"])
    for batch in (1, 8):
        for name, settings in STAGE_SETTINGS.items():
            row = bench_stage(pool, batch, name, settings, args.steps, args.device)
            stage_rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print(f"\nstages transformers lacks ({'real' if 'real' in pools else 'random'} logits; alone in the chain)")
        print(f"{'setting':26} {'batch':>5} {'process':>8} {'step':>8}")
        for r in stage_rows:
            print(f"{r['setting']:26} {r['batch']:>5} {r['process_ms']:8.2f} {r['step_ms']:8.2f}")
    if args.device == "cpu" and not args.no_real:
        print_share(args)
    sys.stdout.flush()


def print_share(args: argparse.Namespace) -> None:
    rows = decode_share(SETTINGS, args.share_tokens, args.share_repeats)
    if args.json:
        for row in rows:
            print(json.dumps(row), flush=True)
        return
    print(f"\nthe sampler's share of a decoding step (default model, int8, {torch.get_num_threads()} threads, "
          f"batch 1, {args.share_tokens} tokens, median of {args.share_repeats} runs)")
    width = max(len(r["setting"]) for r in rows)
    print(f"{'setting':{width}} {'Sampler.step':>12} {'whole step':>11} {'share':>7}")
    for r in rows:
        print(f"{r['setting']:{width}} {r['sampler_ms']:10.2f}ms {r['token_ms']:9.2f}ms "
              f"{100 * r['sampler_ms'] / r['token_ms']:6.1f}%")


if __name__ == "__main__":
    main()

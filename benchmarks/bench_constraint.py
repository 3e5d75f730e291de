"""The constraint stage on the default model (Gemma 3 270M, 262,144 tokens): mask time, set-up, decode overhead.

    python benchmarks/bench_constraint.py [--tokens 64] [--repeats 3]

1. Mask time per token at batch 1: the whole stage (llguidance's mask, unpacking it, removing the forbidden
   logits, the raw mass it cut) along a fixed valid answer to a JSON schema, and llguidance's mask alone.
2. Set-up: reading the vocabulary as bytes the first time (no cache), again in a new process (from the cache),
   and compiling the schema; then what a user waits for: whole ``llmsample`` runs (one new token) with a
   constraint and without, in new processes, alternating, best and median of ``--repeats`` + 2 each (the byte
   table in the cache: what every later run with a constraint pays).
3. Decode: tokens/s of llmsample's decode loop (T 0.7, top_k 50, top_p 0.9) on the default model as a run on the
   CPU loads it (int8), with the schema and without it, the same number of tokens (EOS ignored), best of
   ``--repeats`` runs each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Tokyo"]},
        "summary": {"type": "string"},
    },
    "required": ["name", "age", "tags", "city", "summary"],
    "additionalProperties": False,
}
ANSWER = ('{"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"], "city": "Paris", "summary": "She wrote '
          'the first published algorithm meant for a machine, notes on the Analytical Engine of Charles Babbage."}')


def _ms(seconds: list[float]) -> str:
    ms = sorted(1000 * s for s in seconds)
    return (f"mean {statistics.mean(ms):.3f} · median {statistics.median(ms):.3f} · "
            f"p90 {ms[int(0.9 * (len(ms) - 1))]:.3f} · max {ms[-1]:.3f}")


def mask_times(lm, eos: list[int]) -> None:
    import llguidance.torch as lt
    import torch

    from llmsample import grammar
    from llmsample.sampling.constraint import constrain
    from llmsample.sampling.candidates import Candidates
    from llmsample.sampling.stages import History

    table = grammar.token_table(lm.tokenizer, eos)
    answer = lm.tokenizer.encode(ANSWER, add_special_tokens=False) + [eos[0]]
    logits = torch.randn(1, 262144)
    constraint = grammar.Constraint("json_schema", json.dumps(SCHEMA), table)
    constraint.check_satisfiable()  # the first mask builds the lexer: a run pays it before its first token
    for _ in range(2):  # the first pass warms llguidance's lexer caches, as the first tokens of a run do
        stage, alone = [], []
        for i in range(len(answer)):
            generated = torch.tensor([answer[:i]], dtype=torch.long)
            start = time.perf_counter()
            allowed = constraint.allowed_bits(generated)
            constrain(Candidates.from_logits(logits), History(generated, raw_logits=logits), allowed)
            stage.append(time.perf_counter() - start)
        parser = constraint._start.deep_copy()
        bitmask = lt.allocate_token_bitmask(1, table.vocab_size)
        for token in answer:
            start = time.perf_counter()
            lt.fill_next_token_bitmask(parser, bitmask, 0)
            alone.append(time.perf_counter() - start)
            assert parser.consume_token(token), parser.get_error()
    print(f"mask per token, {len(answer)} tokens, batch 1 (ms):")
    print(f"  the stage:          {_ms(stage)}")
    print(f"  llguidance's mask:  {_ms(alone)}")


def setup_times(lm, eos: list[int]) -> None:
    from llmsample import grammar

    with tempfile.TemporaryDirectory() as folder:
        grammar._table_dir = lambda: Path(folder)  # an empty cache, for this measurement only
        grammar._TABLES.clear()
        start = time.perf_counter()
        table = grammar.token_table(lm.tokenizer, eos)
        cold = time.perf_counter() - start
        grammar._TABLES.clear()  # as a new process would
        start = time.perf_counter()
        grammar.token_table(lm.tokenizer, eos)
        warm = time.perf_counter() - start
    start = time.perf_counter()
    grammar.Constraint("json_schema", json.dumps(SCHEMA), table).check_satisfiable()
    compile_s = time.perf_counter() - start
    print(f"set-up: vocabulary as bytes, first run {cold:.2f} s, later runs (cached) {warm:.2f} s; "
          f"schema compile + first mask {1000 * compile_s:.1f} ms")


def process_times(repeats: int) -> None:
    import subprocess
    import sys

    base = [sys.executable, "-m", "llmsample", "The capital of France is", "--max-new-tokens", "1", "--seed", "1"]
    runs = {"without": base, "with --regex": base + ["--regex", "[A-Z][a-z]+"]}
    subprocess.run(runs["with --regex"], check=True, capture_output=True)  # the byte table is in the cache now
    walls: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats + 2):
        for name, command in runs.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            walls[name].append(time.perf_counter() - start)
    text = ", ".join(f"{name} a constraint {min(w):.2f} s (median {statistics.median(w):.2f})"
                     for name, w in walls.items())
    extra = min(walls["with --regex"]) - min(walls["without"])
    print(f"a whole later run, one token, best of {repeats + 2}: {text}; the constraint adds {extra:+.2f} s")


def decode_times(lm, eos: list[int], tokens: int, repeats: int) -> None:
    import torch

    from llmsample import grammar
    from llmsample.config import SamplingConfig
    from llmsample.decode import sample_loop
    from llmsample.sampling import Sampler

    prompt = lm.tokenizer("A person, as JSON:", return_tensors="pt").input_ids
    base = SamplingConfig(do_sample=True, temperature=0.7, top_k=50, top_p=0.9)
    runs = {"unconstrained": base, "json schema": base.replace(json_schema=json.dumps(SCHEMA))}
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, cfg in runs.items():
            sampler = Sampler(cfg, state=grammar.bind(cfg, lm.tokenizer, eos))
            generator = torch.Generator().manual_seed(0)
            start = time.perf_counter()
            count = sum(1 for _ in sample_loop(lm.model, prompt, sampler, tokens, (), generator=generator))
            rate = count / (time.perf_counter() - start)
            best[name] = max(best.get(name, 0.0), rate)
    ratio = best["json schema"] / best["unconstrained"]
    print(f"decode, {tokens} tokens, best of {repeats}: unconstrained {best['unconstrained']:.1f} tok/s, "
          f"json schema {best['json schema']:.1f} tok/s ({ratio:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from llmsample import models
    from llmsample.run import eos_ids

    lm = models.load(None, quantize="int8")  # what a run on the CPU uses by default (the compiled int8 step)
    eos = eos_ids(lm)
    setup_times(lm, eos)
    process_times(args.repeats)
    mask_times(lm, eos)
    decode_times(lm, eos, args.tokens, args.repeats)


if __name__ == "__main__":
    main()

"""Which grammar engine for the constraint stage? llguidance, xgrammar and outlines-core on Gemma 3's vocabulary.

For each engine installed: the tokenizer set-up (once per model), compiling a small JSON schema, and the time to
compute one token mask (the allowed-token set for the next step) at batch 1, along a fixed valid answer, median
over its tokens. Run from a checkout with the default model converted once (any llmsample run does that):

    python benchmarks/compare_grammar_engines.py

Engines that are not installed are skipped (``pip install llguidance xgrammar outlines-core``).
"""

from __future__ import annotations

import json
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Tokyo"]},
    },
    "required": ["name", "age", "tags", "city"],
    "additionalProperties": False,
}
# One line, ", " and ": " between items (llmsample's JSON style).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANSWER = '{"name": "Ada Lovelace, the first programmer", "age": 36, "tags": ["math", "poetry"], "city": "Paris"}'


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_llguidance(tokenizer_json: str, eos: int, answer_ids: list[int]) -> dict:
    import llguidance
    import llguidance.torch as lt

    tok, setup = _timed(lambda: llguidance.LLTokenizer(tokenizer_json, eos_token=eos))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                            defaults=JSON_OPTIONS)
    matcher, compile_s = _timed(lambda: llguidance.LLMatcher(tok, grammar, log_level=0))
    mask = lt.allocate_token_bitmask(1, tok.vocab_size)
    times = []
    for token in answer_ids:
        _, t = _timed(lambda: lt.fill_next_token_bitmask(matcher, mask, 0))
        times.append(t)
        assert matcher.consume_token(token), matcher.get_error()
    return {"setup_s": setup, "compile_s": compile_s, "mask_ms": times}


def bench_xgrammar(folder: str, answer_ids: list[int]) -> dict:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=f"{folder}/tokenizer.json")
    info, setup = _timed(lambda: xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf)))
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    compiled, compile_s = _timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                                           separators=(", ", ": ")))
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for token in answer_ids:
        _, t = _timed(lambda: matcher.fill_next_token_bitmask(mask, 0))
        times.append(t)
        assert matcher.accept_token(token)
    return {"setup_s": setup, "compile_s": compile_s, "mask_ms": times}


def bench_outlines(tokenizer_json: str, eos: int, answer_ids: list[int]) -> dict:
    import llguidance  # only to decode each token to its bytes (SentencePiece's "▁" and <0xXX> byte fallback)
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    decoder = llguidance.LLTokenizer(tokenizer_json, eos_token=eos)

    def vocabulary():
        tokens: dict[bytes, list[int]] = {}
        for i in range(decoder.vocab_size):
            if i != eos and not decoder.is_special_token(i):
                tokens.setdefault(decoder.decode_bytes([i]), []).append(i)
        return Vocabulary(eos, tokens)

    vocab, setup = _timed(vocabulary)
    regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=" ?")
    index, compile_s = _timed(lambda: Index(regex, vocab))
    guide = Guide(index)
    times = []
    for token in answer_ids[:-1]:  # outlines-core's guide ends at the final state; EOS is not advanced through
        _, t = _timed(guide.get_tokens)
        times.append(t)
        guide.advance(token)
    return {"setup_s": setup, "compile_s": compile_s, "mask_ms": times}


def main() -> None:
    from llmsample import models
    from llmsample.tokenizer import FastTokenizer

    folder = models.ensure_default_model()
    tokenizer = FastTokenizer.from_folder(folder)
    tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
    answer_ids = tokenizer.encode(ANSWER, add_special_tokens=False) + [tokenizer.eos_token_id]
    print(f"vocabulary {len(tokenizer)}, answer {len(answer_ids)} tokens")
    print("| engine | tokenizer set-up (s) | schema compile (ms) | mask ms/token: mean | median | p90 | max |")
    print("|---|---|---|---|---|---|---|")
    runs = {
        "llguidance": lambda: bench_llguidance(tokenizer_json, tokenizer.eos_token_id, answer_ids),
        "xgrammar": lambda: bench_xgrammar(str(folder), answer_ids),
        "outlines-core": lambda: bench_outlines(tokenizer_json, tokenizer.eos_token_id, answer_ids),
    }
    for name, run in runs.items():
        try:
            result = run()
        except ImportError as exc:
            print(f"| {name} | not installed ({exc.name}) | | | | | |")
            continue
        ms = sorted(t * 1000 for t in result["mask_ms"])
        p90 = ms[int(0.9 * (len(ms) - 1))]
        print(f"| {name} | {result['setup_s']:.2f} | {result['compile_s'] * 1000:.1f} | "
              f"{statistics.mean(ms):.3f} | {statistics.median(ms):.3f} | {p90:.3f} | {ms[-1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()

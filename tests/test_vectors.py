"""The stages against the peers' own unit tests: llama.cpp's tests/test-sampling.cpp and transformers'
tests/generation/test_logits_process.py, as vectors in tests/vectors/ (see its README for their harnesses)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmsample.sampling import stages
from llmsample.sampling.biases import bad_words, sequence_bias
from llmsample.sampling.candidates import Candidates
from llmsample.sampling.dry import dry
from llmsample.sampling.stages import History
from llmsample.sampling.truncation import epsilon, eta, top_n_sigma, xtc

HERE = Path(__file__).parent / "vectors"
LLAMA = json.loads((HERE / "llama_cpp_sampling.json").read_text())["cases"]
HF = json.loads((HERE / "transformers_logits_process.json").read_text())["cases"]


def _floats(rows):
    return torch.tensor([[float("-inf") if v == "-inf" else v for v in row] for row in rows], dtype=torch.float32)


def _apply_llama(case: dict) -> Candidates:
    params = case["params"]
    probs = torch.tensor([case["input_probs"]], dtype=torch.float32)
    c = Candidates.from_logits(probs.log())
    name = case["sampler"]
    min_keep = max(1, params.get("min_keep", 1))
    history = History(torch.tensor([case.get("extra", {}).get("history", [])], dtype=torch.long))
    if name == "temp":
        return stages.temperature(c, params["temp"])
    if name == "temp_ext":
        if params["delta"] > 0:
            return stages.dynamic_temperature(c, params["temp"], params["delta"], params["exponent"])
        return stages.temperature(c, params["temp"])
    if name == "top_k":
        return stages.top_k(c, params["k"])
    if name == "top_p":
        return stages.top_p(c, params["p"], min_keep) if params["p"] < 1 else c
    if name == "min_p":
        return stages.min_p(c, params["p"], min_keep)
    if name == "typical":
        return stages.typical_p(c, params["p"], min_keep)
    if name == "top_n_sigma":
        return top_n_sigma(c, float(params["n"]))
    if name == "xtc":
        fired = History(history.input_ids, replay={"xtc": torch.tensor([True])})  # their RNG fires at p=0.99
        return xtc(c, fired, params["probability"], params["threshold"], min_keep)
    if name == "penalties":
        return stages.penalties(c, history, params["penalty_repeat"], params["penalty_freq"],
                                params["penalty_present"], params["penalty_last_n"])
    if name == "dry":
        breakers = tuple(tuple(b) for b in case["extra"].get("seq_breakers", []))
        return dry(c, history, params["dry_multiplier"], params["dry_base"], params["dry_allowed_length"],
                   params["dry_penalty_last_n"], breakers)
    raise KeyError(name)


SIMPLE = [c for c in LLAMA if c["sampler"] != "sampler_queue"]


@pytest.mark.parametrize("case", SIMPLE, ids=[c["id"] for c in SIMPLE])
def test_llama_cpp_vectors(case):
    if case["sampler"] == "min_p" and case["params"]["p"] > 1:
        pytest.skip("min_p > 1 is refused by llmsample's settings (range [0, 1])")
    out = _apply_llama(case).dense()[0]
    expected = {int(k): v for k, v in case["expected_by_token"].items()}
    kept = {i for i in range(out.shape[0]) if math.isfinite(out[i])}
    if case["sampler"] in ("penalties", "dry"):  # they never remove; a heavy penalty leaves p ≈ 0
        assert kept == set(range(out.shape[0]))
    else:
        assert kept == {t for t, p in expected.items() if p > 0}, case["note"]
    renormalised = case["sampler"] not in ("xtc", "typical")  # their harness skips dist for these two
    probs = torch.softmax(out, -1) if renormalised else torch.tensor(case["input_probs"])
    for token in range(out.shape[0]) if renormalised else kept:
        assert abs(float(probs[token]) - expected.get(token, 0.0)) < 1e-5, (token, float(probs[token]))


QUEUE = [c for c in LLAMA if c["sampler"] == "sampler_queue"]


@pytest.mark.parametrize("case", QUEUE, ids=[c["id"] for c in QUEUE])
def test_llama_cpp_sampler_queue(case):
    """logit_i = ln i over 10,000 tokens through a sequence of top_k / top_p / min_p, sizes checked per stage."""
    params = case["params"]
    n = params["n_vocab"]
    c = Candidates.from_logits(torch.log(torch.arange(n, dtype=torch.float32)).unsqueeze(0))
    for letter, expected in zip(params["sequence"], case["expected_stages"]):
        if letter == "k":
            c = stages.top_k(c, params["top_k"])
        elif letter == "p":
            c = stages.top_p(c, params["top_p"]) if params["top_p"] < 1 else c
        else:
            c = stages.min_p(c, params["min_p"])
        alive = c.token_ids()[torch.isfinite(c.logits)]
        # Token 0's logit is ln 0 = -inf: llama.cpp's array still holds it, llmsample counts it as removed.
        holds_zero = expected["asserted_last_id"] == 0
        assert alive.numel() == expected["asserted_size"] - holds_zero, (letter, expected)
        assert int(alive.max()) == expected["asserted_first_id"]
        assert int(alive.min()) == max(1, expected["asserted_last_id"])


def _apply_hf(case: dict, scores: torch.Tensor) -> torch.Tensor:
    name, args = case["processor"], case["constructor_args"]
    keep = args.get("min_tokens_to_keep", 1) if isinstance(args, dict) else 1
    c = Candidates.from_logits(scores)
    ids = torch.tensor(case["input_ids"]) if case.get("input_ids") else torch.zeros(scores.shape[0], 0, dtype=torch.long)
    if name == "TopPLogitsWarper":
        return stages.top_p(c, args["top_p"], keep).dense()
    if name == "TopKLogitsWarper":
        return stages.top_k(c, args["top_k"], keep).dense()
    if name == "MinPLogitsWarper":
        return stages.min_p(c, args["min_p"], keep).dense()
    if name == "TypicalLogitsWarper":
        return stages.typical_p(c, args["mass"], keep).dense()
    if name == "EpsilonLogitsWarper":
        return epsilon(c, args["epsilon"], keep).dense()
    if name == "EtaLogitsWarper":
        return eta(c, args["epsilon"], keep).dense()
    if name == "SequenceBiasLogitsProcessor":
        return sequence_bias(c, History(ids), {tuple(k): v for k, v in args["sequence_bias"]}).dense()
    if name == "NoBadWordsLogitsProcessor":
        # transformers drops a ban that is the EOS token alone (generate's rule); llmsample bans what it is given.
        words = tuple(tuple(w) for w in args["bad_words_ids"] if w != [args.get("eos_token_id")])
        return bad_words(c, History(ids), words).dense()
    if name == "RepetitionPenaltyLogitsProcessor":
        history = History(ids, prompt_len=ids.shape[1])
        return stages.penalties(c, history, args["penalty"], prompt_ignore_length=args.get("prompt_ignore_length", 0)).dense()
    raise KeyError(name)


HF_CASES = [c for c in HF if c["processor"] != "TemperatureLogitsWarper" and "upstream_status" not in c]


@pytest.mark.parametrize("case", HF_CASES, ids=[f"{c['processor']}-{c['case']}" for c in HF_CASES])
def test_transformers_vectors(case):
    scores = _floats(case["input_scores"])
    out = _apply_hf(case, scores)
    expected = case["expected"]
    filter_value = case["constructor_args"].get("filter_value", "-inf")
    removed = ~torch.isfinite(out)
    if "output_scores" in expected and filter_value == "-inf":
        want = _floats(expected["output_scores"])
        assert torch.equal(removed, ~torch.isfinite(want))
        torch.testing.assert_close(out[~removed], want[~removed], atol=1e-6, rtol=0)
    else:  # filter_value 0.0: transformers writes 0 where it removed; compare what is kept
        want = _floats(expected["output_scores"])
        shown = out.masked_fill(removed, 0.0)
        torch.testing.assert_close(shown, want, atol=1e-6, rtol=0)

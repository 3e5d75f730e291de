"""The new stages from the command line, on the tiny model: flags, texts turned into tokens, what JSON records,
candidate-table columns, inspect and sweep, and one clear line for every bad value."""

from __future__ import annotations

import json

import pytest
import torch

from llmsample.config import SamplingConfig
from llmsample.sampling import Sampler
from llmsample.token_text import breaker_sequences, encoder, vocab_texts


@pytest.fixture
def tiny(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "6", "--ignore-eos",
            "--seed", "3"]


def run_json(cli, *args):
    code, out, err = cli(*args, "--format", "json")
    assert code == 0, err
    return json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} is not JSON")), err


def test_logit_bias_by_text_and_by_id_steers_greedy_decoding(cli, tiny, tiny_lm):
    _, tok = tiny_lm
    plain, _ = run_json(cli, "The quick", *tiny, "--greedy")
    first = plain["samples"][0]["token_ids"][0]
    text = tok.decode([first])
    for given in (f"{first}=-inf", f"{text}=-inf"):
        steered, _ = run_json(cli, "The quick", *tiny, "--greedy", "--logit-bias", given)
        assert first not in steered["samples"][0]["token_ids"]
        assert steered["settings"]["logit_bias"] == {given.rpartition("=")[0]: "-inf"}  # valid JSON: no -Infinity


def test_ban_removes_a_whole_token_sequence(cli, tiny, tiny_lm):
    _, tok = tiny_lm
    plain, _ = run_json(cli, "The quick", *tiny, "--greedy")
    ids = plain["samples"][0]["token_ids"][:2]
    banned, _ = run_json(cli, "The quick", *tiny, "--greedy", "--ban", tok.decode(ids))
    assert banned["samples"][0]["token_ids"][:2] != ids


def test_xtc_and_mirostat_decisions_are_in_json_and_jsonl(cli, tiny):
    data, _ = run_json(cli, "The quick", *tiny, "--xtc-probability", "0.5", "--xtc-threshold", "0.01",
                       "--mirostat", "2", "--mirostat-tau", "4")
    sample = data["samples"][0]
    assert len(sample["xtc_fired"]) == len(sample["token_ids"]) == len(sample["mirostat_mu"])
    assert sample["mirostat_mu"][0] == 8.0  # μ starts at 2τ
    assert data["settings"]["chain"] == "logits -> xtc -> mirostat(v2)"
    code, out, err = cli("The quick", *tiny, "--xtc-probability", "0.5", "--format", "jsonl", "--candidates", "3")
    tokens = [e for e in map(json.loads, out.splitlines()) if e["type"] == "token"]
    assert tokens and all("xtc_fired" in t and t["candidates"]["stages"] == ["xtc"] for t in tokens)


def test_candidate_tables_have_a_column_per_new_stage(cli, tiny):
    code, out, err = cli("The quick", *tiny, "--top-n-sigma", "2", "--dry-multiplier", "0.8", "--epsilon-cutoff",
                         "0.001", "--temperature", "0.8", "--candidates", "4", "--no-color")
    assert code == 0, err
    assert "dry → nσ → eps → temp" in err
    assert "nσ%" in err and "dry%" in err


def test_same_seed_same_text_with_every_random_stage(cli, tiny):
    args = ["The quick", *tiny, "--xtc-probability", "0.7", "--dynatemp-range", "0.5", "--mirostat", "1"]
    assert run_json(cli, *args)[0]["text"] == run_json(cli, *args)[0]["text"]


def test_inspect_and_sweep_take_the_new_settings(cli, tiny_model_dir):
    model = ["--model", str(tiny_model_dir), "--device", "cpu"]
    code, out, err = cli("inspect", "The quick", *model, "--top-n-sigma", "0.5", "--top-n-sigma", "2",
                         "--format", "json")
    assert code == 0, err
    kept = [v["kept"] for v in json.loads(out)["steps"][0]["variants"]]
    assert kept[0] < kept[1]
    code, out, err = cli("sweep", "The quick", *model, "--grid", "dry_multiplier=0,0.8", "--grid",
                         "xtc_probability=0,0.5", "--samples", "2", "--max-new-tokens", "4", "--format", "json")
    assert code == 0, err
    assert len(json.loads(out)["points"]) == 4


def test_explain_shows_the_chain_and_where_each_value_came_from(cli, tiny):
    code, _, err = cli("The quick", *tiny, "--dry-multiplier", "0.8", "--repeat-last-n", "64",
                       "--repetition-penalty", "1.1", "--explain", "--no-color")
    assert code == 0, err
    assert "chain: logits -> penalties -> dry -> dist" in err
    assert "penalty_last_n" in err and "command line" in err


def test_an_alias_flag_sets_its_setting_and_help_names_it_beside_the_first_flag(cli, tiny, monkeypatch):
    """llama.cpp's names (--repeat-last-n, --dynatemp-exponent) work; --help lists each setting under its first
    flag, naming the alias in its help, so long alias pairs do not squeeze the help column; both at once: exit 2."""
    for flags in (("--penalty-last-n", "8"), ("--repeat-last-n", "8")):
        code, out, err = cli("The quick", *tiny, "--repetition-penalty", "1.1", *flags, "--max-new-tokens", "2",
                             "--format", "json")
        assert code == 0, err
        assert json.loads(out)["settings"]["penalty_last_n"] == 8
    code, out, err = cli("The quick", *tiny, "--penalty-last-n", "8", "--repeat-last-n", "9")
    assert code == 2 and out == "" and "--penalty-last-n and --repeat-last-n are one setting: give it once" in err
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = cli("generate", "--help")
    words = " ".join(out.replace("│", " ").split())
    assert code == 0 and "--penalty-last-n" in out and "(also --repeat-last-n)" in words
    assert "--penalty-last-n,--repeat-last-n" not in out and "--dynatemp-exp,--dynatemp-exponent" not in out


@pytest.mark.parametrize("args, message", [
    (["--logit-bias", "abc"], "--logit-bias takes TOKEN=BIAS (a token id or text, and a number), got 'abc'"),
    (["--logit-bias", "5=x"], "--logit-bias '5=x': the bias 'x' is not a number"),
    (["--logit-bias", "5=inf"], "--logit-bias '5=inf': the bias must be a finite number or -inf"),
    (["--logit-bias", "99999=1"], "logit_bias: token id 99999 is beyond the vocabulary"),
    (["--ban", ""], "--ban needs a non-empty text, got ''"),
    (["--dry-multiplier", "0.8", "--dry-sequence-breaker", ""], "--dry-sequence-breaker needs a non-empty text"),
    (["--xtc-threshold", "2"], "--xtc-threshold must be in [0, 1], got 2.0"),
    (["--mirostat", "3"], "--mirostat must be 0 or 1 or 2, got 3"),
    (["--min-keep", "0"], "--min-keep must be an integer >= 1, got 0"),
    (["--penalty-last-n", "-5"], "--penalty-last-n must be an integer >= -1, got -5"),
    (["--dynatemp-exp", "nan"], "--dynatemp-exp must be a number, got nan"),
    (["--order", "top_k,dry,xtcc"], "order has an unknown stage 'xtcc' (did you mean 'xtc'?)"),
])
def test_bad_values_are_one_line_exit_2(cli, tiny, args, message):
    code, out, err = cli("The quick", *tiny, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err


def test_a_logit_bias_text_of_several_tokens_is_refused(cli, tiny, tiny_lm):
    _, tok = tiny_lm
    text = "quick brown fox jumps"
    assert len(tok.encode(text, add_special_tokens=False)) > 1
    code, out, err = cli("The quick", *tiny, "--logit-bias", f"{text}=2")
    assert code == 2 and f"--logit-bias '{text}' is" in err and "--ban bans a sequence" in err


def test_dry_breakers_follow_llama_cpp_over_the_vocabulary(tiny_lm):
    _, tok = tiny_lm
    vocab = vocab_texts(tok)
    assert len(vocab) == len(tok)
    sequences = breaker_sequences([".", "fox"], vocab, encoder(tok))
    singles = {s[0] for s in sequences if len(s) == 1}
    assert {t for t, word in enumerate(vocab) if "." in word or "fox" in word} == singles
    for sequence in sequences:  # a head that ends with the start of the breaker, then the rest tokenised
        if len(sequence) > 1:
            head = vocab[sequence[0]]
            assert any("fox".startswith(head[i:]) for i in range(len(head)))


def test_the_sampler_refuses_untokenised_texts_from_the_api():
    with pytest.raises(ValueError, match="tokenized"):
        Sampler(SamplingConfig(do_sample=True, dry_multiplier=0.8))
    Sampler(SamplingConfig(do_sample=True, dry_multiplier=0.8, dry_sequence_breakers=((1,),)))
    Sampler(SamplingConfig(do_sample=True))  # DRY off: its default texts don't matter
    assert torch.equal(Sampler(SamplingConfig(do_sample=True)).process(torch.zeros(1, 0, dtype=torch.long),
                                                                       torch.ones(1, 3)), torch.ones(1, 3))

"""Candidate tables: the numbers come from Sampler.trace, they show per sample and per beam, and fit 80 columns."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from llmsample.config import SamplingConfig
from llmsample.render import candidate_table, token_label
from llmsample.sampling import Sampler


def test_jsonl_candidates_equal_a_fresh_trace(cli, tiny_model_dir, tiny_lm):
    model, tok = tiny_lm
    args = ["The quick", "--model", str(tiny_model_dir), "--device", "cpu", "--seed", "2", "--format", "jsonl",
            "--max-new-tokens", "5", "--ignore-eos", "--candidates", "6", "--temperature", "0.8", "--top-k", "12",
            "--top-p", "0.9", "--repetition-penalty", "1.2"]
    code, out, err = cli(*args)
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    tokens = [e for e in events if e["type"] == "token"]
    cfg = SamplingConfig(do_sample=True, temperature=0.8, top_k=12, top_p=0.9, repetition_penalty=1.2)
    prompt = tok("The quick", return_tensors="pt").input_ids
    history = prompt
    for event in tokens:
        with torch.no_grad():
            logits = model(history).logits[:, -1]
        trace = Sampler(cfg).trace(history, logits, 6, prompt_len=prompt.shape[1]).to_dict(0)
        table = event["candidates"]
        assert table["stages"] == ["penalties", "top_k", "top_p", "temperature"] == trace["stages"]
        assert table["kept"] == trace["kept"]
        for ours, fresh in zip(table["candidates"], trace["candidates"]):
            assert ours["token_id"] == fresh["token_id"] and ours["removed_by"] == fresh["removed_by"]
            assert ours["raw_prob"] == pytest.approx(fresh["raw_prob"], abs=1e-6)
            assert ours["stage_probs"] == pytest.approx(fresh["stage_probs"], abs=1e-6)
            assert ours["chosen"] == (ours["token_id"] == event["token_id"])
            assert ours["token"] == tok.decode([ours["token_id"]])
        history = torch.cat([history, torch.tensor([[event["token_id"]]])], 1)


def test_text_tables_per_sample_on_stderr_and_the_answer_alone_on_stdout(cli, tiny_model_dir):
    code, out, err = cli("The quick", "--model", str(tiny_model_dir), "--device", "cpu", "--seed", "1", "-n", "2",
                         "--max-new-tokens", "3", "--ignore-eos", "--candidates", "4", "--top-k", "10")
    assert code == 0
    assert "step 1 · sample 1" in err and "step 3 · sample 2" in err and "top_k → dist" not in err
    assert "raw%" in err and "final%" in err and "outside the table" in err
    assert "raw%" not in out


def test_beam_tables_show_each_beam_with_its_scores(cli, tiny_model_dir):
    code, out, err = cli("The quick", "--model", str(tiny_model_dir), "--device", "cpu", "--num-beams", "3",
                         "--max-new-tokens", "3", "--candidates", "3", "--format", "jsonl")
    assert code == 0
    steps = [json.loads(line) for line in out.splitlines() if '"beam_step"' in line]
    assert len(steps[0]["beams"]) == 1  # only the first beam is alive at the start
    assert len(steps[1]["beams"]) == 3
    beam = steps[1]["beams"][2]
    assert beam["score"] < 0 and beam["normalised"] == pytest.approx(beam["score"] / 1)
    assert len(beam["candidates"]["candidates"]) == 3


def test_table_fits_80_columns_with_every_stage_and_escapes_tokens():
    row = {"token_id": 1, "token": "\n\t  a very long token indeed", "raw_prob": 0.5,
           "stage_probs": [0.5] * 7, "final_prob": 0.6, "removed_by": None, "chosen": True}
    cut = dict(row, token=" x", chosen=False, removed_by="no_repeat_ngram", final_prob=0.0)
    data = {"stages": ["penalties", "no_repeat_ngram", "top_k", "top_p", "min_p", "typical_p", "temperature"],
            "kept": [9, 8, 7, 6, 5, 4, 4], "raw_mass_outside": 0.25, "candidates": [row, cut]}
    console = Console(width=80, record=True, color_system=None)
    console.print(candidate_table(data, "step 1 · chose x"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert '"\\n\\t  a' in text and "cut by no_repeat_ngram" in text and "▶" in text
    assert token_label("\x07") == '"\\u0007"'

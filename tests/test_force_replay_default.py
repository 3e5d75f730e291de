"""``--force`` and ``replay`` end to end on the real default model (Gemma 3 270M). Slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
THE = 506  # " the" in Gemma 3's vocabulary


def cli_json(cli, *args: str) -> dict:
    code, out, err = cli(*args)
    assert code == 0, err
    return json.loads(out)


def test_force_takes_the_token_and_keeps_the_seeds_stream(cli):
    args = [PROMPT, "--seed", "1", "--max-new-tokens", "12", "--format", "json", "--device", "cpu", "--dtype",
            "float32"]
    plain = cli_json(cli, *args)["samples"][0]
    forced = cli_json(cli, *args, "--force", '2= the')["samples"][0]
    assert forced["token_ids"][0] == plain["token_ids"][0] and forced["token_ids"][1] == THE
    assert forced["forced"][1] is True and forced["raw_probs"][1] > 0.1  # " the" is likely there
    again = cli_json(cli, *args, "--force", "2=#506")["samples"][0]
    assert again["token_ids"] == forced["token_ids"]  # a text and its id are the same force; the seed repeats it
    drawn = plain["token_ids"][4]
    same = cli_json(cli, *args, "--force", f"5=#{drawn}")["samples"][0]
    assert same["token_ids"] == plain["token_ids"] and same["probs"] == plain["probs"]


def test_force_with_a_constraint_on_the_default_model(cli):
    code, out, err = cli(PROMPT, "--choice", " Paris", "--choice", " Lyon", "--force", "1= the", "--device", "cpu")
    assert code == 2 and "the choice does not allow ' the' (token 506) at step 1" in err


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory) -> Path:
    import contextlib
    import io
    import sys

    from llmsample.cli import main

    path = tmp_path_factory.mktemp("replay-default") / "run.json"
    buffer, errors, saved = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(b""), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(errors):
            code = main([PROMPT, "--greedy", "--max-new-tokens", "24", "--candidates", "5", "--format", "json",
                         "--device", "cpu"])
    finally:
        sys.stdin = saved
    assert code == 0, errors.getvalue()
    path.write_text(buffer.getvalue())
    return path


def test_replay_of_a_default_model_run_is_identical(cli, greedy_run):
    code, out, err = cli("replay", str(greedy_run), "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["identical"] and report["steps_compared"] == 24
    assert report["now"]["engine"] == "llmsample" and report["now"]["quantize"] == "int8"  # the default on the CPU


def test_replay_in_float32_shows_where_int8_first_matters(cli, greedy_run):
    code, out, _ = cli("replay", str(greedy_run), "--quantize", "none", "--format", "json")
    assert code == 1
    report = json.loads(out)
    assert report["now"]["quantize"] is None and report["recorded"]["quantize"] == "int8"
    assert report["overrides"] == ["quantize=none"]
    first = report["divergence"]
    assert first["step"] == 1 and first["kind"] in ("probability", "candidates")  # int8 moves every probability
    assert first["recorded"]["candidates"] and first["now"]["candidates"]
    code, out, _ = cli("replay", str(greedy_run), "--quantize", "none", "--tolerance", "1", "--format", "json")
    report = json.loads(out)
    if code == 1:  # the first token int8 changes, if any within the 24
        token = report["divergence"]
        assert token["kind"] == "token" and token["recorded"]["token_id"] != token["now"]["token_id"]
        recorded = json.loads(greedy_run.read_text())
        assert token["text_before"] == recorded["text"][: len(token["text_before"])]
    else:
        assert code == 0 and report["identical"]


def test_an_explore_session_on_the_default_model_replays(cli, tmp_path):
    from llmsample import chat, models

    data = cli_json(cli, PROMPT, "--seed", "2", "--max-new-tokens", "10", "--top-k", "40", "--top-p", "0.9",
                    "--force", "3= the", "--candidates", "5", "--format", "json", "--device", "cpu", "--dtype",
                    "float32")
    lm = models.load(device="cpu", dtype="float32")
    prompt_ids = chat.prepare(lm.tokenizer, lm.name, PROMPT, False).ids
    sample = data["samples"][0]
    steps = [{"index": j, "token_id": t, "text": lm.tokenizer.decode([t]),
              "how": "forced" if sample["forced"][j] else "sampled", "raw_prob": sample["raw_probs"][j],
              "prob": sample["probs"][j], "settings": data["settings"], "candidates": sample["candidates"][j]}
             for j, t in enumerate(sample["token_ids"])]
    session = {"type": "explore_session", "schema": 1, "llmsample_version": "test", "model": data["model"],
               "device": "cpu", "dtype": "float32", "quantize": None, "prompt": PROMPT,
               "prompt_ids": list(prompt_ids), "seed": 2, "settings": data["settings"], "current_branch": 0,
               "branches": [{"id": 0, "parent": None, "fork_step": None, "text": sample["text"], "steps": steps}]}
    path = tmp_path / "session.json"
    path.write_text(json.dumps(session))
    code, out, err = cli("replay", str(path), "--format", "json")
    assert code == 0, out + err
    assert json.loads(out)["steps_compared"] == 10

"""``llmsample replay FILE``: identical runs exit 0, a changed token or probability exits 1 naming its step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def recorded(tiny_model_dir, tmp_path_factory) -> Path:
    """A generate --format json output with candidate tables, two samples, a forced step and mirostat."""
    import contextlib
    import io
    import sys

    from llmsample.cli import main

    path = tmp_path_factory.mktemp("replay") / "run.json"
    buffer, errors, saved = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(b""), encoding="utf-8")  # piped and empty: the prompt is the argument
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(errors):
            code = main(["generate", "The quick", "-m", str(tiny_model_dir), "--seed", "3", "--max-new-tokens", "8",
                         "-n", "2", "--top-k", "20", "--mirostat", "2", "--force", "3=#82", "--candidates", "4",
                         "--format", "json"])
    finally:
        sys.stdin = saved
    assert code == 0, errors.getvalue()
    path.write_text(buffer.getvalue())
    return path


def changed(path: Path, tmp_path: Path, change) -> Path:
    data = json.loads(path.read_text())
    change(data)
    out = tmp_path / "changed.json"
    out.write_text(json.dumps(data))
    return out


def replay(cli, path, *args):
    code, out, err = cli("replay", str(path), "--format", "json", *args)
    return code, (json.loads(out) if out else None), err


def test_an_identical_run_exits_0(cli, recorded):
    code, report, err = replay(cli, recorded)
    assert code == 0, err
    assert report["identical"] and report["divergence"] is None
    assert report["steps_compared"] == 16 and report["max_difference"] == 0.0
    assert report["recorded"]["model"] == report["now"]["model"]
    code, out, err = cli("replay", str(recorded), "--no-color")
    assert code == 0
    assert "identical: 16 steps compared" in out and "forced" not in err


def test_a_changed_token_exits_1_naming_its_step(cli, recorded, tmp_path):
    def change(data):
        data["samples"][1]["token_ids"][4] = (data["samples"][1]["token_ids"][4] + 1) % 400
    code, report, _ = replay(cli, changed(recorded, tmp_path, change))
    assert code == 1
    d = report["divergence"]
    assert (d["sample"], d["step"], d["kind"]) == (1, 5, "token")
    assert d["recorded"]["candidates"] and d["now"]["candidates"]  # both tables at that step
    code, out, _ = cli("replay", str(changed(recorded, tmp_path, change)), "--no-color")
    assert code == 1
    assert "differs at step 5 (sample 2): another token" in out
    assert "recorded · step 5" in out and "now · step 5" in out


def test_a_changed_probability_exits_1_naming_its_step(cli, recorded, tmp_path):
    def change(data):
        data["samples"][0]["raw_probs"][5] = round(data["samples"][0]["raw_probs"][5] + 0.001, 6)
    code, report, _ = replay(cli, changed(recorded, tmp_path, change))
    assert code == 1
    d = report["divergence"]
    assert (d["sample"], d["step"], d["kind"]) == (0, 6, "probability")
    assert "raw probability" in d["detail"]
    # Within the tolerance it is the same run.
    code, report, _ = replay(cli, changed(recorded, tmp_path, change), "--tolerance", "0.01")
    assert code == 0 and 0.0009 < report["max_difference"] < 0.0011


def test_a_changed_candidate_exits_1(cli, recorded, tmp_path):
    def change(data):
        data["samples"][0]["candidates"][1]["candidates"][2]["final_prob"] += 0.01
    code, report, _ = replay(cli, changed(recorded, tmp_path, change))
    assert code == 1 and report["divergence"]["kind"] == "candidates" and report["divergence"]["step"] == 2


def test_a_shorter_recording_differs_in_length(cli, recorded, tmp_path):
    def change(data):
        sample = data["samples"][0]
        for key in ("token_ids", "raw_probs", "probs", "candidates", "forced", "temperatures", "entropies"):
            sample[key] = sample[key][:5]
        sample["finish_reason"] = "eos"
    code, report, _ = replay(cli, changed(recorded, tmp_path, change))
    assert code == 1
    assert report["divergence"]["kind"] == "length" and report["divergence"]["step"] == 6
    assert "the recorded run ends after 5 tokens (eos)" in report["divergence"]["detail"]


def test_an_override_shows_where_it_first_matters(cli, recorded):
    code, report, _ = replay(cli, recorded, "--top-k", "2")
    assert code == 1 and report["divergence"]["step"] == 1
    code, report, _ = replay(cli, recorded, "--force", "3=#83")  # replaces the recorded force at step 3
    assert code == 1 and report["divergence"]["step"] == 3 and report["divergence"]["kind"] == "token"


def test_a_jsonl_run_replays_from_its_summary_line(cli, tiny_model_dir, tmp_path):
    code, out, err = cli("generate", "The quick", "-m", str(tiny_model_dir), "--seed", "1", "--max-new-tokens", "4",
                         "--format", "jsonl")
    assert code == 0, err
    path = tmp_path / "run.jsonl"
    path.write_text(out)
    code, report, err = replay(cli, path)
    assert code == 0 and report["steps_compared"] == 4, err


def test_another_model_is_warned_about_naming_both(cli, recorded, tiny_model_dir, tmp_path, monkeypatch):
    def change(data):
        data["model"] = str(tmp_path / "gone")
    moved = changed(recorded, tmp_path, change)
    monkeypatch.setenv("LLMSAMPLE_MODEL", str(tiny_model_dir))
    code, report, err = replay(cli, moved)
    assert code == 0
    assert f"the recorded model {tmp_path / 'gone'} is not here (no such file or folder): replaying with " \
           f"{tiny_model_dir} instead" in err
    assert report["warnings"] and report["now"]["model"] == str(tiny_model_dir)
    code, report, err = replay(cli, recorded, "-m", str(tmp_path / "elsewhere"))
    assert code == 3  # the other model does not exist: a load error, after the warning
    assert f"replaying with the model {tmp_path / 'elsewhere'}; the file was recorded with {tiny_model_dir}" in err


@pytest.mark.parametrize("content, message", [
    (b'{"type": "summary", "schema": 1', " is not JSON: Expecting ',' delimiter (line 1, column 32)"),
    (b"\xff\xfe", " is not valid UTF-8: byte 0xff at offset 0"),
    (b"[1, 2]", ': not a llmsample recording (a JSON list, not an object with "type" "summary" or "explore_session")'),
    (b'{"type": "chat"}', ': "type" is \'chat\': replay reads a generate --format json output ("summary") or an '
                          'explore session ("explore_session")'),
    (b'{"schema": 1}', ': "type" is missing'),
    (b'{"type": "summary", "schema": 7}',
     ": schema version 7 of a generate output is not one this llmsample reads (1)"),
    (b'{"type": "explore_session", "schema": 2}', ": schema version 2 of an explore session"),
])
def test_a_foreign_or_corrupted_file_is_one_line_exit_2(cli, tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    code, out, err = cli("replay", str(path))
    assert code == 2 and out == ""
    assert err.startswith(f"llmsample: error: {path}{message}") and err.count("\n") == 1


def test_missing_and_mistyped_fields_are_named(cli, recorded, tmp_path):
    code, _, err = cli("replay", str(changed(recorded, tmp_path, lambda d: d["samples"][1].pop("token_ids"))))
    assert code == 2 and err.endswith(': missing field "samples[1].token_ids"\n')
    code, _, err = cli("replay", str(changed(recorded, tmp_path, lambda d: d.update(seed="x"))))
    assert code == 2 and err.endswith(': field "seed" must be an integer, got "x"\n')
    code, _, err = cli("replay", str(changed(recorded, tmp_path, lambda d: d["samples"][0]["probs"].pop())))
    assert code == 2 and err.endswith(': field "samples[0].probs" has 7 entries for 8 token_ids\n')
    code, _, err = cli("replay", str(changed(recorded, tmp_path, lambda d: d["settings"].update(top_p=7))))
    assert code == 2 and "settings: sampling.top_p must be in (0, 1], got 7" in err
    code, _, err = cli("replay", str(tmp_path / "none.json"))
    assert code == 2 and err == f"llmsample: error: cannot read {tmp_path / 'none.json'}: No such file or directory\n"


# ---- explore sessions ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session(recorded, tiny_model_dir, tmp_path_factory) -> Path:
    """An explore session written by hand after the contract: the recorded run's first sample as branch 0, with
    its forced step marked "forced", and a branch 1 forked at step 4 that shares its first steps."""
    from transformers import AutoTokenizer

    from llmsample import chat

    data = json.loads(recorded.read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt_ids = chat.prepare(tokenizer, data["model"], data["prompt"], False).ids
    sample = data["samples"][0]
    steps = [{"index": j, "token_id": token, "text": tokenizer.decode([token]),
              "how": "forced" if sample["forced"][j] else "sampled", "raw_prob": sample["raw_probs"][j],
              "prob": sample["probs"][j], "settings": data["settings"], "candidates": sample["candidates"][j]}
             for j, token in enumerate(sample["token_ids"])]
    session = {"type": "explore_session", "schema": 1, "llmsample_version": "test", "model": data["model"],
               "device": data["device"], "dtype": data["dtype"], "quantize": None, "prompt": data["prompt"],
               "prompt_ids": list(prompt_ids), "seed": data["seed"], "settings": data["settings"],
               "current_branch": 0,
               "branches": [{"id": 0, "parent": None, "fork_step": None, "text": sample["text"], "steps": steps},
                            {"id": 1, "parent": 0, "fork_step": 4, "text": "", "steps": steps[:4]}]}
    path = tmp_path_factory.mktemp("session") / "session.json"
    path.write_text(json.dumps(session))
    return path


def test_an_explore_session_replays_teacher_forced(cli, session):
    code, report, err = replay(cli, session)
    assert code == 0, err
    assert report["kind"] == "explore session" and report["steps_compared"] == 8
    assert report["max_difference"] < 1e-5  # the session's probabilities are generate's, rounded to 6 decimals
    code, report, _ = replay(cli, session, "--branch", "1")
    assert code == 0 and report["steps_compared"] == 4


def test_a_tampered_session_step_exits_1(cli, session, tmp_path):
    def change(data):
        data["branches"][0]["steps"][6]["prob"] = 0.5
    code, report, _ = replay(cli, changed(session, tmp_path, change))
    assert code == 1
    d = report["divergence"]
    assert (d["sample"], d["step"], d["kind"]) == (0, 7, "probability")
    assert d["recorded"]["how"] == "sampled" and d["now"]["candidates"]["candidates"]


def test_a_session_step_with_other_settings_is_computed_with_them(cli, session, tmp_path):
    def change(data):
        data["branches"][0]["steps"][5]["settings"] = {**data["settings"], "top_k": 2}
    code, report, _ = replay(cli, changed(session, tmp_path, change))
    assert code == 1 and report["divergence"]["step"] == 6  # the recorded probabilities were under top_k 20


def test_session_faults(cli, session, tmp_path):
    code, _, err = cli("replay", str(session), "--force", "2=a", "--max-new-tokens", "3")
    assert code == 2 and err.startswith("llmsample: error: --force, --max-new-tokens cannot apply to an explore "
                                        "session: its recorded tokens are fed as they are")
    code, _, err = cli("replay", str(session), "--branch", "5")
    assert code == 2 and err.endswith(f"--branch 5: {session} has branches 0, 1\n")
    code, _, err = cli("replay", str(changed(session, tmp_path, lambda d: d["branches"][0]["steps"][2].pop("prob"))))
    assert code == 2 and err.endswith(': missing field "branches[0].steps[2].prob"\n')
    code, _, err = cli("replay", str(changed(session, tmp_path, lambda d: d.update(prompt_ids=[]))))
    assert code == 2 and err.endswith(': field "prompt_ids" is empty\n')


def test_table_difference_matches_by_token():
    from llmsample.replay import table_difference

    def table(*rows, stages=()):
        return {"stages": list(stages), "candidates": [
            {"token_id": i, "raw_prob": p, "final_prob": f, "stage_probs": [f] * len(stages)} for i, p, f in rows]}

    same = table((1, 0.5, 0.6), (2, 0.3, 0.4))
    assert table_difference(same, table((2, 0.3, 0.4), (1, 0.5, 0.6))) == (0.0, "")
    assert table_difference(same, table((1, 0.5, 0.6), (2, 0.3, 0.45)))[1] == "token 2: final probability"
    # A swap at the table's edge between near-equal tokens is no difference.
    edge = table((1, 0.5, 0.6), (3, 0.3, 0.4))
    assert table_difference(table((1, 0.5, 0.6), (2, 0.3, 0.4)), edge)[0] == 0.0


def test_a_recorded_int8_run_on_another_device_asks_for_quantize_none(cli, recorded, tmp_path):
    int8 = changed(recorded, tmp_path, lambda d: d["stats"].update(quantize="int8"))
    code, out, err = cli("replay", str(int8), "--device", "cuda")
    assert code == 2 and out == ""
    assert err == ("llmsample: error: the file was recorded with --quantize int8, which runs in float32 on the CPU: "
                   "add --quantize none to replay with --device cuda\n")

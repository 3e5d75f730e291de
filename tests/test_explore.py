"""``llmsample explore``: the stepper (undo, branches, the KV cache), the session file, the bad-input lines.

The full-screen program itself is driven with Textual's Pilot in test_explore_app.py, and in a real terminal (a
pseudo-terminal) there too.
"""

from __future__ import annotations

import json

import pytest
import torch

from llmsample import chat, models, presets, run
from llmsample.decode import sample_loop
from llmsample.explore import stepper
from llmsample.explore.stepper import Explorer
from llmsample.sampling import Sampler

PROMPT = "The quick brown"


def settings(**sampling):
    """Resolved settings: greedy unless told, 24 new tokens at most, no model defaults."""
    layer = {"sampling": {"do_sample": False, **sampling}, "generation": {"max_new_tokens": 24}}
    return presets.resolve_settings(None, layer, {})


@pytest.fixture(scope="module", params=["llmsample", "transformers"])
def lm(request, tiny_gemma_dir, tiny_model_dir):
    """Both caches: llmsample's own (a tiny Gemma 3) and transformers' DynamicCache (a tiny Llama)."""
    folder = tiny_gemma_dir if request.param == "llmsample" else tiny_model_dir
    return models.load(str(folder), engine=request.param)


def explorer(lm, **sampling) -> Explorer:
    prompt = chat.prepare(lm.tokenizer, lm.name, PROMPT, False)
    return Explorer(lm, prompt.ids, settings(**sampling), seed=0, eos=run.eos_ids(lm), prompt_text=PROMPT)


def fresh_greedy(lm, ids: list[int], steps: int) -> list[int]:
    """What a fresh greedy run continuing ``ids`` gives (generate's own loop, the whole prefix read at once)."""
    sampler = Sampler(settings().sampling)
    loop = sample_loop(lm.language_model, torch.tensor([ids]), sampler, steps)
    return [int(step.token_ids[0]) for step in loop]


def test_undo_then_continuing_is_a_fresh_greedy_run_token_for_token(lm):
    e = explorer(lm)
    for _ in range(12):
        e.sample()
    first = e.branch.token_ids
    forwards = e.forwards
    for _ in range(5):
        e.undo()
    assert e.forwards == forwards  # undo runs no forward pass: the step's logits were kept
    assert e.branch.token_ids == first[:7]
    for _ in range(5):
        e.sample()
    assert e.branch.token_ids == first
    assert e.branch.token_ids[7:] == fresh_greedy(lm, e.prompt_ids + first[:7], 5)
    assert e.forwards == forwards + 5  # one token read per step: the cache was cut back, not rebuilt


def test_a_branch_continues_exactly_as_a_fresh_greedy_run_from_its_path(lm):
    e = explorer(lm)
    for _ in range(6):
        e.sample()
    trunk = e.branch.token_ids
    e.fork()
    e.choose(4)  # another token than the greedy one
    for _ in range(4):
        e.sample()
    branch = e.branch.token_ids
    assert branch[:6] == trunk and e.branch.steps[6].how == "chosen"
    assert branch[7:] == fresh_greedy(lm, e.prompt_ids + branch[:7], 4)
    e.switch()  # back to the trunk: the cache holds the branch's path until the next forward
    assert e.current == 0 and e.branch.token_ids == trunk
    for _ in range(4):
        e.sample()
    assert e.branch.token_ids[6:] == fresh_greedy(lm, e.prompt_ids + trunk, 4)
    e.switch()
    for _ in range(2):
        e.sample()
    assert e.branch.token_ids[7:] == fresh_greedy(lm, e.prompt_ids + branch[:7], 6)


def test_a_cache_that_cannot_be_cut_back_is_read_again(lm, monkeypatch):
    e = explorer(lm)
    for _ in range(8):
        e.sample()
    first = e.branch.token_ids
    monkeypatch.setattr(stepper, "rewind", lambda cache, length: False)
    for _ in range(3):
        e.undo()
    for _ in range(3):
        e.sample()
    assert e.branch.token_ids == first


def test_rewind_cuts_each_cache_back(lm):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    _, cache = lm.language_model.forward(ids, None)
    assert stepper.rewind(cache, 2)
    assert lm.language_model.cache_length(cache) == 2
    assert not stepper.rewind(object(), 1)  # no crop: the caller reads the path again


def test_a_changed_setting_recomputes_the_table_without_a_forward_pass(lm):
    e = explorer(lm, do_sample=True)
    e.sample()
    before = e.preview()
    forwards = e.forwards
    e.configure(settings(do_sample=True, top_k=2))
    after = e.preview()
    assert e.forwards == forwards
    assert after["kept"] == [2] and before["stages"] == []
    assert [c["token_id"] for c in after["candidates"]] == [c["token_id"] for c in before["candidates"]]
    assert sum(c["removed_by"] == "top_k" for c in after["candidates"]) == len(after["candidates"]) - 2
    step = e.sample()
    assert step.settings["top_k"] == 2 and step.candidates["stages"] == ["top_k"]
    assert step.token_id in [c["token_id"] for c in after["candidates"][:2]]


def test_chosen_and_forced_tokens_record_their_probabilities(lm):
    e = explorer(lm, do_sample=True, top_k=1)
    table = e.preview()
    step = e.choose(2)
    assert step.how == "chosen" and step.token_id == table["candidates"][2]["token_id"]
    assert step.prob == 0.0 and step.raw_prob == pytest.approx(table["candidates"][2]["raw_prob"])
    assert [c["chosen"] for c in step.candidates["candidates"]][:3] == [False, False, True]
    forced = e.force(7)
    assert forced.how == "forced" and forced.token_id == 7 and 0 < forced.raw_prob < 1
    with pytest.raises(IndexError):
        e.choose(len(e.preview()["candidates"]))


def test_the_token_limit_stops_a_branch(lm):
    e = explorer(lm)
    for _ in range(24):
        e.sample()
    assert e.finished() == "length"
    with pytest.raises(stepper.LimitReached):
        e.sample()


def test_a_new_seed_or_token_limit_applies_from_the_next_step(lm):
    reseeded = explorer(lm, do_sample=True)
    reseeded.sample()
    layer = {"sampling": {"do_sample": True}, "generation": {"max_new_tokens": 30, "seed": 7}}
    reseeded.configure(presets.resolve_settings(None, layer, {}))
    fresh = explorer(lm, do_sample=True)
    fresh.force(reseeded.branch.token_ids[0])
    fresh.generator.manual_seed(7)
    for _ in range(6):
        assert reseeded.sample().token_id == fresh.sample().token_id
    assert reseeded.max_new_tokens == 30 and reseeded.start_seed == 0 and reseeded.seed == 7


def test_mirostat_state_follows_undo_and_branches(lm):
    e = explorer(lm, do_sample=True, mirostat=2)
    for _ in range(3):
        e.sample()
    mu_after_two = e.branch.steps[1].state_after["mirostat_mu"]
    e.undo()
    assert torch.equal(e.state["mirostat_mu"], mu_after_two)
    e.fork()
    for _ in range(2):
        e.undo()
    assert "mirostat_mu" not in e.state  # back at the start: μ starts afresh


# ---- the session file ----------------------------------------------------------------------------------------

CANDIDATES = {
    "type": "object",
    "required": ["stages", "kept", "raw_mass_outside", "candidates"],
    "properties": {
        "stages": {"type": "array", "items": {"type": "string"}},
        "kept": {"type": "array", "items": {"type": "integer"}},
        "raw_mass_outside": {"type": "number"},
        "candidates": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["token_id", "raw_prob", "stage_probs", "final_prob", "removed_by", "token", "chosen"],
            "properties": {"token_id": {"type": "integer"}, "raw_prob": {"type": "number"},
                           "stage_probs": {"type": "array", "items": {"type": "number"}},
                           "final_prob": {"type": "number"}, "removed_by": {"type": ["string", "null"]},
                           "token": {"type": "string"}, "chosen": {"type": "boolean"}}}},
    },
}
STEP = {
    "type": "object", "additionalProperties": False,
    "required": ["index", "token_id", "text", "how", "raw_prob", "prob", "settings", "candidates"],
    "properties": {"index": {"type": "integer", "minimum": 0}, "token_id": {"type": "integer"},
                   "text": {"type": "string"}, "how": {"enum": ["sampled", "chosen", "forced"]},
                   "raw_prob": {"type": "number", "minimum": 0, "maximum": 1},
                   "prob": {"type": "number", "minimum": 0, "maximum": 1},
                   "settings": {"type": "object"}, "candidates": CANDIDATES},
}
# /work/briefs/schema.md, field by field: the contract replay reads.
SESSION = {
    "type": "object", "additionalProperties": False,
    "required": ["type", "schema", "llmsample_version", "model", "device", "dtype", "quantize", "prompt",
                 "prompt_ids", "seed", "settings", "current_branch", "branches"],
    "properties": {
        "type": {"const": "explore_session"}, "schema": {"const": 1}, "llmsample_version": {"type": "string"},
        "model": {"type": "string"}, "device": {"type": "string"}, "dtype": {"type": "string"},
        "quantize": {"enum": [None, "int8"]}, "prompt": {"type": "string"},
        "prompt_ids": {"type": "array", "items": {"type": "integer"}}, "seed": {"type": ["integer", "null"]},
        "settings": {"type": "object"}, "current_branch": {"type": "integer", "minimum": 0},
        "branches": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["id", "parent", "fork_step", "text", "steps"],
            "properties": {"id": {"type": "integer"}, "parent": {"type": ["integer", "null"]},
                           "fork_step": {"type": ["integer", "null"]}, "text": {"type": "string"},
                           "steps": {"type": "array", "items": STEP}}}},
    },
}


def test_the_saved_session_follows_the_schema(lm, tmp_path, cli):
    import jsonschema

    from llmsample import __version__
    from llmsample.explore import session_file

    e = explorer(lm, do_sample=True, top_k=20)
    for _ in range(4):
        e.sample()
    e.fork()
    e.choose(1)
    e.force(9)
    e.switch()
    e.sample()
    path = tmp_path / "s.json"
    session_file.write(e.session(), str(path))
    data = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.validate(data, SESSION)
    assert data["llmsample_version"] == __version__ and data["prompt"] == PROMPT and data["current_branch"] == 0
    assert data["prompt_ids"] == e.prompt_ids and data["seed"] == 0
    trunk, fork = data["branches"]
    assert (trunk["parent"], trunk["fork_step"], fork["parent"], fork["fork_step"]) == (None, None, 0, 4)
    assert len(trunk["steps"]) == 5 and len(fork["steps"]) == 6  # each branch's full path from the prompt
    assert fork["steps"][:4] == trunk["steps"][:4]
    assert [s["how"] for s in fork["steps"]] == ["sampled"] * 4 + ["chosen", "forced"]
    assert [s["index"] for s in fork["steps"]] == list(range(6))
    assert fork["text"] == "".join(s["text"] for s in fork["steps"])
    for branch in data["branches"]:
        for step in branch["steps"]:
            chosen = [c["token_id"] for c in step["candidates"]["candidates"] if c["chosen"]]
            assert chosen in ([step["token_id"]], [])  # a forced token may lie outside the table
    # "settings": the same shape as generate's JSON settings, at the top and at each step.
    code, out, _ = cli(PROMPT, "--model", lm.name, "--engine", lm.engine, "--max-new-tokens", "2", "--format",
                       "json", "--no-model-defaults")
    assert code == 0
    generate_keys = set(json.loads(out)["settings"])
    assert set(data["settings"]) == generate_keys
    assert set(trunk["steps"][0]["settings"]) == generate_keys
    assert trunk["steps"][0]["settings"]["top_k"] == 20


def test_a_session_file_that_cannot_be_written_is_one_line(lm, tmp_path):
    from llmsample.errors import ConfigError
    from llmsample.explore import session_file

    with pytest.raises(ConfigError, match="cannot write the session to .*missing"):
        session_file.write(explorer(lm).session(), str(tmp_path / "missing" / "s.json"))


# ---- bad input: one line, exit 2 -----------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["-n", "2"], "explore follows one text at a time (b branches it), got --num-samples 2"),
    (["--num-beams", "3"], "explore takes one token at a time, which beam search cannot: got --num-beams 3"),
    (["--format", "jsonl"], "explore --format takes text (q prints the text) or json (q prints the session), "
                            "got 'jsonl'"),
    (["--base-url", "http://127.0.0.1:9"], "explore needs a local model (it keeps each step's logits and cuts the "
                                           "KV cache back), which a serving engine does not give: got --engine openai"),
])
def test_options_explore_cannot_follow_are_refused(cli, tiny_model_dir, args, expected):
    code, out, err = cli("explore", PROMPT, "--model", str(tiny_model_dir), *args)
    assert (code, out, err) == (2, "", f"llmsample: error: {expected}\n")


def test_a_terminal_that_is_not_utf8_is_refused(cli, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("LC_CTYPE", raising=False)
    monkeypatch.setenv("LANG", "en_US.ISO-8859-1")
    code, out, err = cli("explore", PROMPT, "--model", str(tiny_model_dir))
    assert (code, out) == (2, "")
    assert err == ("llmsample: error: explore needs a UTF-8 terminal, and LANG is 'en_US.ISO-8859-1' "
                   "(try LANG=C.UTF-8)\n")


def test_lang_c_is_refused_in_a_real_process(tiny_model_dir):
    """Python turns LANG=C into C.UTF-8 itself (PEP 538): the terminal is still not a UTF-8 one."""
    from test_cli import spawn

    env = {"LANG": "C", "LC_ALL": "", "LC_CTYPE": ""}
    result = spawn("explore", PROMPT, "--model", str(tiny_model_dir), env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "llmsample: error: explore needs a UTF-8 terminal, and LANG is 'C' (try LANG=C.UTF-8)\n"


def test_stderr_that_is_not_a_terminal_is_refused(cli, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LANG", "C.UTF-8")
    code, out, err = cli("explore", PROMPT, "--model", str(tiny_model_dir))
    assert (code, out) == (2, "")
    assert err.startswith("llmsample: error: explore draws its screen on stderr, which is not a terminal here")
    assert err.count("\n") == 1


def test_without_textual_explore_says_how_to_install_it(cli, tiny_model_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "textual", None)  # what an install without the extra sees
    code, out, err = cli("explore", PROMPT, "--model", str(tiny_model_dir))
    assert (code, out) == (2, "")
    assert err == ("llmsample: error: explore needs Textual, which is not installed: "
                   "pip install 'llmsample[explore]'\n")


@pytest.mark.slow
def test_on_the_default_model_undo_and_branches_match_fresh_greedy_runs():
    """The packaged Gemma 3 270M (llmsample's engine): after an undo and after a branch switch, greedy steps are
    exactly those of a fresh greedy run from the same prefix."""
    lm = models.load(None)
    e = explorer(lm)
    for _ in range(10):
        e.sample()
    first = e.branch.token_ids
    for _ in range(4):
        e.undo()
    e.fork()
    e.choose(1)
    for _ in range(3):
        e.sample()
    branch = e.branch.token_ids
    assert branch[7:] == fresh_greedy(lm, e.prompt_ids + branch[:7], 3)
    e.switch()
    for _ in range(4):
        e.sample()
    assert e.branch.token_ids == first
    assert first[6:] == fresh_greedy(lm, e.prompt_ids + first[:6], 4)


def test_a_constraint_binds_to_the_end_of_text_even_with_ignore_eos(lm):
    """--choice: each step keeps only what can still make a choice; EOS ends the text (even under --ignore-eos,
    which only keeps an EOS from ending the branch)."""
    prompt = chat.prepare(lm.tokenizer, lm.name, PROMPT, False)
    for ignore in (False, True):
        e = Explorer(lm, prompt.ids, settings(do_sample=True, choice=(" yes", " no")), seed=3,
                     eos=run.eos_ids(lm), prompt_text=PROMPT, ignore_eos=ignore)
        while e.branch.token_ids[-1:] != [lm.tokenizer.eos_token_id] and e.index < 10:
            e.sample()
        assert e.text() in (" yes", " no")
        assert e.finished() == (None if ignore else "eos")


def test_enter_after_enter_is_generate_with_the_same_seed_and_forces(lm, cli):
    """Sampled steps draw from the same generator as generate's loop: pressing Enter N times with --seed S (and
    --force) gives generate's tokens with the same seed and forces, token for token."""
    flags = ["--model", lm.name, "--engine", lm.engine, "--no-model-defaults", "--sample", "--top-k", "20",
             "--max-new-tokens", "10", "--seed", "5", "--ignore-eos", "--format", "json"]
    code, out, err = cli(PROMPT, *flags, "--force", "3=#7")
    assert code == 0, err
    expected = json.loads(out)["samples"][0]["token_ids"]
    prompt = chat.prepare(lm.tokenizer, lm.name, PROMPT, False)
    e = Explorer(lm, prompt.ids, settings(do_sample=True, top_k=20), seed=5, eos=run.eos_ids(lm),
                 prompt_text=PROMPT, ignore_eos=True, forces={2: 7})
    for _ in range(10):
        e.sample()
    assert e.branch.token_ids == expected
    assert [s.how for s in e.branch.steps] == ["sampled"] * 2 + ["forced"] + ["sampled"] * 7
    forced = e.branch.steps[2].candidates
    assert forced["forced"] is True and [c["token_id"] for c in forced["candidates"] if c["chosen"]] == [7]


def test_replay_reads_a_saved_session_back_identical(lm, tmp_path, cli):
    """The round trip of the shared contract: every branch of a session (sampled, chosen, forced steps, a setting
    changed midway, an undo) replays teacher-forced as identical."""
    from llmsample.explore import session_file

    e = explorer(lm, do_sample=True, top_k=20, temperature=0.8)
    e.forces = {1: 9}
    for _ in range(5):
        e.sample()
    e.fork()
    e.choose(2)
    e.configure(settings(do_sample=True, top_p=0.5))
    e.sample()
    e.switch()
    e.undo()
    e.sample()
    path = tmp_path / "session.json"
    session_file.write(e.session(), str(path))
    for branch in ("0", "1"):
        code, out, err = cli("replay", str(path), "--branch", branch)
        assert code == 0, out + err
        assert "identical" in out

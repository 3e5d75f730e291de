"""Chat templates (--chat, --raw, --system) and the chat session, on tiny models that carry a template."""

from __future__ import annotations

import json

import pytest

from llmsample import chat
from llmsample.errors import ConfigError

TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick fox"},
         {"role": "assistant", "content": "jumps"}, {"role": "user", "content": "今天天气"}]
FAST = ["--max-new-tokens", "4", "--seed", "1"]


def _hf_ids(tokenizer, conversation):
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _ours(tokenizer, conversation):
    return chat.prepare(tokenizer, "tiny", conversation[-1]["content"], None, conversation[0]["content"],
                        conversation[1:-1])


def test_rendered_ids_match_transformers_plain_template(tiny_chat_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    prompt = _ours(tokenizer, TURNS)
    assert prompt.mode == "chat"
    assert prompt.ids == _hf_ids(tokenizer, TURNS)
    assert prompt.ids.count(tokenizer.bos_token_id) == 1  # the template's BOS, no second one


def test_rendered_ids_match_transformers_gemma_template_fast_tokenizer(tiny_gemma_chat_dir):
    """llmsample's FastTokenizer reads the template from tokenizer_config.json (the named-templates form)."""
    from transformers import PreTrainedTokenizerFast

    from llmsample.tokenizer import FastTokenizer

    ours = FastTokenizer.from_folder(tiny_gemma_chat_dir)
    assert ours is not None and ours.chat_template
    theirs = PreTrainedTokenizerFast.from_pretrained(tiny_gemma_chat_dir)
    prompt = _ours(ours, TURNS)
    assert prompt.ids == _hf_ids(theirs, TURNS)
    assert prompt.text.startswith("<s><start_of_turn>user\nBe brief.\n\nThe quick fox<end_of_turn>\n")
    assert prompt.text.endswith("<start_of_turn>model\n")
    assert prompt.ids.count(ours.bos_token_id) == 1
    assert chat.end_of_turn_ids(ours) == {ours.encode("<end_of_turn>", add_special_tokens=False)[0]}


def test_choice_of_mode():
    assert chat.choose(None, None, "m") == "raw"
    assert chat.choose(None, "t", "m") == "chat"
    assert chat.choose(False, "t", "m") == "raw"
    assert chat.choose(True, "t", "m") == "chat"
    with pytest.raises(ConfigError, match="has no chat template"):
        chat.choose(True, None, "m")


def test_template_forms(tmp_path):
    assert chat.pick([{"name": "tool_use", "template": "a"}, {"name": "default", "template": "b"}]) == "b"
    assert chat.pick({"default": "c"}) == "c" and chat.pick("") is None and chat.pick(None) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x"}))
    assert chat.read_template(tmp_path) == "x"
    (tmp_path / "chat_template.jinja").write_text("y")
    assert chat.read_template(tmp_path) == "y"


def test_template_is_sandboxed():
    with pytest.raises(ConfigError, match="chat template failed"):
        chat.render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [], {})
    with pytest.raises(ConfigError, match="chat template failed: no system"):
        chat.render("{{ raise_exception('no system') }}", [], {})


def test_default_is_chat_for_a_model_with_a_template(cli, tiny_chat_dir):
    code, out, err = cli("The quick", "-m", str(tiny_chat_dir), *FAST, "--format", "json", "--explain")
    assert code == 0, err
    data = json.loads(out)
    assert data["prompt_format"] == "chat"
    assert data["rendered_prompt"] == "<s>User: The quick\nAssistant:"
    assert data["prompt"] == "The quick"
    assert "prompt format: chat" in err


def test_raw_and_default_for_a_model_without_template(cli, tiny_chat_dir, tiny_model_dir):
    code, out, err = cli("The quick", "-m", str(tiny_chat_dir), *FAST, "--format", "json", "--raw")
    assert code == 0, err
    data = json.loads(out)
    assert data["prompt_format"] == "raw" and "rendered_prompt" not in data
    code, out, err = cli("The quick", "-m", str(tiny_model_dir), *FAST, "--format", "json")
    assert code == 0, err
    assert json.loads(out)["prompt_format"] == "raw"


def test_chat_flag_on_a_model_without_template(cli, tiny_model_dir):
    code, out, err = cli("The quick", "-m", str(tiny_model_dir), *FAST, "--chat")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "has no chat template" in err and "Traceback" not in err


def test_system_message(cli, tiny_chat_dir, tiny_model_dir):
    code, out, err = cli("The quick", "-m", str(tiny_chat_dir), *FAST, "--format", "json", "--system", "Be brief.")
    assert code == 0, err
    assert json.loads(out)["rendered_prompt"] == "<s>System: Be brief.\nUser: The quick\nAssistant:"
    code, out, err = cli("The quick", "-m", str(tiny_model_dir), *FAST, "--system", "Be brief.")
    assert code == 0 and "--system has no effect" in err


def test_gemma_chat_on_the_llmsample_engine(cli, tiny_gemma_chat_dir):
    code, out, err = cli("The quick", "-m", str(tiny_gemma_chat_dir), *FAST, "--format", "json", "--stats")
    assert code == 0, err
    data = json.loads(out)
    assert data["stats"]["engine"] == "llmsample"
    assert data["rendered_prompt"] == "<s><start_of_turn>user\nThe quick<end_of_turn>\n<start_of_turn>model\n"


def test_a_template_that_raises(cli, tiny_model_dir, tmp_path):
    from tiny_model import with_chat_template

    folder = with_chat_template(tiny_model_dir, tmp_path / "raising", "{{ raise_exception('roles must alternate') }}")
    code, out, err = cli("The quick", "-m", str(folder), *FAST)
    assert code == 2 and out == ""
    assert err == "llmsample: error: the model's chat template failed: roles must alternate\n"


def test_eos_ids_cover_end_of_turn(tiny_gemma_chat_dir):
    from llmsample import models, run

    lm = models.load(str(tiny_gemma_chat_dir))
    end = lm.tokenizer.encode("<end_of_turn>", add_special_tokens=False)[0]
    assert end in run.eos_ids(lm, chat=True)
    assert end not in run.eos_ids(lm)


# ---- the chat session ------------------------------------------------------------------------------------------


def _rendered(monkeypatch):
    """Record every prompt the runs render."""
    seen = []
    original = chat.prepare

    def recording(*args, **kwargs):
        prompt = original(*args, **kwargs)
        seen.append(prompt)
        return prompt

    monkeypatch.setattr(chat, "prepare", recording)
    return seen


def test_piped_chat_one_line_per_answer_and_history_grows(cli, tiny_chat_dir, tmp_path, monkeypatch):
    seen = _rendered(monkeypatch)
    transcript = tmp_path / "t.json"
    code, out, err = cli("chat", "-m", str(tiny_chat_dir), *FAST, "--system", "Be brief.",
                         stdin=f"The quick\nThe lazy\n/save {transcript}\n".encode())
    assert code == 0, err
    lines = out.split("\n")
    assert len(lines) == 3 and lines[2] == ""  # two answers, each one line
    saved = json.loads(transcript.read_text())
    first, second = saved["messages"][1]["content"], saved["messages"][3]["content"]
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert lines[0] == first.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    assert [p.mode for p in seen] == ["chat", "chat"]
    assert seen[0].text == "<s>System: Be brief.\nUser: The quick\nAssistant:"
    assert seen[1].text == (f"<s>System: Be brief.\nUser: The quick\nAssistant: {first}</s>\nUser: The lazy\n"
                            "Assistant:")
    assert second is not None


def test_chat_commands_and_bad_values_keep_the_session(cli, tiny_chat_dir, tmp_path):
    transcript = tmp_path / "t.json"
    script = ("/set top_p 1.5\n/set top_k abc\n/set tempreature 1\n/bogus\n/set top_k 5\n/preset technical\n"
              f"/candidates 2\nThe quick\n/clear\nThe lazy\n/save {transcript}\n/exit\nnever read\n")
    code, out, err = cli("chat", "-m", str(tiny_chat_dir), *FAST, stdin=script.encode())
    assert code == 0, err
    assert "llmsample: error: --top-p must be in (0, 1], got 1.5\n" in err
    assert "llmsample: error: Invalid value for '--top-k'" in err and "got 'abc'" in err
    assert "unknown setting 'tempreature' (did you mean 'temperature'?)" in err
    assert "/bogus: not a command here" in err
    assert "Traceback" not in err and "warning" not in err
    assert len(out.splitlines()) == 2  # the line after /exit is never a turn
    saved = json.loads(transcript.read_text())
    assert saved["settings"]["top_k"] == 5 and saved["settings"]["repetition_penalty"] == 1.3  # /set, then /preset
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == ["The lazy"]  # /clear


def test_chat_needs_a_template(cli, tiny_model_dir):
    code, out, err = cli("chat", "-m", str(tiny_model_dir), *FAST, stdin=b"hello\n")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "has no chat template" in err


def test_chat_on_the_gemma_template(cli, tiny_gemma_chat_dir, monkeypatch):
    seen = _rendered(monkeypatch)
    code, out, err = cli("chat", "-m", str(tiny_gemma_chat_dir), *FAST, stdin=b"Hi\nAgain\n")
    assert code == 0, err
    assert len(out.splitlines()) == 2
    assert seen[1].text.startswith("<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert seen[1].text.endswith("<end_of_turn>\n<start_of_turn>user\nAgain<end_of_turn>\n<start_of_turn>model\n")


def test_chat_on_a_terminal(cli, tiny_chat_dir, monkeypatch):
    """Typed turns: the answer streams to stdout, commands answer on stderr, Ctrl-D ends the session."""
    from llmsample import session

    typed = iter(["The quick", "/set temperature 0.5", "/set temperature -1", "The lazy"])

    def fake_input(prompt):
        assert prompt == "you> "
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(session, "is_terminal", lambda stream: True)
    monkeypatch.setattr("builtins.input", fake_input)
    code, out, err = cli("chat", "-m", str(tiny_chat_dir), *FAST, "--no-color")
    assert code == 0, err
    assert "chatting with" in err and "temperature = 0.5" in err
    assert "llmsample: error: --temperature must be" in err
    assert out.count("\n") == 2  # each streamed answer ends its line


@pytest.mark.slow
def test_the_packaged_gemma_with_gemma_template(cli, tmp_path):
    """The real Gemma 3 vocabulary: ids as transformers renders them, and <end_of_turn> (106) ends a chat."""
    from tiny_model import GEMMA_TEMPLATE
    from transformers import AutoTokenizer

    from llmsample import models, run
    from llmsample.models import ensure_default_model

    source = ensure_default_model("float32")
    folder = tmp_path / "gemma-chat"
    folder.mkdir()
    for item in source.iterdir():  # the weights linked, the tokenizer config given the template
        if item.name != "tokenizer_config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((source / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": GEMMA_TEMPLATE}))
    lm = models.load(str(folder))
    assert lm.engine == "llmsample"
    theirs = AutoTokenizer.from_pretrained(folder)
    assert chat.prepare(lm.tokenizer, lm.name, TURNS[-1]["content"], None, TURNS[0]["content"], TURNS[1:-1]).ids \
        == _hf_ids(theirs, TURNS)
    assert 106 in run.eos_ids(lm, chat=True) and 106 not in run.eos_ids(lm)
    code, out, err = cli("What is the capital of France?", "-m", str(folder), "--greedy", "--max-new-tokens", "24",
                         "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert data["prompt_format"] == "chat" and data["samples"][0]["token_ids"].count(106) <= 1

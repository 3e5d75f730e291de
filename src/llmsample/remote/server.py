"""Connecting to a serving engine: the URL and key, which dialect it speaks, and whether it serves the model.

Detection (``--dialect auto``) asks the server about itself, cheapest first, and stops at the first answer:

1. ``GET /v1/models`` (needed anyway, to check the model): vLLM marks its models ``"owned_by": "vllm"``;
2. ``GET /props``: only llama.cpp's llama-server has it (``default_generation_settings``);
3. ``GET /api/version``: Ollama's native API;
4. ``GET /openapi.json``: llama-cpp-python's FastAPI app lists its ``/extras/tokenize`` route;

and anything else is a plain OpenAI-compatible server (the OpenAI fields only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from llmsample.errors import ConfigError, ServerError
from llmsample.remote.dialects import DIALECT_NAMES, DIALECTS, Dialect
from llmsample.remote.http import DEFAULT_TIMEOUT, Client, base_url, http_error


@dataclass(frozen=True)
class ServerOptions:
    """How to reach the server, as the command line gave it."""

    base_url: str
    api_key_env: Optional[str] = None  # the NAME of the environment variable holding the key, never the key
    dialect: str = "auto"
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.dialect != "auto" and self.dialect not in DIALECTS:
            raise ConfigError(f"--dialect must be auto or one of {', '.join(DIALECT_NAMES)}, got {self.dialect!r}")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be a number of seconds > 0, got {self.timeout:g}")
        base_url(self.base_url)  # checked now, before anything runs


@dataclass
class Server:
    """A reachable server: its client, its dialect (and how it was chosen), and the model it will run."""

    client: Client
    dialect: Dialect
    detected: bool
    model: str
    served: list[str]

    @property
    def name(self) -> str:
        """The model's name on the server (what a chat session shows and saves)."""
        return self.model


def api_key(name: Optional[str]) -> Optional[str]:
    """The key from the environment variable ``name`` (the key itself never appears on a command line)."""
    if name is None:
        return None
    if not name or "=" in name:
        raise ConfigError(f"--api-key-env takes the NAME of an environment variable, got {name!r}")
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"--api-key-env {name}: the environment variable {name} is not set or empty")
    return value


def served_models(client: Client) -> tuple[Optional[list[str]], list[dict]]:
    """The model ids from ``/v1/models`` (None when the server has no such list) and the raw entries."""
    status, data = client.get_json("/v1/models")
    if status in (401, 403):
        import json

        raise http_error(status, "Unauthorized" if status == 401 else "Forbidden", json.dumps(data).encode(),
                         client.url, "/v1/models")
    if status != 200 or not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return None, []
    entries = [e for e in data["data"] if isinstance(e, dict) and "id" in e]
    return [str(e["id"]) for e in entries], entries


def detect(client: Client, entries: list[dict]) -> Dialect:
    """Which dialect the server speaks (see the module docstring)."""
    if any(e.get("owned_by") == "vllm" for e in entries):
        return DIALECTS["vllm"]
    status, data = client.get_json("/props")
    if status == 200 and isinstance(data, dict) and "default_generation_settings" in data:
        return DIALECTS["llama-server"]
    status, data = client.get_json("/api/version")
    if status == 200 and isinstance(data, dict) and "version" in data:
        return DIALECTS["ollama"]
    status, data = client.get_json("/openapi.json")
    if status == 200 and isinstance(data, dict) and "/extras/tokenize" in (data.get("paths") or {}):
        return DIALECTS["llama-cpp-python"]
    return DIALECTS["openai"]


def connect(options: ServerOptions, model: Optional[str]) -> Server:
    """Reach the server, settle its dialect and check that it serves ``model`` (or pick its only one)."""
    client = Client(base_url(options.base_url), api_key(options.api_key_env), options.timeout)
    served, entries = served_models(client)
    if model is None:
        if served is not None and len(served) == 1:
            model = served[0]
        else:
            listed = f": it serves {', '.join(served)}" if served else ""
            raise ConfigError(f"--engine openai needs --model NAME, the server's name for the model{listed}")
    if served is not None and model not in served:
        raise ServerError(f"the server at {client.url} does not serve the model {model!r}; it serves: "
                          + (", ".join(served) or "nothing"))
    dialect = DIALECTS[options.dialect] if options.dialect != "auto" else detect(client, entries)
    return Server(client, dialect, options.dialect == "auto", model, served or [])


def describe(server: Server) -> dict[str, Any]:
    """For JSON and --explain: where, which dialect and how it was chosen (never the key)."""
    return {"base_url": server.client.url, "dialect": server.dialect.name,
            "dialect_from": "detected" if server.detected else "--dialect", "model": server.model}

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# CI explores the same examples every run (a failure there is reproducible); locally each run explores anew.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

sys.path.insert(0, str(Path(__file__).parent))

# Tests never read or write the user's own llmsample cache: the converted default model lives in a cache of the
# tests' own (CI's XDG_CACHE_HOME is already a fresh folder of its own; LLMSAMPLE_TEST_CACHE picks another).
if not os.environ.get("CI"):
    os.environ["XDG_CACHE_HOME"] = os.environ.get("LLMSAMPLE_TEST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llmsample-tests")

from tiny_model import (  # noqa: E402
    GEMMA_TEMPLATE,
    GEMMA_TURN_TOKENS,
    PLAIN_TEMPLATE,
    build_tiny_gemma3,
    build_tiny_model,
    with_chat_template,
)


@pytest.fixture(autouse=True)
def own_config(tmp_path_factory, monkeypatch):
    """Every test sees an empty user preset folder, never the developer's own presets."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))


@pytest.fixture
def cli(capsys):
    """Run ``llmsample`` in-process with piped (empty unless given) stdin: ``code, out, err = cli(*args)``."""
    import io

    from llmsample.cli import main

    def run(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
        saved = sys.stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        try:
            code = main(list(args))
        finally:
            sys.stdin = saved
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory) -> Path:
    """A tiny Gemma 3 folder: llmsample's own engine runs it."""
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_chat_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny llama with a plain chat template (text markers; transformers engine and tokenizer)."""
    return with_chat_template(tiny_model_dir, tmp_path_factory.mktemp("chat") / "tiny-llama-chat", PLAIN_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_gemma_chat_dir(tmp_path_factory) -> Path:
    """A tiny Gemma 3 whose vocabulary has Gemma's turn tokens, with Gemma's template in the list-of-named-templates
    form; its tokenizer class is Gemma's, so llmsample's engine reads it with its own FastTokenizer."""
    plain = build_tiny_gemma3(tmp_path_factory.mktemp("gemma-turns") / "plain", extra_special=GEMMA_TURN_TOKENS)
    return with_chat_template(plain, tmp_path_factory.mktemp("chat") / "tiny-gemma-chat",
                              [{"name": "default", "template": GEMMA_TEMPLATE}], tokenizer_class="GemmaTokenizer")

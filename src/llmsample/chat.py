"""Chat templates: find a model's template and render a conversation through it, as transformers does.

The template comes from the tokenizer (transformers keeps the one of tokenizer_config.json, chat_template.jinja
or a GGUF's ``tokenizer.chat_template``) or, for llmsample's own ``FastTokenizer``, from the model folder's files
(``read_template``). It is rendered in a sandboxed Jinja environment with transformers' settings (trim_blocks,
lstrip_blocks, ``add_generation_prompt``, ``raise_exception``, the special tokens' texts), and the rendered text
is tokenised without adding special tokens again: it already begins with the BOS text where the model wants one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from llmsample.errors import ConfigError

CHAT, RAW = "chat", "raw"
# Tokens that end a turn in the common templates (Gemma, ChatML, Llama 3, Phi): a chat stops on each the vocabulary
# has as one token, besides the EOS ids of generation_config.json (which for a base model name only <eos>).
END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def pick(template: Any) -> Optional[str]:
    """A template as tokenizer_config.json may hold it: a string, or named templates (the one called default)."""
    if isinstance(template, str):
        return template or None
    if isinstance(template, dict):
        return pick(template.get("default"))
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return pick(named.get("default"))
    return None


def read_template(folder: Path) -> Optional[str]:
    """The chat template saved in a model folder: chat_template.jinja, or tokenizer_config.json's chat_template."""
    jinja = folder / "chat_template.jinja"
    try:
        if jinja.is_file():
            return pick(jinja.read_text(encoding="utf-8"))
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return pick(config.get("chat_template")) if isinstance(config, dict) else None


def template_of(tokenizer: Any) -> Optional[str]:
    """The tokenizer's chat template (transformers' tokenizers and ``FastTokenizer`` both keep it), or None."""
    return pick(getattr(tokenizer, "chat_template", None))


def choose(requested: Optional[bool], template: Optional[str], model: str) -> str:
    """``chat`` or ``raw``: ``--chat`` (True), ``--raw`` (False), or by default chat exactly when there is a template."""
    if requested is False:
        return RAW
    if template is None:
        if requested:
            where = ("the GGUF's tokenizer.chat_template" if model.endswith(".gguf")
                     else "tokenizer_config.json's chat_template")
            raise ConfigError(f"--chat: {model} has no chat template ({where}); drop --chat for a plain continuation")
        return RAW
    return CHAT


def messages(user: str, system: Optional[str] = None, history: Sequence[dict] = ()) -> list[dict[str, str]]:
    """The conversation to render: the system message, earlier turns, and the new user turn."""
    out = [{"role": "system", "content": system}] if system else []
    return out + [dict(m) for m in history] + [{"role": "user", "content": user}]


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _environment() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # as transformers' (Jinja's own escapes HTML characters)
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=_raise, strftime_now=strftime_now)
    return env


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """The ids of the ``END_OF_TURN`` tokens that are single tokens of this vocabulary."""
    ids = set()
    for text in END_OF_TURN:
        found = tokenizer.encode(text, add_special_tokens=False)
        if len(found) == 1 and tokenizer.decode(found) == text:
            ids.add(int(found[0]))
    return ids


def special_texts(tokenizer: Any) -> dict[str, str]:
    """The special tokens' texts the template may use (``bos_token``, ``eos_token``, …)."""
    return {name: text for name in SPECIAL_TOKENS if isinstance(text := getattr(tokenizer, name, None), str)}


def render(template: str, conversation: list[dict[str, str]], tokens: dict[str, str]) -> str:
    """The conversation through the template, ready for the model's answer (``add_generation_prompt``)."""
    from jinja2.exceptions import TemplateError

    try:
        compiled = _environment().from_string(template)
        return compiled.render(messages=conversation, add_generation_prompt=True, **tokens)
    except (TemplateError, TypeError, ValueError, LookupError, AttributeError) as exc:  # the template's own fault
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"the model's chat template failed: {why}") from None


@dataclass
class Prompt:
    """What the model reads: its mode, the text (rendered in chat mode) and the token ids."""

    mode: str
    text: str
    ids: list[int]


def prepare(tokenizer: Any, model: str, user: str, requested: Optional[bool] = None, system: Optional[str] = None,
            history: Sequence[dict] = ()) -> Prompt:
    """The prompt in the mode asked for (or chosen by default), tokenised; raw mode adds the special tokens."""
    template = template_of(tokenizer)
    mode = choose(requested, template, model)
    if mode == RAW:
        return Prompt(RAW, user, list(tokenizer.encode(user)))
    text = render(template, messages(user, system, history), special_texts(tokenizer))  # type: ignore[arg-type]
    return Prompt(CHAT, text, list(tokenizer.encode(text, add_special_tokens=False)))

"""What each serving engine takes: one capability table, declared as data.

A dialect says, for every llmsample setting it can honour, the JSON name the server reads and the part of the body
it goes in (``body``: a field of the OpenAI API itself; ``extra``: the server's own field beside them, what the
openai Python client sends as ``extra_body``; a dotted name nests it), how the server orders its samplers, how it
reports log-probabilities, and whether it draws several samples per request (``n``). ``request()`` builds the body
from resolved settings and lists every setting in use that the server cannot honour: the caller warns about each
(the "has no effect" warning of a local run), so nothing is dropped silently.

The tables follow each server's own request schema: vLLM's ``CompletionRequest`` (sampling extras ``top_k``,
``min_p``, ``repetition_penalty``, ``ignore_eos``, ``structured_outputs``), llama.cpp's llama-server ``/completion``
(tools/server/README.md: ``samplers``, ``n_probs``, ``post_sampling_probs``, DRY, XTC, …), llama-cpp-python's
``llama_cpp.server`` (``CreateCompletionRequest``: it ignores ``n`` and has no ``typical_p``, no order, and its own
defaults are not neutral: top_k 40, top_p 0.95, min_p 0.05, repeat_penalty 1.1, temperature 0.8, so every value is
sent), Ollama's OpenAI layer and the OpenAI API itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from llmsample.config import Settings
from llmsample.sampling.registry import FIELD_STAGE, FIELDS


class Unsupported(Exception):
    """A value this server cannot take, with the reason (becomes a "has no effect" warning)."""


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Param:
    """Where one llmsample setting goes: the server's JSON name, the part of the body, and a conversion."""

    name: str
    part: str = "body"  # body: an OpenAI API field; extra: the server's own field beside them
    convert: Callable[[Any], Any] = _same


@dataclass(frozen=True)
class Dialect:
    """One server's API, as data. ``params`` maps llmsample setting names to where the server reads them."""

    name: str
    title: str
    completions: str  # the raw-continuation endpoint
    chat: str  # the chat endpoint (the server renders its own template)
    params: dict[str, Param]
    order: str  # "samplers": takes the order (``order_param``); "fixed": its own (``fixed_order``); "unknown"
    fixed_order: tuple[str, ...] = ()
    order_param: Optional[Param] = None
    logprobs: str = "openai"  # "openai": logprobs=N (top_logprobs); "llama-server": n_probs (+ post-sampling); ""
    max_logprobs: int = 20  # the most alternatives per token it returns
    takes_n: bool = True  # draws n samples per request; else llmsample sends one request per sample
    neutral_defaults: bool = True  # its own defaults are the neutral values: a neutral setting need not be sent
    stream_format: str = "openai"  # "openai" chunks, or "llama-server" (its native /completion)
    notes: dict[str, str] = field(default_factory=dict)  # setting -> how the server's reading differs


# ---- conversions -------------------------------------------------------------------------------------------------


def _openai_bias(bias: dict) -> dict:
    """{id: bias} with ids as strings and biases clipped to the API's [-100, 100]; a text needs the tokenizer."""
    out = {}
    for token, value in bias.items():
        if not isinstance(token, int):
            raise Unsupported(f"the token {token!r} is given as text, and only the server's tokenizer knows its id: "
                              "give the id")
        out[str(token)] = max(-100.0, min(100.0, value))
    return out


def _llama_server_bias(bias: dict) -> list:
    """llama-server takes ``[[id or text, bias]]``; ``false`` bans a token (our -inf)."""
    return [[token, False if math.isinf(value) else value] for token, value in bias.items()]


def _texts(values: Any) -> list:
    if not all(isinstance(v, str) for v in values):
        raise Unsupported("the server takes texts here, not token ids")
    return list(values)


def _gbnf(text: str) -> str:
    if "::=" not in text:
        raise Unsupported("this server takes a GBNF grammar ('root ::= …') only, not Lark")
    return text


def _schema(text: str) -> Any:
    return json.loads(text)


LLAMA_SERVER_SAMPLERS = {"penalties": "penalties", "dry": "dry", "top_n_sigma": "top_n_sigma", "top_k": "top_k",
                         "typical_p": "typ_p", "top_p": "top_p", "min_p": "min_p", "xtc": "xtc",
                         "temperature": "temperature"}


def _samplers(order: tuple[str, ...]) -> list[str]:
    """llmsample's order as llama-server's ``samplers`` (the stages it applies elsewhere or not at all left out)."""
    return [LLAMA_SERVER_SAMPLERS[name] for name in order if name in LLAMA_SERVER_SAMPLERS]


# ---- the table ---------------------------------------------------------------------------------------------------

_OPENAI = {
    "temperature": Param("temperature"), "top_p": Param("top_p"),
    "frequency_penalty": Param("frequency_penalty"), "presence_penalty": Param("presence_penalty"),
    "logit_bias": Param("logit_bias", convert=_openai_bias),
    "max_new_tokens": Param("max_tokens"), "stop": Param("stop", convert=list), "seed": Param("seed"),
}

DIALECTS: dict[str, Dialect] = {d.name: d for d in (
    Dialect(
        "vllm", "vLLM", "/v1/completions", "/v1/chat/completions",
        {**_OPENAI, "top_k": Param("top_k", "extra"), "min_p": Param("min_p", "extra"),
         "repetition_penalty": Param("repetition_penalty", "extra"), "ignore_eos": Param("ignore_eos", "extra"),
         "json_schema": Param("structured_outputs.json", "extra", _schema),
         "regex": Param("structured_outputs.regex", "extra"),
         "choice": Param("structured_outputs.choice", "extra", list),
         "grammar": Param("structured_outputs.grammar", "extra")},
        # vllm/v1/sample/sampler.py: biases, penalties, then temperature, then min_p, then top-k/top-p.
        order="fixed", fixed_order=("logit_bias", "penalties", "grammar", "temperature", "min_p", "top_k", "top_p"),
        max_logprobs=20,
        notes={"repetition_penalty": "vLLM penalises every token seen in the prompt and the output"},
    ),
    Dialect(
        "llama-server", "llama.cpp's llama-server", "/completion", "/v1/chat/completions",
        {"temperature": Param("temperature"), "top_p": Param("top_p"), "top_k": Param("top_k", "extra"),
         "min_p": Param("min_p", "extra"), "typical_p": Param("typical_p", "extra"),
         "top_n_sigma": Param("top_n_sigma", "extra"),
         "xtc_probability": Param("xtc_probability", "extra"), "xtc_threshold": Param("xtc_threshold", "extra"),
         "repetition_penalty": Param("repeat_penalty", "extra"), "penalty_last_n": Param("repeat_last_n", "extra"),
         "frequency_penalty": Param("frequency_penalty"), "presence_penalty": Param("presence_penalty"),
         "dry_multiplier": Param("dry_multiplier", "extra"), "dry_base": Param("dry_base", "extra"),
         "dry_allowed_length": Param("dry_allowed_length", "extra"),
         "dry_penalty_last_n": Param("dry_penalty_last_n", "extra"),
         "dry_sequence_breakers": Param("dry_sequence_breakers", "extra", _texts),
         "dynatemp_range": Param("dynatemp_range", "extra"), "dynatemp_exponent": Param("dynatemp_exponent", "extra"),
         "mirostat": Param("mirostat", "extra"), "mirostat_tau": Param("mirostat_tau", "extra"),
         "mirostat_eta": Param("mirostat_eta", "extra"), "min_tokens_to_keep": Param("min_keep", "extra"),
         "logit_bias": Param("logit_bias", convert=_llama_server_bias),
         "grammar": Param("grammar", "extra", _gbnf), "json_schema": Param("json_schema", "extra", _schema),
         "max_new_tokens": Param("n_predict", "extra"), "stop": Param("stop", convert=list), "seed": Param("seed"),
         "ignore_eos": Param("ignore_eos", "extra")},
        order="samplers", order_param=Param("samplers", "extra", _samplers),
        logprobs="llama-server", max_logprobs=100, takes_n=False, neutral_defaults=False,
        stream_format="llama-server",
    ),
    Dialect(
        "llama-cpp-python", "llama-cpp-python's llama_cpp.server", "/v1/completions", "/v1/chat/completions",
        {**_OPENAI, "top_k": Param("top_k", "extra"), "min_p": Param("min_p", "extra"),
         "repetition_penalty": Param("repeat_penalty", "extra"),
         "mirostat": Param("mirostat_mode", "extra"), "mirostat_tau": Param("mirostat_tau", "extra"),
         "mirostat_eta": Param("mirostat_eta", "extra"), "grammar": Param("grammar", "extra", _gbnf)},
        # llama_cpp/llama.py _init_sampler: biases (a logits processor), penalties, grammar, then top-k, typical
        # (which its server cannot set), top-p, min-p and temperature last.
        order="fixed", fixed_order=("logit_bias", "penalties", "grammar", "top_k", "top_p", "min_p", "temperature"),
        max_logprobs=100, takes_n=False, neutral_defaults=False,
        notes={"repetition_penalty": "llama-cpp-python penalises only the last tokens its server was started with "
                                     "(--last_n_tokens_size, 64 by default), whatever penalty_last_n says"},
    ),
    Dialect(
        "ollama", "Ollama", "/v1/completions", "/v1/chat/completions",
        {key: value for key, value in _OPENAI.items() if key != "logit_bias"},
        order="unknown", logprobs="", takes_n=False, neutral_defaults=False,
        notes={"*": "Ollama's OpenAI layer takes no top_k, min_p or repeat_penalty: the model's own values (its "
                    "Modelfile; top_k 40 unless it says otherwise) apply"},
    ),
    Dialect(
        "openai", "an OpenAI-compatible server", "/v1/completions", "/v1/chat/completions",
        dict(_OPENAI), order="unknown", max_logprobs=5,
    ),
)}
DIALECT_NAMES = tuple(DIALECTS)


# ---- building a request -----------------------------------------------------------------------------------------


def in_use(settings: Settings) -> dict[str, Any]:
    """The sampling settings that change what is drawn here: set away from neutral, and not inactive."""
    cfg = settings.sampling
    inactive = {name for name, _ in cfg.inactive_settings()}
    out = {}
    for name, spec in FIELDS.items():
        if name in ("order", "do_sample") or name in inactive:
            continue
        value = getattr(cfg, name)
        if value != spec.neutral and (name not in FIELD_STAGE or cfg.stage_is_set(FIELD_STAGE[name])):
            out[name] = value
    return out


def _put(body: dict, name: str, value: Any) -> None:
    """Set ``a.b`` as ``body["a"]["b"]``."""
    *path, last = name.split(".")
    for key in path:
        body = body.setdefault(key, {})
    body[last] = value


@dataclass
class Request:
    """A request body without the prompt, the settings it carries, and those the server cannot honour."""

    body: dict
    sent: dict[str, Any]  # llmsample setting -> value sent
    unsupported: list[tuple[str, str]]  # (setting key as in Settings.rows(), why it has no effect)
    caveats: list[str]  # how the server reads a setting in use differently (and what it applies on its own)
    order: dict[str, Any]  # how the server orders its samplers, for --explain and JSON


def request(dialect: Dialect, settings: Settings, samples: int, ignore_eos: bool, top_n: int,
            probs: bool = True, post_sampling: bool = True) -> Request:
    """The body for ``dialect`` from resolved ``settings``; ``samples`` per request (n); ``top_n`` alternatives
    per token wanted; ``probs``: the chosen token's probability is wanted (colours, JSON) even when top_n is 0;
    ``post_sampling``: where the server can say (llama-server), the probabilities after its chain, else raw."""
    cfg, gen = settings.sampling, settings.generation
    body: dict = {}
    sent: dict[str, Any] = {}
    unsupported: list[tuple[str, str]] = []
    used = in_use(settings)
    for name, param in dialect.params.items():
        if name in FIELDS:
            value = _sampling_value(dialect, cfg, name, used)
        else:
            value = {"max_new_tokens": gen.max_new_tokens, "stop": gen.stop or None, "seed": gen.seed,
                     "ignore_eos": ignore_eos or None}[name]
        if value is None:
            continue
        try:
            _put(body, param.name, param.convert(value))
        except Unsupported as exc:
            unsupported.append((_key(name), f"{dialect.title} cannot take it: {exc}"))
            continue
        sent[name] = value
    for name in used:
        if name not in dialect.params:
            unsupported.append((_key(name), f"{dialect.title} does not take it"))
    if settings.schedule and cfg.do_sample:
        unsupported.append(("schedule", f"{dialect.title} takes one temperature per request"))
    if ignore_eos and "ignore_eos" not in dialect.params:
        unsupported.append(("ignore_eos", f"{dialect.title} does not take it"))
    if samples > 1:
        if dialect.takes_n:
            body["n"] = samples
        sent["num_samples"] = samples
    order = _order(dialect, settings, used)
    if dialect.order == "samplers" and dialect.order_param is not None:
        _put(body, dialect.order_param.name, dialect.order_param.convert(cfg.order))
        sent["order"] = list(cfg.order)
    elif order.get("differs"):
        unsupported.append(("sampling.order", order["why"]))
    if probs or top_n:
        _logprobs(dialect, body, top_n, post_sampling)
    caveats = [f"{name}: {note}" if name != "*" else note for name, note in dialect.notes.items()
               if name == "*" or name in used]
    return Request(body, sent, unsupported, caveats, order)


def _sampling_value(dialect: Dialect, cfg: Any, name: str, used: dict[str, Any]) -> Any:
    """The value to send for one sampling setting, or None to leave it out."""
    if name == "temperature":
        return 0.0 if cfg.greedy else cfg.temperature  # every server reads 0 as "take the top token"
    if name in used:
        return used[name]
    spec = FIELDS[name]
    if dialect.neutral_defaults or spec.kind not in ("float", "int", "choice"):
        return None  # the server's default is the neutral value (or there is nothing to say)
    return spec.neutral  # a llama.cpp server's defaults are not neutral (top_k 40, …): say "off" outright


def _key(name: str) -> str:
    return f"sampling.{name}" if name in FIELDS else f"generation.{name}" if name != "ignore_eos" else name


def _order(dialect: Dialect, settings: Settings, used: dict[str, Any]) -> dict[str, Any]:
    """How this server orders the stages in use, and whether that differs from llmsample's order."""
    cfg = settings.sampling
    stages = [s for s in cfg.order if any(FIELD_STAGE.get(name) == s for name in used)]  # temperature included
    if dialect.order == "samplers":
        return {"honoured": True, "server_order": _samplers(cfg.order), "how": "samplers", "stages": stages}
    if dialect.order == "fixed":
        known = [s for s in stages if s in dialect.fixed_order]
        theirs = [s for s in dialect.fixed_order if s in known]
        out: dict[str, Any] = {"honoured": False, "server_order": list(dialect.fixed_order), "how": "fixed"}
        out["stages"] = known
        if known != theirs and len(known) > 1:
            out["differs"] = True
            out["why"] = f"{dialect.title} applies its fixed order ({' -> '.join(theirs)})"
        return out
    out = {"honoured": False, "server_order": None, "how": "unknown", "stages": stages}
    if tuple(cfg.order) != STAGE_ORDER_DEFAULT and len(stages) > 1:
        out["differs"] = True
        out["why"] = f"{dialect.title} applies its own order, which it does not say"
    return out


STAGE_ORDER_DEFAULT = tuple(FIELDS["order"].neutral)


def _logprobs(dialect: Dialect, body: dict, top_n: int, post_sampling: bool) -> None:
    """Ask for the chosen token's probability (for the colours) and ``top_n`` alternatives."""
    if dialect.logprobs == "openai":
        body["logprobs"] = min(max(top_n, 1), dialect.max_logprobs)
    elif dialect.logprobs == "llama-server":
        body["n_probs"] = min(max(top_n, 1), dialect.max_logprobs)
        if post_sampling:
            body["post_sampling_probs"] = True  # the probabilities after its sampler chain, as llmsample colours


def markdown_table() -> str:
    """The capability table as the README shows it (a test keeps the two the same): per setting, the JSON name
    each dialect reads it under; *extra* marks the server's own fields, — a setting it cannot take (warned)."""
    names = [d.name for d in DIALECTS.values()]
    settings: list[str] = []
    for d in DIALECTS.values():
        settings += [name for name in d.params if name not in settings]
    settings.sort(key=lambda n: (n not in FIELDS, list(FIELDS).index(n) if n in FIELDS else 0))

    def cell(d: Dialect, name: str) -> str:
        param = d.params.get(name)
        return "—" if param is None else f"`{param.name}`" + (" *extra*" if param.part == "extra" else "")

    lines = ["| setting | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(d, name) for d in DIALECTS.values()) + " |" for name in settings]
    order = {"samplers": lambda d: f"`{d.order_param.name}` *extra*", "fixed": lambda d: "fixed: " + " → ".join(
        d.fixed_order), "unknown": lambda d: "its own (unknown)"}
    lines.append("| order | " + " | ".join(order[d.order](d) for d in DIALECTS.values()) + " |")
    lines.append("| -n | " + " | ".join("`n`" if d.takes_n else "one request per sample" for d in DIALECTS.values())
                 + " |")
    probs = {"openai": lambda d: f"`logprobs` (raw, top ≤ {d.max_logprobs})",
             "llama-server": lambda d: f"`n_probs` + `post_sampling_probs` (after its chain, top ≤ {d.max_logprobs})",
             "": lambda d: "none"}
    lines.append("| probabilities | " + " | ".join(probs[d.logprobs](d) for d in DIALECTS.values()) + " |")
    lines.append("| endpoint (raw / --chat) | " + " | ".join(f"`{d.completions}` / `{d.chat}`"
                                                          for d in DIALECTS.values()) + " |")
    taken = {name for d in DIALECTS.values() for name in d.params}
    none = [name for name in FIELDS if name not in taken and name not in ("do_sample", "order")]
    lines += ["", "Taken by none of them (warned whenever set): " + ", ".join(f"`{n}`" for n in none) + "."]
    return "\n".join(lines)


__all__ = ["DIALECTS", "DIALECT_NAMES", "Dialect", "Param", "Request", "request", "in_use", "markdown_table"]

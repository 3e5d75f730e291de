"""Command-line options derived from the stage registry: one declaration per setting, shared by the commands.

``stage_options()`` adds an option for every setting the registry marks for the CLI to a Typer command and hands
the command the given values as one ``stage_values`` dict; ``to_layer`` turns that dict into the command-line
settings layer. No torch here: ``--help`` stays instant.
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from typing import Annotated, Any, Callable, Optional

import typer

from llmsample.errors import ConfigError
from llmsample.sampling.registry import ALL_FIELDS, FIELDS, Field

SAMPLING_PANEL = "Sampling"
CLI_FIELDS: tuple[Field, ...] = tuple(f for f in ALL_FIELDS if f.cli)
# Fields a flag can list several values of in one run (the rest take one value, or one per variant).
MULTI_VALUE_KINDS = ("token_bias", "sequences", "choices")
SCALAR_KINDS = ("float", "int", "choice")

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


def unescape(text: str) -> str:
    r"""Turn ``\n``, ``\t``, ``\\`` and quotes typed at a shell into the characters (as llama.cpp's flags do).

    >>> unescape(r"a\nb\\c")
    'a\nb\\c'
    """
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def shown_default(field: Field) -> str:
    """The neutral value as a person would type it."""
    value = field.neutral
    if field.kind == "sequences" and value:
        return " ".join(repr(v)[1:-1] for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ", ".join(value) if field.kind == "order" else "none"
    if isinstance(value, dict) or value == "":
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def help_text(field: Field, usage: str = "") -> str:
    """The field's help with its default and range in brackets (escaped: rich would eat them as markup).

    ``usage``: a note on how the command takes the flag, put before the default (``inspect``'s repeatable flags).
    """
    ranges = "" if field.kind in MULTI_VALUE_KINDS else field.range_text()
    extra = "; ".join(p for p in (ranges, field.off) if p)
    bracket = f"[default: {shown_default(field)}" + (f"; {extra}" if extra else "") + "]"
    if field.kind == "order":
        bracket = f"[default: llama.cpp's order, see --explain; {field.range_text()}]"
    # A backslash before the bracket makes rich print it as text; rich's own escape() leaves "[default: 0; [0, 1]]"
    # alone (it contains another bracket), which then prints only because it is no valid tag.
    return f"{field.help}{f' ({usage})' if usage else ''} \\{bracket}"


def _python_type(field: Field) -> type:
    return {"float": float, "int": int, "choice": int}.get(field.kind, str)


def _annotation(field: Field, repeatable: bool, alias: bool = False) -> Any:
    """The option for ``field``: its first flag, or (``alias``) the others, hidden from ``--help`` (where the
    first flag's help names them), so that long alias pairs do not widen the help's column of flags."""
    base = _python_type(field)
    many = field.kind in MULTI_VALUE_KINDS or (repeatable and field.kind in SCALAR_KINDS + ("order",))
    kind: Any = Optional[list[base]] if many else Optional[base]  # type: ignore[valid-type]
    usage = "; ".join(note for note in (f"also {', '.join(field.all_flags[1:])}" if field.all_flags[1:] else "",
                                        "repeatable: one value per variant" if repeatable and
                                        field.kind not in MULTI_VALUE_KINDS else "") if note)
    flags = field.all_flags[1:] if alias else field.all_flags[:1]
    option = typer.Option(*flags, help=help_text(field, usage), metavar=field.metavar, show_default=False,
                          rich_help_panel=SAMPLING_PANEL, hidden=alias)
    return Annotated[kind, option]


def _alias_name(field: Field) -> str:
    return f"{field.name}__alias"


def stage_options(repeatable: bool = False) -> Callable[[Callable], Callable]:
    """Give a command an option per registry setting; it receives them as ``stage_values={name: value}``.

    ``repeatable``: scalar settings take several values (``inspect``: one variant per value).
    """

    def decorate(command: Callable) -> Callable:
        hints = typing.get_type_hints(command, include_extras=True)
        signature = inspect.signature(command)
        kept = [p.replace(annotation=hints.get(p.name, p.annotation))
                for p in signature.parameters.values() if p.name != "stage_values"]
        added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                   annotation=_annotation(f, repeatable)) for f in CLI_FIELDS]
        added += [inspect.Parameter(_alias_name(f), inspect.Parameter.KEYWORD_ONLY, default=None,
                                    annotation=_annotation(f, repeatable, alias=True))
                  for f in CLI_FIELDS if len(f.all_flags) > 1]

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            values = {}
            for f in CLI_FIELDS:
                value, aliased = kwargs.pop(f.name, None), kwargs.pop(_alias_name(f), None)
                if value is not None and aliased is not None:
                    raise ConfigError(f"{' and '.join(f.all_flags)} are one setting: give it once")
                values[f.name] = aliased if value is None else value
            return command(*args, stage_values=values, **kwargs)

        parameters = kept + added
        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        del run.__wrapped__  # type: ignore[attr-defined]
        return run

    return decorate


def parse_value(field: Field, value: Any) -> Any:
    """One flag's value (as Typer parsed it) in the settings' own form; errors name the flag."""
    if field.kind == "token_bias":
        out: dict[Any, float] = {}
        for item in value:
            token, sep, bias = item.rpartition("=")
            if not sep or not token:
                raise ConfigError(f"{field.flag} takes TOKEN=BIAS (a token id or text, and a number), got {item!r}")
            try:
                number = float(bias)
            except ValueError:
                raise ConfigError(f"{field.flag} {item!r}: the bias {bias!r} is not a number") from None
            if math.isnan(number) or number == math.inf:
                raise ConfigError(f"{field.flag} {item!r}: the bias must be a finite number or -inf")
            out[int(token) if token.strip().isdigit() else unescape(token)] = number
        return out
    if field.kind == "sequences":
        texts = [unescape(v) for v in value]
        if any(t == "" for t in texts):
            raise ConfigError(f"{field.flag} needs a non-empty text, got ''")
        return tuple(texts)
    if field.kind in ("json_schema", "grammar"):
        return constraint_text(field, value)
    if field.kind == "choices":
        return tuple(value)
    if field.kind == "early_stopping":
        key = value.strip().lower()
        if key not in ("true", "false", "never"):
            raise ConfigError(f"{field.flag} must be true, false or never, got {value!r}")
        return {"true": True, "false": False}.get(key, "never")
    return value


def constraint_text(field: Field, value: str) -> str:
    """``--json-schema FILE|JSON``, ``--grammar FILE``: the text, read from the file when one is named.

    The text is checked here so that an error names the file; a schema given inline starts with ``{``.
    """
    from llmsample import grammar

    where = field.flag
    if field.kind == "json_schema" and value.lstrip().startswith("{"):
        text = value
    else:
        try:
            with open(value, encoding="utf-8") as file:
                text = file.read()
        except OSError as exc:
            raise ConfigError(f"cannot read {field.flag} file {value}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{field.flag} {value}: not valid UTF-8 at byte offset {exc.start}") from None
        where = f"{field.flag} {value}"
        if not text.strip():
            raise ConfigError(f"{where}: the file is empty")
    grammar.check(field.name, text, where)
    return text


def to_layer(stage_values: dict[str, Any]) -> dict[str, Any]:
    """The given (non-None) settings, parsed: ``{field name: value}``."""
    return {name: parse_value(FIELDS[name], value) for name, value in stage_values.items() if value is not None}


def to_variants(stage_values: dict[str, Any]) -> dict[str, list]:
    """For ``inspect``: each scalar setting's list of per-variant values; multi-value settings as one value."""
    out: dict[str, list] = {}
    for name, value in stage_values.items():
        if value is None or value == []:
            continue
        field = FIELDS[name]
        if field.kind in MULTI_VALUE_KINDS or not isinstance(value, list):
            out[name] = [parse_value(field, value)]
        else:
            out[name] = [parse_value(field, v) for v in value]
    return out

"""Reading what ``replay`` replays: a saved ``generate --format json`` output, or an ``explore`` session file.

Every fault is one ``ConfigError`` line naming the file and what is wrong with it: not JSON, a foreign ``type``,
a schema version this llmsample does not read, a missing or mistyped field. No torch here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llmsample.config import COMMAND_LINE, FIELD_NAMES, Settings, resolve
from llmsample.errors import ConfigError

GENERATE = "summary"  # the "type" of a generate --format json object (and of a jsonl run's last line)
EXPLORE = "explore_session"
SCHEMAS = {GENERATE: 1, EXPLORE: 1}
KINDS = {GENERATE: "generate output", EXPLORE: "explore session"}
ARTICLES = {GENERATE: "a", EXPLORE: "an"}
# Keys of a recorded "settings" object that are not sampling fields.
GENERATION_KEYS = ("max_new_tokens", "stop", "num_samples")
DERIVED_KEYS = ("chain", "schedule", "force", "ignore_eos", "seed")


@dataclass
class Recording:
    """One replayable file: its ``kind`` (``GENERATE`` or ``EXPLORE``) and its checked JSON ``data``."""

    path: str
    kind: str
    data: dict

    @property
    def label(self) -> str:
        return KINDS[self.kind]


def read(path: str) -> Recording:
    """The file at ``path``, checked; ``ConfigError`` (exit 2) naming what is wrong."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not valid UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}") from None
    data = _json(path, text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a llmsample recording (a JSON {type(data).__name__}, not an object with "
                          f'"type" "{GENERATE}" or "{EXPLORE}")')
    kind = data.get("type")
    if kind not in SCHEMAS:
        shown = "missing" if "type" not in data else f"{kind!r}" if isinstance(kind, str) else json.dumps(kind)
        raise ConfigError(f'{path}: "type" is {shown}: replay reads a generate --format json output '
                          f'("{GENERATE}") or an explore session ("{EXPLORE}")')
    schema = data.get("schema")
    if schema != SCHEMAS[kind]:
        shown = "missing" if "schema" not in data else json.dumps(schema)
        raise ConfigError(f"{path}: schema version {shown} of {ARTICLES[kind]} {KINDS[kind]} is not one this "
                          f"llmsample reads ({SCHEMAS[kind]})")
    check = _Checker(path)
    if kind == GENERATE:
        _check_generate(check, data)
    else:
        _check_explore(check, data)
    return Recording(path, kind, data)


def _json(path: str, text: str) -> Any:
    """The whole text as JSON, or a ``--format jsonl`` run's last line (its summary)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) > 1:
            try:
                last = json.loads(lines[-1])
                if isinstance(last, dict) and last.get("type") == GENERATE:
                    return last
            except json.JSONDecodeError:
                pass
        raise ConfigError(f"{path} is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None


class _Checker:
    """Field checks whose errors name the file and the field's path (``samples[0].token_ids``)."""

    TYPES = {"text": str, "object": dict, "list": list}

    def __init__(self, path: str):
        self.path = path

    def field(self, obj: dict, key: str, kind: str, where: str = "", optional: bool = False) -> Any:
        name = f"{where}.{key}" if where else key
        if key not in obj or (optional and obj[key] is None):
            if optional:
                return None
            raise ConfigError(f'{self.path}: missing field "{name}"')
        value = obj[key]
        if not _is(value, kind):
            raise ConfigError(f'{self.path}: field "{name}" must be {_A[kind]}, got {_shown(value)}')
        return value

    def items(self, values: list, kind: str, where: str) -> None:
        for i, value in enumerate(values):
            if not _is(value, kind):
                raise ConfigError(f'{self.path}: field "{where}[{i}]" must be {_A[kind]}, got {_shown(value)}')

    def fail(self, message: str) -> None:
        raise ConfigError(f"{self.path}: {message}")


_A = {"text": "a text", "object": "an object", "list": "a list", "int": "an integer", "number": "a number",
      "id": "a token id (an integer >= 0)", "prob": "a probability (a number in [0, 1])"}


def _is(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "id":
        return _is(value, "int") and value >= 0
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "prob":
        return _is(value, "number") and 0.0 <= value <= 1.0
    return isinstance(value, _Checker.TYPES[kind])


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_generate(check: _Checker, data: dict) -> None:
    for key in ("prompt", "model", "device", "dtype"):
        check.field(data, key, "text")
    check.field(data, "seed", "int")
    check.field(data, "settings", "object")
    samples = check.field(data, "samples", "list")
    if not samples:
        check.fail('field "samples" is empty')
    check.items(samples, "object", "samples")
    for i, sample in enumerate(samples):
        where = f"samples[{i}]"
        ids = check.field(sample, "token_ids", "list", where)
        check.items(ids, "id", f"{where}.token_ids")
        for key in ("raw_probs", "probs"):
            values = check.field(sample, key, "list", where)
            check.items(values, "prob", f"{where}.{key}")
            if values and len(values) != len(ids):  # beam search records no per-token probabilities
                check.fail(f'field "{where}.{key}" has {len(values)} entries for {len(ids)} token_ids')
        candidates = check.field(sample, "candidates", "list", where, optional=True) or []
        for j, table in enumerate(candidates):
            _check_table(check, table, f"{where}.candidates[{j}]")
    check.field(data, "stats", "object", optional=True)
    check.field(data, "system", "text", optional=True)
    check.field(data, "rendered_prompt", "text", optional=True)


def _check_table(check: _Checker, table: Any, where: str) -> None:
    if not isinstance(table, dict):
        check.fail(f'field "{where}" must be an object, got {_shown(table)}')
    check.field(table, "stages", "list", where)
    rows = check.field(table, "candidates", "list", where)
    check.items(rows, "object", f"{where}.candidates")
    for k, row in enumerate(rows):
        at = f"{where}.candidates[{k}]"
        check.field(row, "token_id", "id", at)
        check.field(row, "raw_prob", "number", at)
        check.field(row, "final_prob", "number", at)


def _check_explore(check: _Checker, data: dict) -> None:
    for key in ("model", "device", "dtype", "prompt"):
        check.field(data, key, "text")
    ids = check.field(data, "prompt_ids", "list")
    check.items(ids, "id", "prompt_ids")
    if not ids:
        check.fail('field "prompt_ids" is empty')
    check.field(data, "seed", "int", optional=True)
    check.field(data, "settings", "object")
    check.field(data, "current_branch", "int")
    branches = check.field(data, "branches", "list")
    if not branches:
        check.fail('field "branches" is empty')
    check.items(branches, "object", "branches")
    for i, branch in enumerate(branches):
        where = f"branches[{i}]"
        check.field(branch, "id", "int", where)
        steps = check.field(branch, "steps", "list", where)
        check.items(steps, "object", f"{where}.steps")
        for j, step in enumerate(steps):
            at = f"{where}.steps[{j}]"
            check.field(step, "token_id", "id", at)
            check.field(step, "raw_prob", "prob", at)
            check.field(step, "prob", "prob", at)
            check.field(step, "settings", "object", at)
            table = check.field(step, "candidates", "object", at, optional=True)
            if table is not None:
                _check_table(check, table, f"{at}.candidates")


def settings_of(recorded: dict, where: str, overrides: Optional[dict] = None) -> tuple[Settings, list[str]]:
    """A recorded ``settings`` object (generate's JSON shape) as ``Settings``, with ``overrides`` (a command-line
    layer) on top; and the recorded keys this llmsample does not know (ignored: a newer version's)."""
    sampling = {key: _finite(key, value) for key, value in recorded.items() if key in FIELD_NAMES}
    generation = {key: recorded[key] for key in GENERATION_KEYS if key in recorded}
    layer: dict[str, Any] = {"sampling": sampling, "generation": generation}
    schedule = recorded.get("schedule") or []
    if not isinstance(schedule, list) or not all(isinstance(e, list) and len(e) == 2 for e in schedule):
        raise ConfigError(f"{where}: schedule must be a list of [from_token, temperature] pairs, got "
                          f"{_shown(schedule)}")
    if schedule:
        layer["schedule"] = [{"from_token": e[0], "temperature": e[1]} for e in schedule]
    unknown = sorted(set(recorded) - set(FIELD_NAMES) - set(GENERATION_KEYS) - set(DERIVED_KEYS))
    layers = [("default", {"sampling": {"do_sample": True}}), (where, layer)]
    if overrides:
        layers.append((COMMAND_LINE, overrides))
    return resolve(layers), unknown


def _finite(key: str, value: Any) -> Any:
    """Biases written as "-inf" (JSON has no infinity) back to numbers."""
    if key in ("logit_bias", "sequence_bias") and isinstance(value, dict):
        return {k: float(v) if v in ("-inf", "inf") else v for k, v in value.items()}
    return value


def recorded_forces(recorded: dict, where: str) -> list[tuple[int, int]]:
    """``[(step, token id)]`` from a recorded ``settings.force``."""
    out = []
    for i, entry in enumerate(recorded.get("force") or []):
        if not (isinstance(entry, dict) and _is(entry.get("step"), "int") and _is(entry.get("token_id"), "id")):
            raise ConfigError(f'{where}: field "settings.force[{i}]" must be an object with "step" and "token_id", '
                              f"got {_shown(entry)}")
        out.append((entry["step"], entry["token_id"]))
    return out

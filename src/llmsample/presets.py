"""TOML presets: finding them, reading and validating them, following ``extends``, writing new ones.

A preset file:

    description = "one line: what it is for"
    source = "where its numbers come from"   # optional; shown by `presets show`
    extends = "balanced"            # optional

    [sampling]                      # SamplingConfig fields
    temperature = 0.7

    [generation]                    # max_new_tokens, stop, seed, num_samples
    max_new_tokens = 256

    [constraint]                    # optional, one of: json_schema (a table or JSON text), grammar (GBNF or
    regex = "(yes|no)"              # Lark text), regex, choice (a list of texts)

    [[schedule]]                    # optional: temperature from a generated token on
    from_token = 64
    temperature = 0.6

Built-in presets ship inside the package; user presets live in ``$XDG_CONFIG_HOME/llmsample/presets`` and
override a built-in of the same name.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llmsample.config import (
    ALL_FIELDS,
    COMMAND_LINE,
    CONSTRAINT_FIELDS,
    DEFAULT_ORDER,
    FIELD_NAMES,
    FIELDS,
    GENERATION_FIELDS,
    SCHEDULE_FIELDS,
    Layer,
    Settings,
    resolve,
)
from llmsample.errors import ConfigError
from llmsample.model_defaults import MODEL_SOURCE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOP_LEVEL_KEYS = ("description", "source", "extends", "sampling", "constraint", "generation", "schedule")
SAMPLING_KEYS = tuple(name for name in FIELD_NAMES if name not in CONSTRAINT_FIELDS)
SECTION_KEYS = {"sampling": SAMPLING_KEYS, "constraint": CONSTRAINT_FIELDS, "generation": GENERATION_FIELDS}


def builtin_dir() -> Path:
    """The built-in presets: inside the installed package, or the checkout's ``presets/`` (editable install)."""
    packaged = Path(__file__).resolve().parent / "presets"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "presets"


def user_dir() -> Path:
    """``$XDG_CONFIG_HOME/llmsample/presets`` (default ``~/.config/llmsample/presets``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "llmsample" / "presets"


@dataclass(frozen=True)
class PresetFile:
    name: str
    path: Path
    origin: str  # "built-in", "user" or "file"
    overrides_builtin: bool = False

    @property
    def label(self) -> str:
        return f"preset {self.name}"


def available() -> dict[str, PresetFile]:
    """Every preset by name; a user preset replaces the built-in of the same name."""
    found: dict[str, PresetFile] = {}
    for path in sorted(builtin_dir().glob("*.toml")):
        found[path.stem] = PresetFile(path.stem, path, "built-in")
    folder = user_dir()
    if folder.is_dir():
        for path in sorted(folder.glob("*.toml")):
            found[path.stem] = PresetFile(path.stem, path, "user", overrides_builtin=path.stem in found)
    return found


def find(name_or_path: str) -> PresetFile:
    """A preset by name, or by path (anything with a slash or ending in ``.toml``)."""
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"preset file not found: {name_or_path}")
        return PresetFile(path.stem, path, "file")
    presets = available()
    if name_or_path in presets:
        return presets[name_or_path]
    hint = difflib.get_close_matches(name_or_path, list(presets), n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ConfigError(
        f"unknown preset {name_or_path!r}{suggestion}; available: {', '.join(sorted(presets))}"
    )


def _unknown_key(where: str, key: str, known: tuple[str, ...]) -> ConfigError:
    hint = difflib.get_close_matches(key, list(known), n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ConfigError(f"{where}: unknown key {key!r}{suggestion}")


def read(preset: PresetFile) -> dict[str, Any]:
    """Parse and check the shape of one file (values are checked when the layers are resolved)."""
    try:
        data = tomllib.loads(preset.path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {preset.path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{preset.path}: not valid UTF-8 at byte offset {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{preset.path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(f"{preset.path}: not valid TOML here: arrays or tables nested too deeply") from None
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise _unknown_key(str(preset.path), key, TOP_LEVEL_KEYS)
    for key in ("description", "source", "extends"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{preset.path}: {key} must be a string, got {data[key]!r}")
    for section, known in SECTION_KEYS.items():
        if section not in data:
            continue
        if not isinstance(data[section], dict):
            raise ConfigError(f"{preset.path}: [{section}] must be a table")
        for key in data[section]:
            if key not in known:
                raise _unknown_key(f"{preset.path}: [{section}]", key, known)
    schedule = data.get("schedule", [])
    if not isinstance(schedule, list) or not all(isinstance(e, dict) for e in schedule):
        raise ConfigError(f"{preset.path}: schedule must be an array of tables ([[schedule]])")
    for i, entry in enumerate(schedule):
        for key in entry:
            if key not in SCHEDULE_FIELDS:
                raise _unknown_key(f"{preset.path}: schedule[{i}]", key, SCHEDULE_FIELDS)
        missing = [k for k in SCHEDULE_FIELDS if k not in entry]
        if missing:
            raise ConfigError(f"{preset.path}: schedule[{i}] needs {' and '.join(missing)}")
    return data


def chain(name_or_path: str) -> list[tuple[PresetFile, dict[str, Any]]]:
    """The preset and everything it extends, base first. A cycle or an unknown base is an error."""
    preset = find(name_or_path)
    out: list[tuple[PresetFile, dict[str, Any]]] = []
    seen: list[str] = []
    while True:
        if str(preset.path) in seen:
            names = " -> ".join(Path(p).stem for p in [*seen, str(preset.path)])
            raise ConfigError(f"{preset.path}: extends makes a cycle: {names}")
        seen.append(str(preset.path))
        data = read(preset)
        out.append((preset, data))
        base = data.get("extends")
        if base is None:
            break
        try:
            preset = find(base)
        except ConfigError as exc:
            raise ConfigError(f"{preset.path}: extends: {exc}") from None
    return list(reversed(out))


def layers(name_or_path: Optional[str], model_sampling: Optional[dict] = None) -> tuple[list[Layer], set[str]]:
    """The built-in default layer, the model's own sampling values (if any), then the preset chain; and the labels
    of the layers that are the user's own (their user or file presets)."""
    out: list[Layer] = [("default", {"sampling": {"do_sample": True}})]
    if model_sampling:
        out.append((MODEL_SOURCE, {"sampling": dict(model_sampling)}))
    own = set()
    if name_or_path is not None:
        for preset, data in chain(name_or_path):
            layer = {k: data[k] for k in ("sampling", "generation", "schedule") if k in data}
            if "constraint" in data:  # the constraint's settings are sampling settings of the grammar stage
                layer["sampling"] = {**layer.get("sampling", {}), **data["constraint"]}
            out.append((preset.label, layer))
            if preset.origin != "built-in":
                own.add(preset.label)
    return out, own


def resolve_settings(name_or_path: Optional[str], command_line: Optional[dict] = None,
                     model_sampling: Optional[dict] = None) -> Settings:
    """Defaults ← the model's values (``model_defaults.sampling_defaults``) ← preset (after ``extends``) ← command
    line."""
    all_layers, own = layers(name_or_path, model_sampling)
    if command_line:
        all_layers.append((COMMAND_LINE, command_line))
    return resolve(all_layers, own | {COMMAND_LINE})


def description(name_or_path: str, key: str = "description") -> str:
    """The preset's one-line description (``presets list``), or with ``key="source"`` where its numbers come from."""
    return str(read(find(name_or_path)).get(key, ""))


# ---- writing ---------------------------------------------------------------------------------------------------

# What each key accepts, for the comments of ``presets new``: the sampling keys from the stage registry.
RANGES = {
    **{f.name: f.describe() for f in ALL_FIELDS},
    "do_sample": "true = sample, false = greedy",
    "order": "any of the stages, each at most once; a stage left out does not run; leave out for the default",
    "max_new_tokens": "integer >= 1",
    "stop": "strings; generation stops before the first one found",
    "seed": "integer >= 0; leave out for a fresh seed each run",
    "num_samples": "integer >= 1",
}


def _toml_value(value: Any) -> str:
    """One value as TOML, written by tomli_w (arrays and tables on one line, so that a comment can follow them)."""
    import tomli_w

    if isinstance(value, dict):
        pairs = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).partition(" = ")[2].rstrip("\n")


def _toml_key(key: Any) -> str:
    """A table key as TOML: a token-id sequence as "1,2,3", anything else as its text, quoted as needed."""
    import tomli_w

    text = ",".join(map(str, key)) if isinstance(key, tuple) else str(key)
    return tomli_w.dumps({text: 0}).partition(" = ")[0]


def render_new(name: str, settings: Settings, base: Optional[str]) -> str:
    """A commented preset file holding ``settings`` in full (values from ``base`` if given)."""
    origin = f"Started from the preset {base!r}." if base else "Started from the built-in defaults."
    lines = [
        f"# llmsample preset {name!r}. {origin}",
        "# Keys: see `man llmsample` (PRESETS). Delete a line to fall back to the default.",
        f"description = {_toml_value(f'{name}: describe what it is for')}",
        f"source = {_toml_value('where its numbers come from')}",
        "",
        "[sampling]",
    ]
    for field in SAMPLING_KEYS:
        value = getattr(settings.sampling, field)
        neutral = FIELDS[field].neutral
        if isinstance(value, (dict, tuple)) and (not value or value == neutral) and field != "order" or (
                field == "order" and value == DEFAULT_ORDER):
            lines.append(f"# {field} = {_toml_value(neutral)}  # {RANGES[field]}")  # the default, shown
        else:
            lines.append(f"{field} = {_toml_value(value)}  # {RANGES[field]}")
    lines += ["", "[constraint]  # at most one of these"]
    for field in CONSTRAINT_FIELDS:
        value = getattr(settings.sampling, field)
        shown = f"{field} = {_toml_value(value)}" if value else f"# {field} = {_toml_value(FIELDS[field].neutral)}"
        lines.append(f"{shown}  # {RANGES[field]}")
    lines += ["", "[generation]"]
    for field in GENERATION_FIELDS:
        value = getattr(settings.generation, field)
        if value is None:
            lines.append(f"# {field} =   # {RANGES[field]}")
        else:
            lines.append(f"{field} = {_toml_value(value)}  # {RANGES[field]}")
    for entry in settings.schedule:
        lines += ["", "[[schedule]]", f"from_token = {entry.from_token}", f"temperature = {entry.temperature!r}"]
    return "\n".join(lines) + "\n"


PRESET_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def write_new(name: str, base: Optional[str], force: bool) -> Path:
    """Write a new user preset; refuse to overwrite unless ``force``.

    The file is written beside the target and renamed over it: a symlink in its place is replaced, never written
    through.
    """
    if not PRESET_NAME.fullmatch(name):
        raise ConfigError(f"a preset name is 1 to 64 letters, digits, '-' or '_', like 'my-style', got {name!r}")
    settings = resolve_settings(base)
    target = user_dir() / f"{name}.toml"
    if os.path.lexists(target) and not force:
        raise ConfigError(f"{target} already exists (use --force to overwrite it)")
    partial = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(render_new(name, settings, base))
        os.replace(partial, target)
    except OSError as exc:
        if partial is not None:
            with contextlib.suppress(OSError):
                os.unlink(partial)
        raise ConfigError(f"cannot write the preset {target}: {exc.strerror or exc}") from None
    return target


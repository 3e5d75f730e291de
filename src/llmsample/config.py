"""Sampling settings: one frozen dataclass, validated on construction.

Field names follow transformers' ``GenerationConfig`` so that settings read the same in both worlds.
This module imports nothing heavy: the CLI validates flags with it before torch is loaded.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Optional, Union

from llmsample.errors import ConfigError

# The stages a chain can hold, by name. "penalties" is repetition, then frequency and presence penalties.
STAGES: tuple[str, ...] = (
    "penalties",
    "no_repeat_ngram",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "temperature",
)

# The seeds' order and llama.cpp's: truncation judges the model's own distribution, temperature only reshapes
# what survives.
DEFAULT_ORDER: tuple[str, ...] = STAGES

# transformers' order (GenerationMixin._get_logits_processor): processors, then temperature first among warpers.
HF_ORDER: tuple[str, ...] = (
    "penalties",
    "no_repeat_ngram",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
)

ORDER_ALIASES: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_ORDER,
    "llmsample": DEFAULT_ORDER,
    "seeds": DEFAULT_ORDER,
    "hf": HF_ORDER,
    "transformers": HF_ORDER,
}

STAGE_ALIASES: dict[str, str] = {
    "penalty": "penalties",
    "repetition_penalty": "penalties",
    "frequency_penalty": "penalties",
    "presence_penalty": "penalties",
    "no_repeat_ngram_size": "no_repeat_ngram",
    "ngram": "no_repeat_ngram",
    "temp": "temperature",
    "typical": "typical_p",
}

# The stages that still run in greedy and beam search: they change which token is best. Truncation and
# temperature never change the argmax (typical_p could, so it is left out as transformers leaves it out).
DETERMINISTIC_STAGES: frozenset[str] = frozenset({"penalties", "no_repeat_ngram"})


def parse_order(value: Union[str, Iterable[str], None]) -> tuple[str, ...]:
    """Normalise an order given as an alias, a comma-separated string or a sequence of names.

    >>> parse_order("top_k, top-p,temp")
    ('top_k', 'top_p', 'temperature')
    >>> parse_order("hf")[:3]
    ('penalties', 'no_repeat_ngram', 'temperature')
    """
    if value is None:
        return DEFAULT_ORDER
    if isinstance(value, str):
        key = value.strip().lower()
        if key in ORDER_ALIASES:
            return ORDER_ALIASES[key]
        names: list[str] = [part for part in (p.strip() for p in value.split(",")) if part]
    else:
        try:
            names = list(value)
        except TypeError:
            raise ConfigError(f"order must be a list of stage names, got {value!r}") from None
    resolved: list[str] = []
    for raw in names:
        if not isinstance(raw, str):
            raise ConfigError(f"order must contain stage names, got {raw!r}")
        name = raw.strip().lower().replace("-", "_")
        name = STAGE_ALIASES.get(name, name)
        if name not in STAGES:
            hint = difflib.get_close_matches(name, list(STAGES) + list(STAGE_ALIASES), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"order has an unknown stage {raw!r}{suggestion}; known stages: {', '.join(STAGES)}"
            )
        if name in resolved:
            raise ConfigError(f"order names the stage {name!r} twice")
        resolved.append(name)
    return tuple(resolved)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ConfigError(f"{name} must be a number, got nan")
    return value


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _in_range(name: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    number = _number(name, value)
    below = number <= lo if lo_open else number < lo
    above = number >= hi if hi_open else number > hi
    if below or above:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        shown = "inf" if hi == math.inf else f"{hi:g}"
        raise ConfigError(f"{name} must be in {left}{lo:g}, {shown}{right}, got {value!r}")
    return number


@dataclass(frozen=True)
class SamplingConfig:
    """How one next token is chosen. Neutral values switch a stage off.

    >>> SamplingConfig(do_sample=True, temperature=0.7, top_p=0.9).top_p
    0.9
    >>> SamplingConfig(top_p=1.5)
    Traceback (most recent call last):
    ...
    llmsample.errors.ConfigError: top_p must be in (0, 1], got 1.5
    """

    do_sample: bool = False  # False = greedy (argmax after the penalties)
    temperature: float = 1.0  # 1.0 = off; 0 = keep only the top token
    top_k: int = 0  # 0 = off (transformers defaults to 50; we truncate nothing unless asked)
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    typical_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    frequency_penalty: float = 0.0  # 0.0 = off
    presence_penalty: float = 0.0  # 0.0 = off
    no_repeat_ngram_size: int = 0  # 0 = off
    num_beams: int = 1  # 1 = no beam search
    length_penalty: float = 1.0  # beam search only
    early_stopping: Union[bool, str] = False  # beam search only: True, False or "never"
    order: tuple[str, ...] = field(default=DEFAULT_ORDER)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"do_sample must be true or false, got {self.do_sample!r}")
        set_(self, "temperature", _in_range("temperature", self.temperature, 0, math.inf, False, True))
        set_(self, "top_k", _integer("top_k", self.top_k, 0))
        set_(self, "top_p", _in_range("top_p", self.top_p, 0, 1, True, False))
        set_(self, "min_p", _in_range("min_p", self.min_p, 0, 1, False, False))
        set_(self, "typical_p", _in_range("typical_p", self.typical_p, 0, 1, True, False))
        set_(
            self,
            "repetition_penalty",
            _in_range("repetition_penalty", self.repetition_penalty, 0, math.inf, True, True),
        )
        for name in ("frequency_penalty", "presence_penalty"):
            set_(self, name, _in_range(name, getattr(self, name), -2, 2, False, False))
        set_(self, "no_repeat_ngram_size", _integer("no_repeat_ngram_size", self.no_repeat_ngram_size, 0))
        set_(self, "num_beams", _integer("num_beams", self.num_beams, 1))
        length_penalty = _number("length_penalty", self.length_penalty)
        if math.isinf(length_penalty):
            raise ConfigError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        set_(self, "length_penalty", length_penalty)
        if self.early_stopping not in (True, False, "never"):
            raise ConfigError(f"early_stopping must be true, false or \"never\", got {self.early_stopping!r}")
        set_(self, "order", parse_order(self.order))
        if self.num_beams > 1 and self.do_sample:
            raise ConfigError(
                f"num_beams={self.num_beams} needs do_sample=false: beam search is deterministic "
                "(use num_beams=1 to sample)"
            )

    # ---- what is active -------------------------------------------------------------------------------------

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (no draw)."""
        return not self.do_sample or self.temperature == 0.0

    def stage_is_set(self, name: str) -> bool:
        """Whether the settings of stage ``name`` differ from its neutral value."""
        if name == "penalties":
            return (
                self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
            )
        if name == "no_repeat_ngram":
            return self.no_repeat_ngram_size > 0
        if name == "top_k":
            return self.top_k > 0
        if name == "top_p":
            return self.top_p < 1.0
        if name == "min_p":
            return self.min_p > 0.0
        if name == "typical_p":
            return self.typical_p < 1.0
        if name == "temperature":
            return self.temperature != 1.0
        raise KeyError(name)

    def active_stages(self) -> tuple[str, ...]:
        """The stages that run, in chain order.

        Greedy decoding (``do_sample=False``) and beam search keep only the stages that can change the best
        token (penalties, no-repeat-ngram), as transformers does. Sampling with temperature 0 keeps the whole
        chain and temperature keeps only the top token.
        """
        deterministic = not self.do_sample or self.num_beams > 1
        return tuple(
            name
            for name in self.order
            if self.stage_is_set(name) and (not deterministic or name in DETERMINISTIC_STAGES)
        )

    def inactive_settings(self) -> list[tuple[str, str]]:
        """Settings that are set but have no effect, with the reason: ``[(field, why), …]``."""
        notes: list[tuple[str, str]] = []
        deterministic = not self.do_sample or self.num_beams > 1
        mode = "beam search" if self.num_beams > 1 else "greedy decoding"
        stage_fields = {
            "penalties": ("repetition_penalty", "frequency_penalty", "presence_penalty"),
            "no_repeat_ngram": ("no_repeat_ngram_size",),
            "top_k": ("top_k",),
            "top_p": ("top_p",),
            "min_p": ("min_p",),
            "typical_p": ("typical_p",),
            "temperature": ("temperature",),
        }
        neutral = SamplingConfig.__dataclass_fields__
        for stage, names in stage_fields.items():
            if not self.stage_is_set(stage):
                continue
            set_names = [n for n in names if getattr(self, n) != neutral[n].default]
            if stage not in self.order:
                notes.extend((n, f"the stage {stage!r} is not in order") for n in set_names)
            elif deterministic and stage not in DETERMINISTIC_STAGES:
                notes.extend((n, f"no effect with {mode}") for n in set_names)
        if self.num_beams == 1:
            if self.length_penalty != 1.0:
                notes.append(("length_penalty", "applies to beam search only (num_beams > 1)"))
            if self.early_stopping is not False:
                notes.append(("early_stopping", "applies to beam search only (num_beams > 1)"))
        return notes

    def describe_chain(self) -> str:
        """The chain in order, e.g. ``logits -> penalties -> top_k -> top_p -> temperature -> dist``."""
        if self.num_beams > 1:
            selector = f"beam({self.num_beams})"
        else:
            selector = "greedy" if self.greedy else "dist"
        return " -> ".join(("logits", *self.active_stages(), selector))

    def replace(self, **changes: Any) -> "SamplingConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready settings."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["order"] = list(self.order)
        return out


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(SamplingConfig))


# ---- generation settings, schedule, and the one resolve ---------------------------------------------------------

GENERATION_FIELDS = ("max_new_tokens", "stop", "seed", "num_samples")
MAX_SEED = 2**64 - 1
SCHEDULE_FIELDS = ("from_token", "temperature")


@dataclass(frozen=True)
class GenerationSettings:
    """What to generate, apart from how each token is chosen."""

    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None  # None = a fresh random seed, reported with the output
    num_samples: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_new_tokens", _integer("max_new_tokens", self.max_new_tokens, 1))
        object.__setattr__(self, "num_samples", _integer("num_samples", self.num_samples, 1))
        if self.seed is not None:
            object.__setattr__(self, "seed", _integer("seed", self.seed, 0))
            if self.seed > MAX_SEED:  # torch.Generator takes 64 bits
                raise ConfigError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed}")
        stop = self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ConfigError(f"stop must be a list of strings, got {stop!r}")
        if any(s == "" for s in stop):
            raise ConfigError("stop must not contain an empty string")
        object.__setattr__(self, "stop", tuple(stop))


@dataclass(frozen=True)
class ScheduleEntry:
    """From generated token ``from_token`` on (0 = the first), sample with ``temperature``."""

    from_token: int
    temperature: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "from_token", _integer("from_token", self.from_token, 0))
        object.__setattr__(
            self, "temperature", _in_range("temperature", self.temperature, 0, math.inf, False, True)
        )


def temperature_at(schedule: tuple[ScheduleEntry, ...], index: int) -> Optional[float]:
    """The scheduled temperature for generated token ``index``, or None before the first entry.

    >>> temperature_at((ScheduleEntry(0, 1.0), ScheduleEntry(64, 0.6)), 63), temperature_at((ScheduleEntry(0, 1.0), ScheduleEntry(64, 0.6)), 64)
    (1.0, 0.6)
    """
    value = None
    for entry in schedule:
        if entry.from_token <= index:
            value = entry.temperature
    return value


@dataclass(frozen=True)
class Settings:
    """Everything a run needs, resolved, with where each value came from."""

    sampling: SamplingConfig
    generation: GenerationSettings
    schedule: tuple[ScheduleEntry, ...]
    sources: dict[str, str]  # "sampling.top_p" → "default" | "preset NAME (PATH)" | "command line"

    def inactive(self) -> list[tuple[str, str]]:
        """``[(key, why)]`` for settings that are set but have no effect."""
        notes = [(f"sampling.{name}", why) for name, why in self.sampling.inactive_settings()]
        if self.schedule and (not self.sampling.do_sample or self.sampling.num_beams > 1):
            notes.append(("schedule", "a temperature schedule has no effect without sampling"))
        elif self.schedule and "temperature" not in self.sampling.order:
            notes.append(("schedule", "the stage 'temperature' is not in order"))
        return notes

    def rows(self) -> list[tuple[str, object, str]]:
        """``(key, value, source)`` for every setting, in a stable order."""
        out: list[tuple[str, object, str]] = []
        for name in FIELD_NAMES:
            value = getattr(self.sampling, name)
            out.append((f"sampling.{name}", list(value) if name == "order" else value, self.sources[f"sampling.{name}"]))
        for name in GENERATION_FIELDS:
            value = getattr(self.generation, name)
            out.append((f"generation.{name}", list(value) if name == "stop" else value,
                        self.sources[f"generation.{name}"]))
        out.append(("schedule", [(e.from_token, e.temperature) for e in self.schedule], self.sources["schedule"]))
        return out


Layer = tuple[str, dict]  # (source label, {"sampling": {...}, "generation": {...}, "schedule": [...]})


COMMAND_LINE = "command line"


def _check_each(source: str, table: str, values: dict, build: Any) -> None:
    """Validate each key on its own so the message names the layer and the key (the flag, on the command line)."""
    for key, value in values.items():
        try:
            build(**{key: value})
        except ConfigError as exc:
            message = str(exc)
            if source == COMMAND_LINE:
                flag = "--" + key.replace("_", "-")
                raise ConfigError(flag + message[len(key):] if message.startswith(key) else message) from None
            raise ConfigError(f"{source}: {table}.{message}") from None


def resolve(layers: Iterable[Layer]) -> Settings:
    """Merge layers, lowest precedence first (defaults ← preset chain ← command line), into validated settings.

    >>> s = resolve([("default", {"sampling": {"do_sample": True}}), (COMMAND_LINE, {"sampling": {"top_p": 0.9}})])
    >>> s.sampling.top_p, s.sources["sampling.top_p"], s.sources["sampling.top_k"]
    (0.9, 'command line', 'default')
    """
    sampling: dict[str, Any] = {}
    generation: dict[str, Any] = {}
    schedule: list[ScheduleEntry] = []
    sources = {f"sampling.{n}": "default" for n in FIELD_NAMES}
    sources.update({f"generation.{n}": "default" for n in GENERATION_FIELDS})
    sources["schedule"] = "default"
    last_mode_source = "default"
    for source, layer in layers:
        layer_sampling = dict(layer.get("sampling", {}))
        layer_generation = dict(layer.get("generation", {}))
        _check_each(source, "sampling", layer_sampling, SamplingConfig)
        _check_each(source, "generation", layer_generation, GenerationSettings)
        for key, value in layer_sampling.items():
            sampling[key] = value
            sources[f"sampling.{key}"] = source
            if key in ("num_beams", "do_sample"):
                last_mode_source = source
        for key, value in layer_generation.items():
            generation[key] = value
            sources[f"generation.{key}"] = source
        if "schedule" in layer:
            entries = []
            for i, entry in enumerate(layer["schedule"]):
                try:
                    entries.append(ScheduleEntry(**entry))
                except ConfigError as exc:
                    raise ConfigError(f"{source}: schedule[{i}].{exc}") from None
            starts = [e.from_token for e in entries]
            if len(set(starts)) != len(starts):
                raise ConfigError(f"{source}: schedule has two entries with the same from_token")
            schedule = sorted(entries, key=lambda e: e.from_token)
            sources["schedule"] = source
        elif "temperature" in layer_sampling and schedule:
            # A later layer that sets the temperature outright replaces a schedule from below it.
            schedule = []
            sources["schedule"] = source
    try:
        cfg = SamplingConfig(**sampling)
    except ConfigError as exc:
        raise ConfigError(str(exc) if last_mode_source == COMMAND_LINE else f"{last_mode_source}: {exc}") from None
    return Settings(cfg, GenerationSettings(**generation), tuple(schedule), sources)

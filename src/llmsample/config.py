"""Sampling settings: one frozen dataclass, validated on construction.

Field names follow transformers' ``GenerationConfig`` so that settings read the same in both worlds.
This module imports nothing heavy: the CLI validates flags with it before torch is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, make_dataclass, replace
from typing import Any, Callable, Iterable, Optional

from llmsample.errors import ConfigError

from llmsample.sampling.registry import (  # noqa: F401 (re-exported: the names scripts and tests use)
    ALL_FIELDS,
    CHAIN_STAGES,
    DEFAULT_ORDER,
    FIELDS,
    FIELD_STAGE,
    HF_ORDER,
    ORDER_ALIASES,
    SELECTOR,
    STAGE_ALIASES,
    STAGE_SPECS,
    STAGES,
    TOKEN_TEXT_FIELDS,
    active_stages,
    parse_order,
)

# The settings of the constraint stage: at most one is set, and a layer that sets one replaces a lower layer's.
CONSTRAINT_FIELDS: tuple[str, ...] = tuple(f.name for f in STAGES["grammar"].fields)

# The stages a chain can hold, in the default order.
STAGE_NAMES: tuple[str, ...] = CHAIN_STAGES


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _in_range(name: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise ConfigError(f"{name} must be a number, got nan")
    below = number <= lo if lo_open else number < lo
    above = number >= hi if hi_open else number > hi
    if below or above:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        shown = "inf" if hi == math.inf else f"{hi:g}"
        raise ConfigError(f"{name} must be in {left}{lo:g}, {shown}{right}, got {value!r}")
    return number


class _SamplingConfigMethods:
    """What a ``SamplingConfig`` can say about itself; its fields come from the stage registry."""

    def __post_init__(self) -> None:
        for spec in ALL_FIELDS:
            object.__setattr__(self, spec.name, spec.validate(getattr(self, spec.name)))
        for stage in STAGE_SPECS:
            if stage.check is not None:
                stage.check(self)
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

    @property
    def deterministic(self) -> bool:
        """Greedy decoding or beam search: only the stages that can change the best token run."""
        return not self.do_sample or self.num_beams > 1

    def stage_is_set(self, name: str) -> bool:
        """Whether the settings of stage ``name`` differ from its neutral value."""
        return STAGES[name].is_set(self)

    def active_stages(self) -> tuple[str, ...]:
        """The stages that run, in chain order (see ``registry.active_stages``)."""
        return active_stages(self)

    def inactive_settings(self) -> list[tuple[str, str]]:
        """Settings that are set but have no effect, with the reason: ``[(field, why), …]``."""
        notes: list[tuple[str, str]] = []
        mode = "beam search" if self.num_beams > 1 else "greedy decoding"
        for spec in STAGE_SPECS:
            set_names = [f.name for f in spec.fields if getattr(self, f.name) != f.neutral]
            if not set_names:
                continue
            if not spec.is_set(self):
                notes.extend((n, f"no effect while the stage {spec.name!r} is off") for n in set_names)
            elif spec.kind != SELECTOR and spec.name not in self.order:
                notes.extend((n, f"the stage {spec.name!r} is not in order") for n in set_names)
            elif self.deterministic and not spec.deterministic:
                notes.extend((n, f"no effect with {mode}") for n in set_names)
            elif spec.kind == SELECTOR and self.greedy:
                notes.extend((n, "no effect at temperature 0") for n in set_names)
        if self.num_beams == 1:
            if self.length_penalty != 1.0:
                notes.append(("length_penalty", "applies to beam search only (num_beams > 1)"))
            if self.early_stopping is not False:
                notes.append(("early_stopping", "applies to beam search only (num_beams > 1)"))
        return notes

    def describe_chain(self) -> str:
        """The chain in order, e.g. ``logits -> penalties -> top_k -> top_p -> temperature -> dist``."""
        stages = self.active_stages()
        if self.num_beams > 1:
            selector = f"beam({self.num_beams})"
        elif stages and stages[-1] == "mirostat":
            stages, selector = stages[:-1], f"mirostat(v{self.mirostat})"
        else:
            selector = "greedy" if self.greedy else "dist"
        return " -> ".join(("logits", *stages, selector))

    def replace(self, **changes: Any) -> "SamplingConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready settings (token sequences as lists, sequence-bias keys as "1,2,3")."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    def needs_tokenizer(self) -> bool:
        """True while a setting still holds text that only the model's tokenizer can turn into ids."""
        breakers = self.dry_sequence_breakers if STAGES["dry"].is_set(self) else ()
        return any(isinstance(x, str) for x in (*self.logit_bias, *self.bad_words_ids, *breakers))

    def tokenized(self, encode: Callable[[str], list[int]], vocab_size: Optional[int] = None) -> "SamplingConfig":
        """A copy whose texts (logit-bias tokens, bans, DRY breakers) are token ids, checked against the vocab.

        ``encode(text)`` returns the text's ids without special tokens.

        >>> cfg = SamplingConfig(logit_bias={"b": -1.0}, bad_words_ids=("ab",), dry_sequence_breakers=("\\n",))
        >>> done = cfg.tokenized(lambda text: [ord(ch) for ch in text], 128)
        >>> done.logit_bias, done.bad_words_ids, done.dry_sequence_breakers
        ({98: -1.0}, ((97, 98),), ((10,),))
        """
        def ids_of(text: str, what: str) -> tuple[int, ...]:
            ids = tuple(int(i) for i in encode(text))
            if not ids:
                raise ConfigError(f"{what} {text!r} is no token at all for this model's tokenizer")
            return ids

        def check(ids: Iterable[int], what: str) -> None:
            for i in ids:
                if vocab_size is not None and i >= vocab_size:
                    raise ConfigError(f"{what}: token id {i} is beyond the vocabulary (ids 0..{vocab_size - 1})")

        bias: dict[int, float] = {}
        for token, value in self.logit_bias.items():
            if isinstance(token, str):
                ids = ids_of(token, "--logit-bias")
                if len(ids) != 1:
                    raise ConfigError(f"--logit-bias {token!r} is {len(ids)} tokens {list(ids)}: give one token "
                                      "(or its id; --ban bans a sequence)")
                token = ids[0]
            check([token], "logit_bias")
            bias[token] = value
        bans = tuple(ids_of(x, "--ban") if isinstance(x, str) else x for x in self.bad_words_ids)
        breakers = tuple(ids_of(x, "a DRY sequence breaker") if isinstance(x, str) else x
                         for x in self.dry_sequence_breakers)
        for ids in (*bans, *breakers, *self.sequence_bias):
            check(ids, "bad_words_ids, sequence_bias or dry_sequence_breakers")
        return self.replace(logit_bias=bias, bad_words_ids=bans, dry_sequence_breakers=breakers)


def _plain(value: Any) -> Any:
    """JSON-ready: sequence-bias keys as "1,2,3", ±inf biases as "-inf" (JSON has no infinity)."""
    if isinstance(value, dict):
        return {(",".join(map(str, k)) if isinstance(k, tuple) else k): _plain(v) for k, v in value.items()}
    if isinstance(value, float) and math.isinf(value):
        return "-inf" if value < 0 else "inf"
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _dataclass_field(spec: Any) -> Any:
    if isinstance(spec.neutral, (dict, list)):
        return field(default_factory=lambda neutral=spec.neutral: type(neutral)(neutral))
    return field(default=spec.neutral)


SamplingConfig = make_dataclass(
    "SamplingConfig",
    [(spec.name, Any, _dataclass_field(spec)) for spec in ALL_FIELDS],
    bases=(_SamplingConfigMethods,),
    frozen=True,
    namespace={"__module__": __name__, "__hash__": None},
)
SamplingConfig.__doc__ = """How one next token is chosen. Neutral values switch a stage off.

    Its fields are declared in ``llmsample.sampling.registry`` (names follow transformers' ``GenerationConfig``
    and llama.cpp where transformers has no such setting); each is validated on construction.

    >>> SamplingConfig(do_sample=True, temperature=0.7, top_p=0.9).top_p
    0.9
    >>> SamplingConfig(top_p=1.5)
    Traceback (most recent call last):
    ...
    llmsample.errors.ConfigError: top_p must be in (0, 1], got 1.5
    """


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
    sources: dict[str, str]  # "sampling.top_p" → "default" | "model" | "preset NAME" | "command line"
    # The sources that are the user's own choices (the command line, their own presets): a value from one of them
    # that has no effect is warned about; one from the defaults, the model or a built-in preset is only shown.
    own_sources: frozenset = frozenset({"command line"})

    def inactive(self) -> list[tuple[str, str]]:
        """``[(key, why)]`` for settings that are set but have no effect."""
        notes = [(f"sampling.{name}", why) for name, why in self.sampling.inactive_settings()]
        if self.schedule and (not self.sampling.do_sample or self.sampling.num_beams > 1):
            notes.append(("schedule", "a temperature schedule has no effect without sampling"))
        elif self.schedule and "temperature" not in self.sampling.order:
            notes.append(("schedule", "the stage 'temperature' is not in order"))
        return notes

    def warnings(self) -> list[tuple[str, str]]:
        """The inactive settings the user chose (see ``own_sources``): ``[(key, why)]``."""
        return [(key, why) for key, why in self.inactive() if self.sources[key] in self.own_sources]

    def rows(self) -> list[tuple[str, object, str]]:
        """``(key, value, source)`` for every setting, in a stable order."""
        out: list[tuple[str, object, str]] = []
        for name in FIELD_NAMES:
            value = getattr(self.sampling, name)
            out.append((f"sampling.{name}", _plain(value), self.sources[f"sampling.{name}"]))
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
                flag = FIELDS[key].flag if key in FIELDS else "--" + key.replace("_", "-")
                raise ConfigError(flag + message[len(key):] if message.startswith(key) else message) from None
            raise ConfigError(f"{source}: {table}.{message}") from None


def resolve(layers: Iterable[Layer], own_sources: Iterable[str] = (COMMAND_LINE,)) -> Settings:
    """Merge layers, lowest precedence first (defaults ← model ← preset chain ← command line), into validated
    settings. ``own_sources``: the layers that are the user's own choices (their inactive values are warned about).

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
    mode_rank = {"do_sample": -1, "num_beams": -1}  # the layer that last set each
    for rank, (source, layer) in enumerate(layers):
        layer_sampling = dict(layer.get("sampling", {}))
        layer_generation = dict(layer.get("generation", {}))
        _check_each(source, "sampling", layer_sampling, SamplingConfig)
        _check_each(source, "generation", layer_generation, GenerationSettings)
        if any(layer_sampling.get(key) for key in CONSTRAINT_FIELDS):
            try:  # two constraints in one layer are an error; a layer's constraint replaces a lower layer's
                SamplingConfig(**{key: layer_sampling[key] for key in CONSTRAINT_FIELDS if key in layer_sampling})
            except ConfigError as exc:
                raise ConfigError(str(exc) if source == COMMAND_LINE else f"{source}: {exc}") from None
            for key in CONSTRAINT_FIELDS:
                if key not in layer_sampling:
                    sampling.pop(key, None)
                    sources[f"sampling.{key}"] = "default"
        for key, value in layer_sampling.items():
            sampling[key] = value
            sources[f"sampling.{key}"] = source
            if key in mode_rank:
                last_mode_source = source
                mode_rank[key] = rank
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
    # Beams mean deterministic search, wherever num_beams came from: a layer that sets num_beams > 1 turns
    # sampling off unless the same layer or a later one asks for sampling outright (then it is an error).
    if sampling.get("num_beams", 1) > 1 and mode_rank["do_sample"] < mode_rank["num_beams"]:
        sampling["do_sample"] = False
        sources["sampling.do_sample"] = sources["sampling.num_beams"]
    try:
        cfg = SamplingConfig(**sampling)
    except ConfigError as exc:
        raise ConfigError(str(exc) if last_mode_source == COMMAND_LINE else f"{last_mode_source}: {exc}") from None
    return Settings(cfg, GenerationSettings(**generation), tuple(schedule), sources, frozenset(own_sources))

"""Every sampling stage and setting, declared once.

A stage's entry holds its name and aliases, its fields (neutral value, valid range, CLI flag and help), its table
header, its kind and its place in the default order and in transformers' order. ``config`` builds
``SamplingConfig`` from these entries; ``presets`` takes its keys and range notes from them; the CLI makes its
options from them; ``render`` takes the column headers; the man page's option list is checked against them; the
sampler imports each stage's implementation from the module the entry names.

This module imports no torch: ``--help`` and settings validation run before torch is loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from llmsample.errors import ConfigError

# Stage kinds. Penalties and biases can change which token is best, so they also run in greedy decoding and beam
# search; truncation and reshaping only matter to a draw; a selector replaces the draw.
# A constraint (a JSON schema, a grammar) decides which tokens are valid at all, so it runs in every mode too.
BIAS, PENALTY, TRUNCATION, RESHAPE, SELECTOR = "bias", "penalty", "truncation", "reshape", "selector"
CONSTRAINT = "constraint"
DETERMINISTIC_KINDS = frozenset({BIAS, PENALTY, CONSTRAINT})
# A truncation keeps at least a row's best token and a reshape (temperature) keeps a finite logit finite, so a
# chain of only these cannot leave a row with a finite logit empty; a bias (a ban), a penalty (one that overflows)
# or a selector can, and the sampler then keeps the row's best raw token.
KEEP_A_TOKEN_KINDS = frozenset({TRUNCATION, RESHAPE})
# Field kinds that hold a constraint's text; llmsample.grammar checks them (llguidance, no torch).
CONSTRAINT_KINDS = ("json_schema", "grammar", "regex", "choices")


# ---- fields ----------------------------------------------------------------------------------------------------


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ConfigError(f"{name} must be a number, got nan")
    return value


def _token_key(name: str, key: Any) -> Any:
    """A token given by id (int, or a TOML key of digits) or by text (str); text is tokenised later."""
    if isinstance(key, bool):
        raise ConfigError(f"{name} keys must be token ids or texts, got {key!r}")
    if isinstance(key, int):
        if key < 0:
            raise ConfigError(f"{name} token ids must be >= 0, got {key}")
        return key
    if isinstance(key, str):
        if key.strip().isdigit():
            return int(key)
        if key == "":
            raise ConfigError(f"{name} has an empty token text")
        return key
    raise ConfigError(f"{name} keys must be token ids or texts, got {key!r}")


def _bias(name: str, key: Any, value: Any) -> float:
    """A bias: any finite number, or −inf to remove the token (+inf would make it the only choice by accident)."""
    bias = _number(f"{name}[{key!r}]", value)
    if math.isinf(bias) and bias > 0:
        raise ConfigError(f"{name}[{key!r}] must be finite or -inf, got {bias}")
    return bias


def _id_sequence(name: str, value: Any, allow_text: bool) -> Any:
    """A tuple of token ids (or, where allowed, a text to tokenise later)."""
    if isinstance(value, str):
        if not allow_text:
            raise ConfigError(f"{name} entries must be lists of token ids, got {value!r}")
        if value == "":
            raise ConfigError(f"{name} has an empty text")
        return value
    if isinstance(value, (list, tuple)) and value:
        ids = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise ConfigError(f"{name} entries must be lists of token ids >= 0, got {list(value)!r}")
            ids.append(int(item))
        return tuple(ids)
    raise ConfigError(f"{name} entries must be non-empty lists of token ids, got {value!r}")


def _constraint(field: "Field", value: Any) -> Any:
    """A constraint's text in its canonical form ('' or () = none), checked by llguidance."""
    name = field.name
    if field.kind == "choices":
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
                isinstance(v, str) and v for v in value):
            raise ConfigError(f"{name} must be a list of non-empty texts, got {value!r}")
        value = tuple(value)
    elif field.kind == "json_schema" and isinstance(value, (dict, bool)):
        value = json.dumps(value, ensure_ascii=False)  # a TOML table or the Python API's dict
    elif not isinstance(value, str):
        raise ConfigError(f"{name} must be {field.range_text()} (text), got {value!r}")
    if value:
        from llmsample import grammar

        grammar.check(name, value)
    return value


@dataclass(frozen=True)
class Field:
    """One setting: its neutral value, its valid values, and how a person gives it.

    ``kind``: "float", "int", "bool", "choice", "token_bias" ({token: bias}), "sequence_bias"
    ({(ids…): bias}), "sequences" (a list of id lists or texts), "order", "early_stopping".
    Ranges: ``lo``/``hi`` with ``lo_open``/``hi_open`` for numbers (``hi`` None = unbounded), ``choices``.
    """

    name: str
    neutral: Any
    kind: str
    help: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    off: str = ""  # what the neutral value means, e.g. "0 = off"
    flags: tuple[str, ...] = ()  # CLI spellings; () = "--" + name with dashes
    metavar: Optional[str] = None
    cli: bool = True  # False: presets and the Python API only
    note: str = ""  # for presets new / man page, after the range

    @property
    def flag(self) -> str:
        return self.flags[0] if self.flags else "--" + self.name.replace("_", "-")

    @property
    def all_flags(self) -> tuple[str, ...]:
        return self.flags or (self.flag,)

    def range_text(self) -> str:
        """The valid values in words, e.g. ``(0, 1]`` or ``integer >= 0``."""
        if self.kind in ("float", "int"):
            if self.lo is not None and self.hi is not None:
                left = "(" if self.lo_open else "["
                right = ")" if self.hi_open else "]"
                text = f"{left}{self.lo:g}, {self.hi:g}{right}"
            elif self.lo is not None:
                text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
            elif self.hi is not None:
                text = f"{'<' if self.hi_open else '<='} {self.hi:g}"
            else:
                text = "a finite number" if self.kind == "float" else "any integer"
            return ("integer " if self.kind == "int" and (self.lo is not None or self.hi is not None) else "") + text
        if self.kind == "choice":
            return " or ".join(str(c) for c in self.choices)
        if self.kind == "bool":
            return "true or false"
        return {
            "token_bias": "{token id or text: bias}",
            "sequence_bias": "{[token ids]: bias}",
            "sequences": "lists of token ids, or texts",
            "early_stopping": 'true, false or "never"',
            "order": "stage names, each at most once",
            "json_schema": "a JSON schema",
            "grammar": "a GBNF or Lark grammar",
            "regex": "a regular expression",
            "choices": "texts",
        }.get(self.kind, "")

    def describe(self) -> str:
        """Range and neutral meaning for help texts and preset comments."""
        parts = [p for p in (self.range_text(), self.off, self.note) if p]
        return "; ".join(parts)

    def validate(self, value: Any) -> Any:
        """The value in its canonical form, or ``ConfigError`` naming the field, the value and the range."""
        name = self.name
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}")
            return value
        if self.kind in ("float", "int"):
            if self.kind == "int":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"{name} must be an {self.range_text()}, got {value!r}")
                number: float = int(value)
                if self.lo is not None or self.hi is not None:
                    ok = (self.lo is None or number >= self.lo) and (self.hi is None or number <= self.hi)
                    if not ok:
                        raise ConfigError(f"{name} must be an {self.range_text()}, got {value!r}")
                return int(number)
            number = _number(name, value)
            if math.isinf(number):
                raise ConfigError(f"{name} must be in {self._interval()}, got {value!r}"
                                  if self.lo is not None or self.hi is not None
                                  else f"{name} must be a finite number, got {value!r}")
            below = self.lo is not None and (number <= self.lo if self.lo_open else number < self.lo)
            above = self.hi is not None and (number >= self.hi if self.hi_open else number > self.hi)
            if below or above:
                raise ConfigError(f"{name} must be in {self._interval()}, got {value!r}")
            return number
        if self.kind == "choice":
            if isinstance(value, bool) or value not in self.choices:
                raise ConfigError(f"{name} must be {self.range_text()}, got {value!r}")
            return value
        if self.kind == "early_stopping":
            if value not in (True, False, "never"):
                raise ConfigError(f"{name} must be true, false or \"never\", got {value!r}")
            return value
        if self.kind == "token_bias":
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a table of token: bias, got {value!r}")
            return {_token_key(name, key): _bias(name, key, bias) for key, bias in value.items()}
        if self.kind == "sequence_bias":
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a table of token-id sequence: bias, got {value!r}")
            out = {}
            for key, bias in value.items():
                if isinstance(key, str):  # a TOML key: "1,2,3"
                    try:
                        key = tuple(int(part) for part in key.split(","))
                    except ValueError:
                        raise ConfigError(f"{name} keys are comma-separated token ids, got {key!r}") from None
                out[_id_sequence(name, key, allow_text=False)] = _bias(name, key, bias)
            return out
        if self.kind == "sequences":
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"{name} must be a list, got {value!r}")
            return tuple(_id_sequence(name, item, allow_text=True) for item in value)
        if self.kind == "order":
            return parse_order(value)
        if self.kind in CONSTRAINT_KINDS:
            return _constraint(self, value)
        raise AssertionError(self.kind)

    def _interval(self) -> str:
        left = "(" if self.lo_open or self.lo is None else "["
        right = ")" if self.hi_open or self.hi is None else "]"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{left}{lo}, {hi}{right}"

    def is_neutral(self, value: Any) -> bool:
        return value == self.neutral


# ---- stages ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSpec:
    """One stage of the chain.

    ``position`` orders the default chain (llama.cpp's order with the extra stages in place), ``hf_position``
    transformers' order. ``impl`` is ``"module:function"``: ``function(cfg)`` returns the stage callable
    ``(Candidates, History) -> Candidates``. ``active`` decides from the config whether the stage runs (default:
    any field differs from its neutral value).
    """

    name: str
    kind: str
    fields: tuple[Field, ...]
    header: str
    summary: str
    impl: str
    position: int
    hf_position: int
    aliases: tuple[str, ...] = ()
    active: Optional[Callable[[Any], bool]] = None
    peer: str = ""  # whose semantics, for --explain and the docs
    check: Optional[Callable[[Any], None]] = None  # a rule across the stage's fields; raises ConfigError
    keeps_token: Optional[bool] = None  # whether it keeps a row's finite logits finite (None: as its kind does)

    def is_set(self, cfg: Any) -> bool:
        if self.active is not None:
            return bool(self.active(cfg))
        return any(getattr(cfg, f.name) != f.neutral for f in self.fields)

    @property
    def deterministic(self) -> bool:
        return self.kind in DETERMINISTIC_KINDS

    @property
    def keeps_a_token(self) -> bool:
        """Whether a row that holds a finite logit still holds one after this stage."""
        return self.kind in KEEP_A_TOKEN_KINDS if self.keeps_token is None else self.keeps_token


DEFAULT_BREAKERS = ("\n", ":", '"', "*")


def _temperature_active(cfg: Any) -> bool:
    return cfg.temperature != 1.0 or cfg.dynatemp_range > 0.0


def _one_constraint(cfg: Any) -> None:
    given = [f.name for f in STAGES["grammar"].fields if getattr(cfg, f.name)]
    if len(given) > 1:
        flags = " and ".join(FIELDS[name].flag for name in given)
        raise ConfigError(f"{flags} cannot be combined: give one constraint (a JSON schema, a grammar, a regex or "
                          "choices)")


STAGE_SPECS: tuple[StageSpec, ...] = (
    StageSpec(
        "logit_bias", BIAS,
        (Field("logit_bias", {}, "token_bias", "Add BIAS to a token's logit before every other stage (repeatable; "
               "TOKEN is an id or a text that is one token; -100 makes it practically impossible, -inf removes it).",
               flags=("--logit-bias",), metavar="TOKEN=BIAS"),),
        header="bias", summary="add a fixed bias to chosen tokens' logits",
        impl="llmsample.sampling.biases:logit_bias_stage", position=10, hf_position=5, peer="OpenAI/vLLM"),
    StageSpec(
        "penalties", PENALTY,
        (Field("repetition_penalty", 1.0, "float", "Divide positive / multiply negative logits of tokens already "
               "in the text.", lo=0, lo_open=True, hi_open=True, off="1.0 = off"),
         Field("frequency_penalty", 0.0, "float", "Subtract α·count for each generated token.", lo=-2, hi=2,
               off="0 = off"),
         Field("presence_penalty", 0.0, "float", "Subtract β once for each generated token.", lo=-2, hi=2,
               off="0 = off"),
         Field("penalty_last_n", -1, "int", "Penalise only the last N tokens.", lo=-1,
               off="-1 = whole text", flags=("--penalty-last-n", "--repeat-last-n")),
         Field("prompt_ignore_length", 0, "int", "The repetition penalty ignores the first N prompt tokens.", lo=0,
               off="0 = off")),
        header="pen", summary="repetition (CTRL), frequency and presence (OpenAI) penalties",
        impl="llmsample.sampling.stages:penalties_stage", position=20, hf_position=20,
        aliases=("penalty", "repetition_penalty", "frequency_penalty", "presence_penalty"),
        active=lambda c: c.repetition_penalty != 1.0 or c.frequency_penalty != 0.0 or c.presence_penalty != 0.0,
        peer="transformers/OpenAI/llama.cpp", keeps_token=True),  # a penalised finite logit stays finite
    StageSpec(
        "no_repeat_ngram", PENALTY,
        (Field("no_repeat_ngram_size", 0, "int", "Ban any token that would repeat an n-gram of this size.", lo=0,
               off="0 = off"),),
        header="ngram", summary="ban tokens that would repeat an n-gram",
        impl="llmsample.sampling.stages:no_repeat_ngram_stage", position=30, hf_position=30,
        aliases=("no_repeat_ngram_size", "ngram"), peer="transformers"),
    StageSpec(
        "sequence_bias", BIAS,
        (Field("sequence_bias", {}, "sequence_bias", "Bias the last token of a token sequence when the tokens "
               "before it end the text.", cli=False),),
        header="seqb", summary="bias token sequences",
        impl="llmsample.sampling.biases:sequence_bias_stage", position=40, hf_position=10, peer="transformers"),
    StageSpec(
        "bad_words", BIAS,
        (Field("bad_words_ids", (), "sequences", "Never generate TEXT (repeatable; text of several tokens bans the "
               "sequence).", flags=("--ban",), metavar="TEXT"),),
        header="ban", summary="ban token sequences",
        impl="llmsample.sampling.biases:bad_words_stage", position=45, hf_position=35,
        aliases=("bad_words_ids", "ban"), peer="transformers"),
    StageSpec(
        "dry", PENALTY,
        (Field("dry_multiplier", 0.0, "float", "DRY: penalise tokens that extend a repeated sequence "
               "(0.8 is its author's value).", lo=0, off="0 = off"),
         Field("dry_base", 1.75, "float", "DRY: penalty growth per repeated token.", lo=1),
         Field("dry_allowed_length", 2, "int", "DRY: repeats up to this long go unpenalised.", lo=1),
         Field("dry_penalty_last_n", -1, "int", "DRY: look back this many tokens.", lo=-1,
               off="-1 = whole text"),
         Field("dry_sequence_breakers", DEFAULT_BREAKERS, "sequences", "DRY: text that ends a repeat (repeatable; "
               "replaces the defaults \\n : \" *).", flags=("--dry-sequence-breaker",), metavar="TEXT")),
        header="dry", summary="DRY: penalise continuing a repeated sequence",
        impl="llmsample.sampling.dry:dry_stage", position=50, hf_position=40,
        active=lambda c: c.dry_multiplier > 0.0 and c.dry_penalty_last_n != 0, peer="llama.cpp"),
    StageSpec(
        "grammar", CONSTRAINT,
        (Field("json_schema", "", "json_schema", "Answer with JSON that this schema accepts: a file, or the schema "
               "itself ('{...}').", metavar="FILE|JSON"),
         Field("grammar", "", "grammar", "Answer in this grammar: a GBNF file (llama.cpp's, 'root ::= …') or a "
               "Lark one (llguidance's, 'start: …').", metavar="FILE"),
         Field("regex", "", "regex", "Answer with a text this regular expression matches in full.", metavar="RE"),
         Field("choice", (), "choices", "Answer with exactly one of these texts (repeatable).", metavar="TEXT")),
        header="gram", summary="remove the tokens a JSON schema, grammar, regex or choice forbids",
        impl="llmsample.sampling.constraint:grammar_stage", position=55, hf_position=45,
        aliases=("constraint", "json_schema", "regex", "choice"), peer="llguidance", check=_one_constraint),
    StageSpec(
        "top_n_sigma", TRUNCATION,
        (Field("top_n_sigma", 0.0, "float", "Keep logits >= max - n·σ.", off="<= 0 = off"),),
        header="nσ", summary="keep logits within n standard deviations of the best",
        impl="llmsample.sampling.truncation:top_n_sigma_stage", position=60, hf_position=55,
        aliases=("top_nsigma", "nsigma"), active=lambda c: c.top_n_sigma > 0.0, peer="llama.cpp"),
    StageSpec(
        "top_k", TRUNCATION,
        (Field("top_k", 0, "int", "Keep the k most likely tokens.", lo=0, off="0 = off"),),
        header="top_k", summary="keep the k most likely tokens",
        impl="llmsample.sampling.stages:top_k_stage", position=70, hf_position=60, peer="transformers"),
    StageSpec(
        "typical_p", TRUNCATION,
        (Field("typical_p", 1.0, "float", "Locally typical sampling: keep the most typical tokens up to this mass.",
               lo=0, hi=1, lo_open=True, off="1.0 = off"),),
        header="typ", summary="locally typical sampling",
        impl="llmsample.sampling.stages:typical_p_stage", position=80, hf_position=80, aliases=("typical",),
        peer="transformers"),
    StageSpec(
        "top_p", TRUNCATION,
        (Field("top_p", 1.0, "float", "Nucleus: keep the smallest set of tokens reaching mass p.", lo=0, hi=1,
               lo_open=True, off="1.0 = off"),),
        header="top_p", summary="nucleus sampling",
        impl="llmsample.sampling.stages:top_p_stage", position=90, hf_position=65, peer="transformers"),
    StageSpec(
        "min_p", TRUNCATION,
        (Field("min_p", 0.0, "float", "Keep tokens with p >= min_p·p_max.", lo=0, hi=1, off="0 = off"),),
        header="min_p", summary="keep tokens at least min_p times as likely as the best",
        impl="llmsample.sampling.stages:min_p_stage", position=100, hf_position=70, peer="transformers"),
    StageSpec(
        "xtc", TRUNCATION,
        (Field("xtc_probability", 0.0, "float", "XTC: with this probability per step, remove every token above "
               "the threshold but the least likely of them.", lo=0, hi=1, off="0 = off"),
         Field("xtc_threshold", 0.1, "float", "XTC: the probability a token needs to count as a top choice "
               "(above 0.5 XTC never acts).", lo=0, hi=1)),
        header="xtc", summary="exclude top choices",
        impl="llmsample.sampling.truncation:xtc_stage", position=110, hf_position=85,
        active=lambda c: c.xtc_probability > 0.0 and c.xtc_threshold <= 0.5, peer="llama.cpp"),
    StageSpec(
        "epsilon", TRUNCATION,
        (Field("epsilon_cutoff", 0.0, "float", "Remove tokens with p below this.", lo=0, hi=1, hi_open=True,
               off="0 = off"),),
        header="eps", summary="remove tokens below a fixed probability",
        impl="llmsample.sampling.truncation:epsilon_stage", position=120, hf_position=90,
        aliases=("epsilon_cutoff",), peer="transformers"),
    StageSpec(
        "eta", TRUNCATION,
        (Field("eta_cutoff", 0.0, "float", "Remove tokens with p below min(η, √η·e^-H).", lo=0, hi=1,
               hi_open=True, off="0 = off"),),
        header="eta", summary="remove tokens below an entropy-dependent probability",
        impl="llmsample.sampling.truncation:eta_stage", position=130, hf_position=95,
        aliases=("eta_cutoff",), peer="transformers"),
    StageSpec(
        "temperature", RESHAPE,
        (Field("temperature", 1.0, "float", "Divide the logits by T (0 = the top token only).", lo=0,
               hi_open=True, off="1.0 = off"),
         Field("dynatemp_range", 0.0, "float", "Dynamic temperature: T ± range, scaled by the normalised "
               "entropy.", lo=0, off="0 = off"),
         Field("dynatemp_exponent", 1.0, "float", "Dynamic temperature: exponent on the normalised entropy.",
               lo=0, flags=("--dynatemp-exp", "--dynatemp-exponent"))),
        header="temp", summary="divide the logits by T (dynamic temperature inside)",
        impl="llmsample.sampling.stages:temperature_stage", position=140, hf_position=50, aliases=("temp",),
        active=_temperature_active, peer="transformers/llama.cpp"),
    StageSpec(
        "mirostat", SELECTOR,
        (Field("mirostat", 0, "choice", "Mirostat version 1 or 2: draw aiming at a target surprise.",
               choices=(0, 1, 2), off="0 = off"),
         Field("mirostat_tau", 5.0, "float", "Mirostat: the target surprise (bits).", lo=0),
         Field("mirostat_eta", 0.1, "float", "Mirostat: the learning rate of μ.", lo=0, hi=1)),
        header="miro", summary="mirostat: keep the surprise near τ (replaces the draw)",
        impl="llmsample.sampling.mirostat:mirostat_stage", position=1000, hf_position=1000, peer="llama.cpp"),
)

# Settings that belong to no single stage.
GENERAL_FIELDS: tuple[Field, ...] = (
    Field("do_sample", False, "bool", "Draw from the distribution, or take the argmax.", cli=False),
    Field("min_tokens_to_keep", 1, "int", "Every truncation keeps at least this many tokens.", lo=1,
          flags=("--min-keep",)),
    Field("num_beams", 1, "int", "Beam search with this many beams.", lo=1, off="1 = off"),
    Field("length_penalty", 1.0, "float", "Beam score = Σ log p / length^α.", note="beam search only"),
    Field("early_stopping", False, "early_stopping", "Beam search stop rule: true, false or never.",
          note="beam search only"),
)

STAGES: dict[str, StageSpec] = {spec.name: spec for spec in STAGE_SPECS}
# The chain's stages; mirostat is the selector at the end, never part of an order.
CHAIN_STAGES: tuple[str, ...] = tuple(
    s.name for s in sorted(STAGE_SPECS, key=lambda s: s.position) if s.kind != SELECTOR
)
DEFAULT_ORDER: tuple[str, ...] = CHAIN_STAGES
HF_ORDER: tuple[str, ...] = tuple(
    s.name for s in sorted(STAGE_SPECS, key=lambda s: s.hf_position) if s.kind != SELECTOR
)
ORDER_ALIASES: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_ORDER, "llmsample": DEFAULT_ORDER, "llama.cpp": DEFAULT_ORDER, "llamacpp": DEFAULT_ORDER,
    "hf": HF_ORDER, "transformers": HF_ORDER,
}
STAGE_ALIASES: dict[str, str] = {alias: s.name for s in STAGE_SPECS for alias in s.aliases}

STAGE_FIELDS: tuple[Field, ...] = tuple(f for s in STAGE_SPECS for f in s.fields)
ORDER_FIELD = Field("order", DEFAULT_ORDER, "order", "Stage order, comma-separated, or 'hf' for transformers' "
                    "order.", off="default = llama.cpp's order")
ALL_FIELDS: tuple[Field, ...] = GENERAL_FIELDS[:1] + STAGE_FIELDS + GENERAL_FIELDS[1:] + (ORDER_FIELD,)
FIELDS: dict[str, Field] = {f.name: f for f in ALL_FIELDS}
FIELD_STAGE: dict[str, str] = {f.name: s.name for s in STAGE_SPECS for f in s.fields}
HEADERS: dict[str, str] = {s.name: s.header for s in STAGE_SPECS}
# Fields whose values may hold text that the model's tokenizer turns into ids before a run.
TOKEN_TEXT_FIELDS = ("logit_bias", "bad_words_ids", "dry_sequence_breakers")


def parse_order(value: Any) -> tuple[str, ...]:
    """Normalise an order given as an alias, a comma-separated string or a sequence of names.

    >>> parse_order("top_k, top-p,temp")
    ('top_k', 'top_p', 'temperature')
    >>> parse_order("hf")[:4]
    ('logit_bias', 'sequence_bias', 'penalties', 'no_repeat_ngram')
    """
    import difflib

    if value is None:
        return DEFAULT_ORDER
    if isinstance(value, str):
        key = value.strip().lower()
        if key in ORDER_ALIASES:
            return ORDER_ALIASES[key]
        names: list = [part for part in (p.strip() for p in value.split(",")) if part]
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
        if name not in CHAIN_STAGES:
            hint = difflib.get_close_matches(name, list(CHAIN_STAGES) + list(STAGE_ALIASES), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"order has an unknown stage {raw!r}{suggestion}; known stages: {', '.join(CHAIN_STAGES)}"
            )
        if name in resolved:
            raise ConfigError(f"order names the stage {name!r} twice")
        resolved.append(name)
    return tuple(resolved)


def active_stages(cfg: Any) -> tuple[str, ...]:
    """The stages of ``cfg`` that run, in chain order (mirostat last, when it replaces the draw).

    Greedy decoding (``do_sample=False``) and beam search keep only the stages that can change the best token
    (biases and penalties), as transformers does. Sampling with temperature 0 keeps the whole chain and
    temperature keeps only the top token.
    """
    deterministic = not cfg.do_sample or cfg.num_beams > 1
    chain = tuple(
        name for name in cfg.order if STAGES[name].is_set(cfg) and (not deterministic or STAGES[name].deterministic)
    )
    if cfg.mirostat and not deterministic and cfg.temperature != 0.0:
        chain += ("mirostat",)
    return chain


def build_stage(name: str, cfg: Any) -> Any:
    """The stage callable for ``name``, from the implementation its entry names."""
    import importlib

    module, function = STAGES[name].impl.split(":")
    return getattr(importlib.import_module(module), function)(cfg)

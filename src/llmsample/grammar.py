"""Constraints (JSON schema, grammar, regex, choice) compiled with llguidance and bound to a model's tokenizer.

The sampling stage (``sampling/constraint.py``) is pure torch: it asks the bound ``Constraint`` for each row's
allowed tokens and removes the rest. This module is the bridge: it turns the settings' texts into an llguidance
grammar (checked before any model loads), reads the tokenizer's vocabulary as bytes (SentencePiece's ``▁`` and
``<0xXX>`` byte fallback, byte-level BPE's ``Ġ`` alphabet: llguidance decodes both through the tokenizer's own
``tokenizer.json``), and keeps one parser per generated prefix, so that every ``-n`` row and every beam follows its
own text.

Why llguidance: ``python benchmarks/compare_grammar_engines.py`` (README, "Constraints").
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

from llmsample.errors import ConfigError

# The settings that hold a constraint, in the order the help lists them; at most one may be set.
KINDS = ("json_schema", "grammar", "regex", "choice")
FLAGS = {"json_schema": "--json-schema", "grammar": "--grammar", "regex": "--regex", "choice": "--choice"}
# JSON is written on one line with a space after ',' and ':' (no free whitespace: a model, a random one above all,
# could otherwise pad an answer with newlines until the token limit).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
TABLE_FORMAT = 2  # bump when the cached token table's layout changes


# ---- the settings' texts → an llguidance grammar (no tokenizer, no torch) -----------------------------------------


def _one_line(message: str) -> str:
    """llguidance's multi-line report as one line: the problem and where it is.

    >>> _one_line("regex parse error:\\n    a(b\\n     ^\\nerror: unclosed group")
    'unclosed group (at character 2)'
    """
    lines = [line for line in message.replace("\\n", "\n").splitlines() if line.strip()]
    problem = next((line.split("error:", 1)[1].strip() for line in lines if line.strip().startswith("error:")), None)
    if problem is None:
        return re.sub(r"\s+", " ", lines[0]).strip() if lines else message
    for pattern, caret in zip(lines, lines[1:]):  # a regex error: a caret under the spot, below the pattern
        if caret.strip() == "^" and pattern.startswith("    "):
            return f"{problem} (at character {len(caret) - len(caret.lstrip()) - 4 + 1})"
    return problem


def _lark_position(message: str) -> str:
    """``at 3(7): unknown name: "foo"`` → ``unknown name: "foo" (line 3, column 7)``."""
    first = message.splitlines()[0] if message else message
    found = re.match(r"at (\d+)\((\d+)\): (.*)", first)
    if not found:
        return _one_line(message)
    return f"{found.group(3).strip()} (line {found.group(1)}, column {found.group(2)})"


def grammar_text(kind: str, value: Any, where: str = "grammar") -> str:
    """llguidance's grammar for a setting (not yet checked)."""
    import llguidance

    matcher = llguidance.LLMatcher
    if kind == "json_schema":
        return matcher.grammar_from_json_schema(value, defaults=JSON_OPTIONS)
    if kind == "regex":
        return matcher.grammar_from_regex(value)
    if kind == "choice":
        return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
    if kind == "grammar":
        return matcher.grammar_from_lark(to_lark(value, where))
    raise ValueError(kind)


def is_gbnf(text: str) -> bool:
    """GBNF (llama.cpp) defines rules with ``::=``; Lark with ``:``."""
    return re.search(r"^\s*[A-Za-z_][\w-]*\s*::=", text, re.MULTILINE) is not None


def to_lark(text: str, where: str = "grammar") -> str:
    """A grammar in Lark (llguidance's dialect), from GBNF as llama.cpp writes it or from Lark itself."""
    if not is_gbnf(text):
        return text
    from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

    try:
        return any_to_lark(text)
    except GbnfToLarkError as exc:
        raise ConfigError(f"{where}: not valid GBNF: {_gbnf_where(exc)}") from None
    except Exception as exc:  # the converter's other complaints (an undefined rule, …)
        raise ConfigError(f"{where}: not valid GBNF: {_one_line(str(exc))}") from None


def _gbnf_where(exc: Any) -> str:
    position = getattr(exc, "pos", None)
    message = str(exc).split(" at line ")[0]
    if position is None:
        return message
    line = position.text.count("\n", 0, position.pos) + 1
    column = position.pos - (position.text.rfind("\n", 0, position.pos) + 1) + 1
    return f"{message} (line {line}, column {column})"


@functools.lru_cache(maxsize=64)
def check(kind: str, value: Any, where: str = "") -> None:
    """Raise ``ConfigError`` (one line: where, the problem, where in the text) unless llguidance accepts it.

    ``where`` names the setting (default: its name; the CLI passes the flag and the file).
    """
    import llguidance

    where = where or kind
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
        if isinstance(schema, bool):  # valid JSON Schema, but llguidance only follows object schemas
            raise ConfigError(f"{where}: the boolean schema {value.strip()} is not supported: give an object "
                              "schema ({} allows any JSON value)")
        if not isinstance(schema, dict):
            raise ConfigError(f"{where}: a JSON schema is an object, got {value[:40]!r}")
    try:
        text = grammar_text(kind, value, where)
    except (ValueError, TypeError) as exc:  # llguidance refuses some inputs before validation (a boolean schema)
        raise ConfigError(f"{where}: not a {kind.replace('_', ' ')} llguidance can follow: {_one_line(str(exc))}") \
            from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    if not is_error:
        return
    if kind == "regex":
        raise ConfigError(f"{where}: {value!r} is not a valid regular expression: {_one_line(messages[0])}")
    if kind == "grammar":
        raise ConfigError(f"{where}: not a valid grammar: {_lark_position(messages[0])}")
    if kind == "json_schema":
        raise ConfigError(f"{where}: not a schema llguidance can follow: {_one_line(messages[0])}")
    raise ConfigError(f"{where}: {_one_line(messages[0])}")


def active(cfg: Any) -> Optional[tuple[str, Any]]:
    """``(kind, value)`` of the constraint ``cfg`` holds, or None."""
    for kind in KINDS:
        value = getattr(cfg, kind, None)
        if value:
            return kind, value
    return None


# ---- the tokenizer bridge ------------------------------------------------------------------------------------------

_TABLES: dict[Any, Any] = {}  # in this process: (id(tokenizer), eos ids, slices) → llguidance.LLTokenizer
# llguidance's token classes ("slices"): each makes masks inside JSON strings faster and costs set-up at every run.
# Of its four general ones, the two kept here (string content of up to 10 characters, and of any length) keep the
# benchmark's mask within its bound; the other two (whitespace runs, up to 30 characters) cost more set-up than
# they save. Measured on the default model (CPU time, a busy machine): set-up 1.05 → 0.69 s, mask mean 0.048 →
# 0.066 ms, worst token 0.79 → 0.77 ms; with no slices the worst token took 2.9 ms.
SLICES = (r'[^"\\\x00-\x1F\x7F]{1,10}', r'[^"\\\x00-\x1F\x7F]+')
# A --choice grammar is a few fixed texts: its masks take 0.1–0.3 ms without the slices, whose set-up (0.2 s) it
# skips. Free text (JSON strings, a regex such as [^\n]{1,200}) takes 2.5 ms a token without them.
NO_SLICES_KINDS = ("choice",)


def _backend(tokenizer: Any) -> Any:
    for name in ("backend", "backend_tokenizer", "_tokenizer"):  # llmsample's own tokenizer; transformers' fast one
        backend = getattr(tokenizer, name, None)
        if hasattr(backend, "to_str") and hasattr(backend, "id_to_token"):
            return backend
    raise ConfigError("constraints need a fast tokenizer (a tokenizer.json); this model's tokenizer is not one")


def _file_key(source: Path) -> Optional[str]:
    """A tokenizer.json's identity without reading it: its path, size and modification time (as .pyc files do)."""
    try:
        stat = source.stat()
    except OSError:
        return None
    text = f"{TABLE_FORMAT}\x00{source.resolve()}\x00{stat.st_size}\x00{stat.st_mtime_ns}"
    return "f" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:31]


def _table_key(tokenizer: Any, backend: Any) -> str:
    """What the byte table depends on: the tokenizer file when the tokenizer says which one it read, else every
    token's string and the decoder (a transformers tokenizer)."""
    source = getattr(tokenizer, "source", None)
    key = _file_key(source) if source is not None else None
    if key is not None:
        return key
    size = backend.get_vocab_size(with_added_tokens=True)
    digest = hashlib.sha256()
    digest.update(f"{TABLE_FORMAT}\x00{size}\x00".encode())
    digest.update("\x00".join(backend.id_to_token(i) or "" for i in range(size)).encode("utf-8", "surrogatepass"))
    decoder = backend.decoder
    digest.update(decoder.__getstate__() if decoder is not None else b"")
    return digest.hexdigest()[:32]


def _table_dir() -> Path:
    from llmsample.models import cache_root

    return cache_root() / "grammar"


def _read_table(path: Path) -> Optional[tuple[list[bytes], list[int]]]:
    """The cached token bytes and special ids; ``None`` when absent or damaged."""
    try:
        data = path.read_bytes()
        header, _, body = data.partition(b"\n")
        meta = json.loads(header)
        tokens, offset = [], 0
        for length in meta["lengths"]:
            tokens.append(body[offset:offset + length])
            offset += length
        if offset != len(body):
            return None
        return tokens, meta["special"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_table(path: Path, tokens: list[bytes], special: list[int]) -> None:
    """Written beside its place and renamed into it: a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=".table.", dir=path.parent)
        with os.fdopen(fd, "wb") as file:
            meta = {"lengths": [len(t) for t in tokens], "special": special}
            file.write(json.dumps(meta).encode() + b"\n")
            file.write(b"".join(tokens))
        os.replace(partial, path)
    except OSError:  # a read-only cache only costs the next run the slow path
        pass


class _Vocabulary:
    """What ``llguidance.LLTokenizer`` reads: the token bytes, the special ids, and an encoder (the model's
    tokenizer, for the fixed texts a grammar forces)."""

    is_tokenizer_wrapper = True  # llguidance: call me with a str, not bytes

    def __init__(self, tokens: list[bytes], special: list[int], eos: int, bos: Optional[int], tokenizer: Any):
        self.tokens, self.special_token_ids = tokens, special
        self.eos_token_id, self.bos_token_id = eos, bos
        self._tokenizer = tokenizer

    def __call__(self, text: Any) -> list[int]:
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        return list(self._tokenizer.encode(text, add_special_tokens=False))


def token_table(tokenizer: Any, eos_ids: Sequence[int], slices: Sequence[str] = SLICES) -> Any:
    """llguidance's view of ``tokenizer`` (each token as bytes, the EOS ids), built once per model.

    The first time, llguidance reads the tokenizer's JSON itself (a few seconds for Gemma 3's 262,144 tokens);
    the bytes it finds are kept in ``$XDG_CACHE_HOME/llmsample/grammar/``, so later runs only build its token trie
    and the token classes ``slices`` (llguidance cannot save those: about 0.6 s here, 0.5 without the classes).
    """
    import llguidance

    eos = sorted(set(int(i) for i in eos_ids)) or [int(tokenizer.eos_token_id or 0)]
    bos = getattr(tokenizer, "bos_token_id", None)
    memo = (id(tokenizer), tuple(eos), tuple(slices))
    if memo in _TABLES and _TABLES[memo][0] is tokenizer:
        return _TABLES[memo][1]
    backend = _backend(tokenizer)
    path = _table_dir() / f"{_table_key(tokenizer, backend)}.bin"
    cached = _read_table(path)
    if cached is None:
        table = llguidance.LLTokenizer(backend.to_str(), eos_token=eos, slices=list(slices))
        tokens = [table.decode_bytes([i]) for i in range(table.vocab_size)]
        special = [i for i in range(table.vocab_size) if table.is_special_token(i)]
        _write_table(path, tokens, special)
    else:
        tokens, special = cached
        table = llguidance.LLTokenizer(_Vocabulary(tokens, special, eos[0], bos, tokenizer), eos_token=eos,
                                       slices=list(slices))
    _TABLES[memo] = (tokenizer, table)
    return table


# ---- a constraint bound to a tokenizer ----------------------------------------------------------------------------


class Constraint:
    """One compiled constraint and the parser state of every generated prefix seen at the last step.

    ``allowed_bits(generated)`` is what the sampling stage calls: ``generated`` ``[batch, n]`` (the tokens after
    the prompt, one row per sample or beam), the answer a ``[batch, words]`` packed int32 tensor (``allowed`` unpacks
    it to ``[batch, width]`` bool). A row's parser is found
    by its tokens: the one for its prefix at the last step, advanced by its newest token, so a beam that takes over
    another beam's text takes over its parser too.
    """

    def __init__(self, kind: str, value: Any, table: Any):
        import llguidance

        self.kind, self.value, self.table = kind, value, table
        self.grammar = grammar_text(kind, value)
        self._start = llguidance.LLMatcher(table, self.grammar, log_level=0)
        if self._start.is_error():
            raise ConfigError(f"{FLAGS[kind]}: {_one_line(self._start.get_error())}")
        self._parsers: dict[tuple[int, ...], Any] = {(): self._start.deep_copy()}
        self.vocab = table.vocab_size
        self._executor: Any = None

    def check_satisfiable(self) -> None:
        """``ConfigError`` when no token sequence of this vocabulary can satisfy the constraint (exit 2)."""
        from llmsample.sampling.constraint import unpack

        first = self._start.deep_copy()
        allowed = unpack(self._bits([first]), self.vocab)[0]
        eos = set(self.table.eos_tokens)
        if first.is_accepting():
            return
        if first.is_error() or not any(i not in eos for i in allowed.nonzero().flatten().tolist()):
            raise ConfigError(f"{FLAGS[self.kind]}: no text this model's vocabulary can write satisfies it "
                              "(no token can start it)")

    def complete(self, token_ids: Sequence[int]) -> bool:
        """Whether ``token_ids`` (a generated text, EOS included or not) satisfies the constraint."""
        parser = self._start.deep_copy()
        ids = [int(i) for i in token_ids]
        eos = set(self.table.eos_tokens)
        while ids and ids[-1] in eos and (len(ids) < 2 or ids[-2] in eos):  # padding after the first EOS
            ids.pop()
        return parser.consume_tokens(ids) and parser.is_accepting() if ids else parser.is_accepting()

    def allowed_bits(self, generated: Any) -> Any:
        """``[batch, words]`` int32: the tokens each row's text may continue with (EOS only where it may end),
        packed as the sampling stage reads them (token i is bit i % 32 of word i // 32)."""
        keys = [tuple(row) for row in generated.tolist()]
        wanted = set(keys)
        new = [key for key in wanted if key not in self._parsers]
        children = Counter(key[:-1] for key in new if key)
        parsers = {key: self._parsers[key] for key in wanted if key in self._parsers}
        for key in new:
            parent = self._parsers.get(key[:-1]) if key else None
            if parent is None:  # never seen (a fresh sampler, a trace of an old step): parse it from the start
                parser = self._start.deep_copy()
                parser.consume_tokens(list(key))
            else:  # advance the parent in place when no other row needs it
                parser = parent if children[key[:-1]] == 1 and key[:-1] not in wanted else parent.deep_copy()
                parser.consume_token(key[-1])
            parsers[key] = parser
        self._parsers = parsers
        unique = list(wanted)
        bits = self._bits([parsers[key] for key in unique])
        if len(unique) == len(keys) and unique == keys:
            return bits.to(generated.device)
        index = {key: i for i, key in enumerate(unique)}
        return bits[[index[key] for key in keys]].to(generated.device)

    def allowed(self, generated: Any, width: int) -> Any:
        """``[batch, width]`` bool: ``allowed_bits`` unpacked (columns past the vocabulary: False)."""
        from llmsample.sampling.constraint import unpack

        return unpack(self.allowed_bits(generated), width)

    def _bits(self, parsers: list[Any]) -> Any:
        import llguidance
        import torch

        # llguidance writes the masks straight into this tensor. (Not through llguidance.torch: importing it
        # builds a torch.compile kernel, about 2 s.)
        bitmask = torch.zeros((len(parsers), (self.vocab + 31) // 32), dtype=torch.int32)
        row_bytes = bitmask.shape[1] * 4
        if len(parsers) == 1:
            parsers[0].unsafe_compute_mask_ptr(bitmask.data_ptr(), row_bytes)
        else:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            self._executor.unsafe_compute_mask_ptr([(p, i) for i, p in enumerate(parsers)], bitmask.data_ptr(),
                                                   row_bytes, len(parsers))
        return bitmask


def bind(cfg: Any, tokenizer: Any, eos_ids: Sequence[int]) -> dict:
    """The sampler state that carries ``cfg``'s constraint, bound to ``tokenizer`` (``{}`` without one).

    ``Sampler(cfg, state=bind(cfg, tokenizer, eos_ids))``; ``ConfigError`` if no text can satisfy it.
    """
    found = active(cfg)
    if found is None or "grammar" not in cfg.active_stages():  # left out of --order: it does not run
        return {}
    kind = found[0]
    constraint = Constraint(*found, token_table(tokenizer, eos_ids, () if kind in NO_SLICES_KINDS else SLICES))
    constraint.check_satisfiable()
    return {"grammar": constraint}

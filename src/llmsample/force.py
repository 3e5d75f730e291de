"""``generate --force STEP=TOKEN``: the token a generated step takes instead of its draw.

STEP counts generated tokens from 1; TOKEN is a text that the model's tokenizer writes as exactly one token (escapes
such as ``\\n`` understood, as in ``--logit-bias``), or ``#ID`` for a token id. The specs are read and checked
before the model loads (``parse``); the texts become ids once the tokenizer is there (``resolve``). No torch here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from llmsample.errors import ConfigError
from llmsample.options import unescape

_SPEC = re.compile(r"(?s)\s*(\d+)\s*=(.*)")
_ID = re.compile(r"#(\d+)")


@dataclass(frozen=True)
class Force:
    """One forced step: ``step`` (1-based), the token as given (``text``, or ``token_id`` for ``#ID``)."""

    step: int
    spec: str  # as the user wrote it, for messages
    text: Optional[str] = None
    token_id: Optional[int] = None

    def to_dict(self, token: str) -> dict[str, Any]:
        """JSON-ready, with the token's text as the tokenizer decodes it."""
        return {"step": self.step, "token_id": self.token_id, "token": token}


def parse(specs: Iterable[str], max_new_tokens: int, num_beams: int = 1) -> tuple[Force, ...]:
    """``STEP=TOKEN`` specs, checked: a malformed one, a step past ``max_new_tokens``, two on one step, or any
    with beam search are a ``ConfigError`` (exit 2).

    >>> parse(["2= the", "5=#42"], 8)
    (Force(step=2, spec='2= the', text=' the', token_id=None), Force(step=5, spec='5=#42', text=None, token_id=42))
    """
    forces: dict[int, Force] = {}
    for spec in specs:
        match = _SPEC.fullmatch(spec)
        if match is None or match.group(2) == "":
            raise ConfigError(f"--force takes STEP=TOKEN (STEP a generated token's number from 1, TOKEN a text that "
                              f"is one token or #ID), got {spec!r}")
        step, token = int(match.group(1)), match.group(2)
        if step < 1:
            raise ConfigError(f"--force {spec!r}: STEP counts generated tokens from 1, got {step}")
        if step > max_new_tokens:
            raise ConfigError(f"--force {spec!r}: step {step} is beyond --max-new-tokens {max_new_tokens}")
        if step in forces:
            raise ConfigError(f"--force gives step {step} twice: {forces[step].spec!r} and {spec!r}")
        number = _ID.fullmatch(token)
        forces[step] = Force(step, spec, None, int(number.group(1))) if number else Force(step, spec, unescape(token))
    if forces and num_beams > 1:
        raise ConfigError(f"--force does not apply to beam search (--num-beams {num_beams}): a step there keeps "
                          "several tokens at once; force with sampling or --greedy")
    return tuple(sorted(forces.values(), key=lambda f: f.step))


def resolve(forces: Iterable[Force], encode: Callable[[str], list[int]], vocab_size: int) -> tuple[Force, ...]:
    """Each force with its token id: a text must be exactly one token of this tokenizer, an id within the vocab.

    >>> resolve(parse(["1=b", "2=#3"], 4), lambda text: [ord(c) - 97 for c in text], 10)[0].token_id
    1
    """
    out = []
    for force in forces:
        if force.text is not None:
            ids = [int(i) for i in encode(force.text)]
            if len(ids) != 1:
                what = "no token at all" if not ids else f"{len(ids)} tokens {ids}"
                raise ConfigError(f"--force {force.spec!r}: {force.text!r} is {what} for this model's tokenizer: "
                                  "give a text that is one token, or its id as #ID")
            force = Force(force.step, force.spec, force.text, ids[0])
        if force.token_id is None or force.token_id >= vocab_size:
            raise ConfigError(f"--force {force.spec!r}: token id {force.token_id} is beyond the vocabulary "
                              f"(ids 0..{vocab_size - 1})")
        out.append(force)
    return tuple(out)


def by_index(forces: Iterable[Force]) -> dict[int, int]:
    """``{step index (0-based): token id}``, as the decode loop takes it."""
    return {force.step - 1: int(force.token_id) for force in forces if force.token_id is not None}

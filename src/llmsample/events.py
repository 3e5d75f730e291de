"""Plain, JSON-ready records of a run. Every record carries ``schema`` so scripts can check what they read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

SCHEMA_VERSION = 1


@dataclass
class SampleRecord:
    """Everything generated for one sample (or one beam hypothesis)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    raw_probs: list[float] = field(default_factory=list)  # model softmax at T=1
    probs: list[float] = field(default_factory=list)  # after the chain
    temperatures: list[float] = field(default_factory=list)  # the temperature used at each step
    entropies: list[float] = field(default_factory=list)  # nats, of the processed distribution at each step
    candidates: list[dict] = field(default_factory=list)  # per step, with --candidates
    stage_state: dict[str, list] = field(default_factory=dict)  # per step, from stages that draw or keep state
    finish_reason: Optional[str] = None  # eos | length | stop | interrupted | terminated
    complete: Optional[bool] = None  # with a constraint: whether the text satisfies it
    score: Optional[float] = None  # beam search: length-normalised score
    forced: Optional[list[bool]] = None  # with --force: per step, whether the token was forced (not drawn)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "index": self.index,
            "text": self.text,
            "token_ids": self.token_ids,
            "raw_probs": [_rounded(p) for p in self.raw_probs],
            "probs": [_rounded(p) for p in self.probs],
            "temperatures": self.temperatures,
            "entropies": [round(h, 6) for h in self.entropies],
            "finish_reason": self.finish_reason,
        }
        out.update(self.stage_state)  # "xtc_fired", "mirostat_mu", "grammar_cut": only when those stages run
        if self.forced is not None:
            out["forced"] = self.forced
        if self.complete is not None:
            out["complete"] = self.complete
        if self.candidates:
            out["candidates"] = self.candidates
        if self.score is not None:
            out["score"] = self.score
        return out


def _rounded(p: Optional[float]) -> Optional[float]:
    """A probability for JSON; None where a serving engine did not report it (never a made-up number)."""
    return None if p is None else round(p, 6)


def token_event(sample: int, index: int, token_id: Optional[int], text: str, raw_prob: Optional[float],
                prob: Optional[float],
                temperature: float, candidates: Optional[dict] = None,
                stage_state: Optional[dict] = None) -> dict[str, Any]:
    """One generated token (``--format jsonl``)."""
    event = {
        "type": "token",
        "schema": SCHEMA_VERSION,
        "sample": sample,
        "index": index,
        "token_id": token_id,
        "text": text,
        "raw_prob": _rounded(raw_prob),
        "prob": _rounded(prob),
        "temperature": temperature,
    }
    event.update(stage_state or {})
    if candidates is not None:
        event["candidates"] = candidates
    return event


def stage_state(record: dict, row: int) -> dict[str, Any]:
    """One row's per-step decisions from the sampler's record: whether XTC fired, mirostat's μ, the grammar's cut."""
    out: dict[str, Any] = {}
    if "xtc" in record:
        out["xtc_fired"] = bool(record["xtc"][row])
    if "mirostat_mu" in record:
        out["mirostat_mu"] = round(float(record["mirostat_mu"][row]), 6)
    if "grammar_cut" in record:  # the raw probability mass the constraint removed at this step
        out["grammar_cut"] = round(float(record["grammar_cut"][row]), 6)
    return out


def summary(prompt: str, samples: list[SampleRecord], settings: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """The whole run (``--format json``, and the last line of ``--format jsonl``)."""
    return {
        "type": "summary",
        "schema": SCHEMA_VERSION,
        "prompt": prompt,
        "text": samples[0].text if samples else "",
        "samples": [s.to_dict() for s in samples],
        "settings": settings,
        **run,
    }

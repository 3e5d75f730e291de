"""The shared sampling core: pure torch, no I/O, no transformers.

Generate, inspect, sweep and beam search all go through ``Sampler``. The names below are loaded on first use, so
that ``llmsample.sampling.registry`` (the stage declarations, no torch) can be read without importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Candidates", "Choice", "History", "Sampler", "StepTrace", "draw"]

_WHERE = {
    "Candidates": "llmsample.sampling.candidates",
    "Choice": "llmsample.sampling.sampler",
    "Sampler": "llmsample.sampling.sampler",
    "StepTrace": "llmsample.sampling.sampler",
    "draw": "llmsample.sampling.sampler",
    "History": "llmsample.sampling.stages",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'llmsample.sampling' has no attribute {name!r}")

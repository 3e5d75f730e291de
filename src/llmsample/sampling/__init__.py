"""The shared sampling core: pure torch, no I/O, no transformers.

Generate, inspect, sweep and beam search all go through ``Sampler``.
"""

from llmsample.sampling.candidates import Candidates
from llmsample.sampling.sampler import Choice, Sampler, StepTrace, draw
from llmsample.sampling.stages import History

__all__ = ["Candidates", "Choice", "History", "Sampler", "StepTrace", "draw"]

"""Domain exceptions. Each carries the exit code the command line turns it into."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    DIFFERS = 1  # replay: the new run differs from the recorded one (as diff(1); an unexpected error is 1 too)
    USAGE = 2  # bad flag, bad value, bad preset
    MODEL = 3  # model or device could not be loaded; a serving engine unreachable, refusing, or without the model
    GENERATION = 4  # the model produced something the sampler cannot use (NaN logits, …)
    INTERRUPTED = 130  # SIGINT
    TERMINATED = 143  # SIGTERM


class LlmsampleError(Exception):
    """Base class: a one-line, user-facing message plus an exit code."""

    exit_code: ExitCode = ExitCode.USAGE


class ConfigError(LlmsampleError, ValueError):
    """A setting is out of range, of the wrong type, or unknown."""

    exit_code = ExitCode.USAGE


class ModelError(LlmsampleError):
    """The model, tokenizer or device could not be loaded."""

    exit_code = ExitCode.MODEL


class OutOfMemory(LlmsampleError):
    """The device ran out of memory."""

    exit_code = ExitCode.MODEL


class SamplingError(LlmsampleError, ValueError):
    """The logits cannot be sampled from (NaN or +inf, or no finite value in a row)."""

    exit_code = ExitCode.GENERATION


OUT_OF_MEMORY_ADVICE = ("try --dtype bfloat16 or float16, fewer samples (-n) or beams, a shorter --max-new-tokens, "
                        "or a smaller model")


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, Python's MemoryError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "DefaultCPUAllocator" in text
                                              or "out of memory" in text.lower())


def first_line(exc: BaseException) -> str:
    """An exception as one line for the user: its message's first line, or its type when it has none."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


class ServerError(LlmsampleError):
    """A serving engine (``--engine openai``) could not be reached, refused the request, does not serve the model,
    went silent past ``--timeout``, or cut its answer's stream."""

    exit_code = ExitCode.MODEL


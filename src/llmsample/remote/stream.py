"""A server's streamed answer as tokens: the remote counterpart of the decode loop's steps.

Each chunk of a stream becomes ``ServerToken`` events (the text to print, the chosen token's probability, the
alternatives the server listed) and, at the end of a sample, a ``ServerFinish``. Two stream shapes exist: the
OpenAI chunks (``choices[i].text`` or ``.delta.content`` with ``logprobs``) that vLLM, llama-cpp-python, Ollama and
OpenAI send, and llama-server's native ``/completion`` events (``content``, ``completion_probabilities``, ``stop``).

Probabilities are what the server reports, never more: ``raw_prob`` is the model's own (a logprob before sampling),
``prob`` the probability after the server's sampler chain where the server says so (llama-server's
``post_sampling_probs``), and ``top`` is the server's top-N list, not a distribution over the whole vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

RAW, POST_SAMPLING = "raw", "post_sampling"


@dataclass
class ServerToken:
    sample: int
    text: str  # what the server emitted for this token: the text to print
    token: str  # the token as the server names it (candidate tables)
    token_id: Optional[int] = None  # where the server says
    raw_prob: Optional[float] = None  # the model's probability of it, before sampling
    prob: Optional[float] = None  # after the server's sampler chain, where it says
    top: list[dict] = field(default_factory=list)  # [{"token", "token_id", "prob"}], the server's top-N
    top_kind: str = RAW  # whether ``top`` holds raw or post-sampling probabilities


@dataclass
class ServerFinish:
    sample: int
    reason: str  # eos | stop | length | error


Event = Union[ServerToken, ServerFinish]


def _exp(logprob: Any) -> Optional[float]:
    if logprob is None:
        return None
    try:
        return math.exp(float(logprob))
    except (TypeError, ValueError, OverflowError):
        return None


def finish_reason(reason: Optional[str], stop_reason: Any = None, stops_given: bool = False) -> str:
    """OpenAI's ``stop`` covers end-of-sequence and stop strings alike: vLLM's ``stop_reason`` tells them apart
    (None for EOS, the text for a stop string); without it, ``stop`` is a stop string only when some were given.

    >>> finish_reason("length"), finish_reason("stop"), finish_reason("stop", "###"), finish_reason("stop", None, True)
    ('length', 'eos', 'stop', 'stop')
    """
    if reason == "length":
        return "length"
    if reason == "stop":
        if isinstance(stop_reason, str):
            return "stop"
        if stop_reason is None and stops_given:
            return "stop"
        return "eos"
    return reason or "eos"


def _split(text: str, tokens: list[str]) -> list[str]:
    """The chunk's text per token: the tokens' own texts when they add up to it, else all of it on the first."""
    if len(tokens) <= 1:
        return [text] if tokens else []
    if "".join(tokens) == text:
        return list(tokens)
    return [text] + [""] * (len(tokens) - 1)


def openai_events(chunk: dict, sample_base: int = 0, stops_given: bool = False) -> Iterator[Event]:
    """Events of one OpenAI-style chunk (completions or chat), ``choices[i].index`` offset by ``sample_base``.

    >>> chunk = {"choices": [{"index": 0, "text": " Paris", "logprobs": {"tokens": [" Paris"],
    ...          "token_logprobs": [-0.1], "top_logprobs": [{" Paris": -0.1, " the": -2.5}]}, "finish_reason": None}]}
    >>> [(e.text, round(e.raw_prob, 3), [t["token"] for t in e.top]) for e in openai_events(chunk)]
    [(' Paris', 0.905, [' Paris', ' the'])]

    A chat chunk (``delta.content``; ``logprobs.content`` entries with their own ``top_logprobs``):

    >>> chat = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop", "logprobs": {"content":
    ...         [{"token": "Hi", "logprob": -0.5, "top_logprobs": [{"token": "Hello", "logprob": -1.5},
    ...                                                              {"token": "Hi", "logprob": -0.5}]}]}}]}
    >>> [(type(e).__name__, getattr(e, "text", None), [t["token"] for t in getattr(e, "top", [])])
    ...  for e in openai_events(chat, sample_base=2)]
    [('ServerToken', 'Hi', ['Hi', 'Hello']), ('ServerFinish', None, [])]
    """
    for choice in chunk.get("choices") or []:
        sample = sample_base + int(choice.get("index") or 0)
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content") or ""
        entries = _openai_logprobs(choice.get("logprobs"))
        texts = _split(text, [e[0] for e in entries])
        for piece, (token, logprob, top) in zip(texts, entries):
            yield ServerToken(sample, piece, token, None, _exp(logprob), None, top, RAW)
        if not entries and text:
            yield ServerToken(sample, text, text)
        if choice.get("finish_reason"):
            yield ServerFinish(sample, finish_reason(choice["finish_reason"], choice.get("stop_reason"), stops_given))


def _openai_logprobs(logprobs: Any) -> list[tuple[str, Any, list[dict]]]:
    """(token, logprob, top list) per token, from the completions shape (``tokens``, ``token_logprobs``,
    ``top_logprobs`` dicts) or the chat shape (``content`` entries with their own ``top_logprobs`` lists)."""
    if not isinstance(logprobs, dict):
        return []
    if isinstance(logprobs.get("content"), list):  # chat completions
        return [(e.get("token", ""), e.get("logprob"),
                 _top([(t.get("token", ""), t.get("logprob")) for t in e.get("top_logprobs") or []]))
                for e in logprobs["content"]]
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or [None] * len(tokens)
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    return [(token, value, _top(list((top or {}).items()))) for token, value, top in zip(tokens, values, tops)]


def _top(pairs: list[tuple[str, Any]]) -> list[dict]:
    rows = [{"token": token, "token_id": None, "prob": _exp(logprob)} for token, logprob in pairs]
    rows = [row for row in rows if row["prob"] is not None]
    return sorted(rows, key=lambda row: -row["prob"])


LLAMA_SERVER_STOPS = {"eos": "eos", "word": "stop", "limit": "length"}


def llama_server_events(chunk: dict, sample: int) -> Iterator[Event]:
    """Events of one llama-server ``/completion`` chunk. With ``post_sampling_probs`` each token carries ``prob``
    and ``top_probs`` (after its sampler chain); without, ``logprob`` and ``top_logprobs`` (raw).

    >>> chunk = {"content": "Hi", "stop": False, "completion_probabilities": [{"id": 5, "token": "Hi", "prob": 0.75,
    ...          "top_probs": [{"id": 5, "token": "Hi", "prob": 0.75}, {"id": 9, "token": "Yo", "prob": 0.25}]}]}
    >>> [(e.token_id, e.prob, e.top_kind, len(e.top)) for e in llama_server_events(chunk, 0)]
    [(5, 0.75, 'post_sampling', 2)]
    """
    text = chunk.get("content") or ""
    entries = chunk.get("completion_probabilities") or []
    texts = _split(text, [e.get("token", "") for e in entries])
    for piece, entry in zip(texts, entries):
        if "prob" in entry or "top_probs" in entry:
            top = [{"token": t.get("token", ""), "token_id": t.get("id"), "prob": t.get("prob")}
                   for t in entry.get("top_probs") or []]
            yield ServerToken(sample, piece, entry.get("token", ""), entry.get("id"), None, entry.get("prob"),
                              top, POST_SAMPLING)
        else:
            top = [{"token": t.get("token", ""), "token_id": t.get("id"), "prob": _exp(t.get("logprob"))}
                   for t in entry.get("top_logprobs") or []]
            yield ServerToken(sample, piece, entry.get("token", ""), entry.get("id"), _exp(entry.get("logprob")),
                              None, top, RAW)
    if not entries and text:
        yield ServerToken(sample, text, text)
    if chunk.get("stop"):
        yield ServerFinish(sample, LLAMA_SERVER_STOPS.get(chunk.get("stop_type") or "", "eos"))

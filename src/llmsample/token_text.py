"""Settings given as text (logit-bias tokens, bans, DRY sequence breakers) turned into a model's token ids.

DRY breakers follow llama.cpp: a breaker text stops a repeat wherever it appears, so every vocabulary token that
contains it becomes a one-token breaker, and a token that ends with the start of it becomes the head of a
multi-token breaker whose tail is the rest of the text, tokenised (at most ``MAX_TAIL`` tokens; texts are cut to
``MAX_CHARS`` characters first).
"""

from __future__ import annotations

import re
from typing import Any, Callable

MAX_CHARS = 40  # llama.cpp's limits on a breaker
MAX_TAIL = 20

_VOCAB_TEXTS: dict[int, list[str]] = {}


# Added tokens shaped like markers rather than text: <unused12>, <|im_start|>, <start_of_image>, [multimodal]. A
# tokenizer converted from GGUF leaves some of them unmarked as special (Gemma 3's image markers), so decoding with
# skip_special_tokens would print them. HTML tags, which Gemma also adds (<table>, <h1>), have no underscore: text.
CONTROL_SHAPE = re.compile(r"<unused\d+>|<\|[^|<>\s]+\|>|<[a-z0-9]+(?:_[a-z0-9]+)+>|\[[a-z_]+\]")


def control_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of added tokens that are control markers but not marked special (never printed as text).

    Special tokens are left out: decoding with ``skip_special_tokens`` already drops them.
    """
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if added is None:  # llmsample's own tokenizer: ask the tokenizers library
        added = tokenizer.backend.get_added_tokens_decoder()
    return frozenset(int(i) for i, token in added.items()
                     if not token.special and CONTROL_SHAPE.fullmatch(str(token.content)))


def decode_text(tokenizer: Any, ids: list[int]) -> str:
    """The text of ``ids`` as a reader sees it: no special tokens, no control markers."""
    hidden = control_token_ids(tokenizer)
    return tokenizer.decode([i for i in ids if i not in hidden], skip_special_tokens=True)


def encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """``text → ids`` without special tokens (no BOS), for either tokenizer llmsample loads."""
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False))


def vocab_texts(tokenizer: Any) -> list[str]:
    """Each token id's text, decoded on its own (cached per tokenizer; one batched call into tokenizers)."""
    key = id(tokenizer)
    if key not in _VOCAB_TEXTS:
        ids = [[i] for i in range(len(tokenizer))]
        backend = getattr(tokenizer, "backend", None) or getattr(tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "decode_batch"):
            _VOCAB_TEXTS[key] = backend.decode_batch(ids, skip_special_tokens=False)
        else:
            _VOCAB_TEXTS[key] = tokenizer.batch_decode(ids)
    return _VOCAB_TEXTS[key]


def breaker_sequences(texts: list[str], vocab: list[str], encode: Callable[[str], list[int]]) -> tuple:
    """llama.cpp's processed breakers for ``texts``: a tuple of token-id tuples (head first).

    >>> breaker_sequences(["ab"], ["a", "b", "xab", "za"], lambda t: [{"a": 0, "b": 1}[c] for c in t])
    ((0, 1), (2,), (3, 1))
    """
    found: dict[tuple[int, ...], None] = {}
    for text in texts:
        text = text[:MAX_CHARS]
        if not text:
            continue
        for token, word in enumerate(vocab):
            if text in word:
                found[(token,)] = None
                continue
            pos = word.find(text[0])
            while pos != -1:
                rest = word[pos:]
                if text.startswith(rest):
                    tail = tuple(encode(text[len(rest):]))[:MAX_TAIL]
                    found[(token, *tail)] = None
                pos = word.find(text[0], pos + 1)
    return tuple(found)


def tokenize_settings(cfg: Any, tokenizer: Any, vocab_size: int) -> Any:
    """``cfg`` with every text setting as token ids for ``tokenizer`` (a clear ``ConfigError`` otherwise).

    DRY's breakers are expanded over the vocabulary (llama.cpp's rule) only when DRY runs.
    """
    from llmsample.errors import ConfigError
    from llmsample.sampling.registry import STAGES

    encode = encoder(tokenizer)
    breakers = cfg.dry_sequence_breakers
    if STAGES["dry"].is_set(cfg) and any(isinstance(b, str) for b in breakers):
        texts = [b for b in breakers if isinstance(b, str)]
        ids = [b for b in breakers if not isinstance(b, str)]
        for text in texts:
            if not encode(text):
                raise ConfigError(f"the DRY sequence breaker {text!r} is no token at all for this model's tokenizer")
        expanded = breaker_sequences(texts, vocab_texts(tokenizer), encode)
        cfg = cfg.replace(dry_sequence_breakers=tuple(ids) + expanded)
    return cfg.tokenized(encode, vocab_size)



def vocab_size(lm: Any) -> int:
    """The model's output width (it may exceed the tokenizer's size: padding rows)."""
    return lm.language_model.vocab_size


def for_model(lm: Any, cfg: Any) -> Any:
    """``cfg`` ready for a ``Sampler`` on the loaded model ``lm``: its text settings as the model's token ids."""
    return tokenize_settings(cfg, lm.tokenizer, vocab_size(lm))

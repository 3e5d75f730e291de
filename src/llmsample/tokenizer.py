"""A tokenizer read straight from ``tokenizer.json`` with the ``tokenizers`` library.

transformers 5 rebuilds a Gemma tokenizer in Python from the same file (about 3.5 s here for Gemma 3's 262k
vocabulary and 515k merges); the Rust library reads it in about 1 s and encodes and decodes identically (the
tests compare both on English, Chinese, special tokens and emoji). It offers the small part of transformers'
tokenizer interface that llmsample uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

# Tokenizer classes whose transformers implementation adds nothing to what tokenizer.json describes.
PLAIN_CLASSES = {"GemmaTokenizer", "GemmaTokenizerFast"}


@dataclass
class Encoding:
    input_ids: Any  # LongTensor [1, tokens]


class FastTokenizer:
    def __init__(self, backend: Any, special_tokens: dict[str, str], chat_template: Optional[str] = None):
        self.backend = backend
        self.chat_template = chat_template  # as transformers' tokenizers keep it (``chat.read_template``)
        self.source: Optional[Path] = None  # the tokenizer.json read (the constraint's token table is keyed by it)
        for name, text in special_tokens.items():  # bos_token, eos_token, …: the texts a chat template uses
            setattr(self, name, text)
        ids = {name: backend.token_to_id(text) for name, text in special_tokens.items()}
        self.bos_token_id: Optional[int] = ids.get("bos_token")
        self.eos_token_id: Optional[int] = ids.get("eos_token")
        self.pad_token_id: Optional[int] = ids.get("pad_token")
        self.unk_token_id: Optional[int] = ids.get("unk_token")

    @classmethod
    def from_folder(cls, folder: Path) -> Optional["FastTokenizer"]:
        """The folder's tokenizer, or ``None`` when only transformers knows how to build it."""
        try:
            settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            if not (folder / "tokenizer.json").is_file():
                return None
        except (OSError, ValueError):
            return None
        if settings.get("tokenizer_class") not in PLAIN_CLASSES or settings.get("clean_up_tokenization_spaces"):
            return None
        special = {key: value for key, value in settings.items()
                   if key.endswith("_token") and isinstance(value, str)}
        from tokenizers import Tokenizer

        from llmsample.chat import read_template

        tokenizer = cls(Tokenizer.from_file(str(folder / "tokenizer.json")), special, read_template(folder))
        tokenizer.source = folder / "tokenizer.json"
        return tokenizer

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, by default with the special tokens the model expects (Gemma: ``<bos>`` first)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, return_tensors: str = "pt") -> Encoding:
        import torch

        return Encoding(torch.tensor([self.encode(text)], dtype=torch.long))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

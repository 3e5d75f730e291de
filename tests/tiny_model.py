"""Tiny random causal LMs built on the fly, saved as real model folders (config, weights, tokenizer)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sampling parameters shape the text a language model writes.",
    "今天天气非常好，我们去公园散步吧。",
    "温度越低，输出越确定；温度越高，输出越多样。",
    "top_k keeps the k most likely tokens; top_p keeps the smallest set whose mass reaches p.",
]


def build_tiny_model(folder: Path, seed: int = 0, vocab_extra: int = 200, init: float = 0.3,
                     context: int = 100_000) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer (multi-byte characters split across tokens)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + vocab_extra,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=fast.vocab_size if hasattr(fast, "vocab_size") else len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=context,
        initializer_range=init,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    config.vocab_size = len(fast)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return folder

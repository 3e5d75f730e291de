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
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    fast = _tiny_tokenizer(folder, vocab_extra)

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


def _tiny_tokenizer(folder: Path, vocab_extra: int = 200, extra_special: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on CORPUS, saved in ``folder`` (multi-byte characters split);
    ``extra_special``: more special tokens (a chat template's turn markers), after the others."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + vocab_extra,
        special_tokens=["<pad>", "<s>", "</s>", *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def tiny_gemma3_config(vocab: int = 300, **overrides):
    """A 3-layer Gemma 3 text config: two sliding-window layers (window 4) and one full-attention layer."""
    from transformers import Gemma3TextConfig

    settings = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                    max_position_embeddings=4096, query_pre_attn_scalar=16, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0)
    settings.update(overrides)
    return Gemma3TextConfig(**settings)


def build_tiny_gemma3(folder: Path, seed: int = 0, extra_special: tuple[str, ...] = (), **overrides) -> Path:
    """A tiny random Gemma 3 (``Gemma3ForCausalLM``, weights as transformers initialises them, then perturbed so
    the norms are not all ones) with the byte-level tokenizer, saved as a model folder."""
    import torch
    from transformers import Gemma3ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    fast = _tiny_tokenizer(folder, extra_special=extra_special)
    torch.manual_seed(seed)
    config = tiny_gemma3_config(vocab=len(fast), bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                                pad_token_id=fast.pad_token_id, **overrides)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    model.save_pretrained(folder)
    return folder


# Chat templates for the tiny models: a plain one (text markers) and Gemma's own shape (its turn tokens, the system
# message folded into the first user turn, alternation checked with raise_exception).
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
GEMMA_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") + message['content'] | trim
       + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""
GEMMA_TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")


def with_chat_template(source: Path, folder: Path, template, tokenizer_class: str | None = None) -> Path:
    """A copy of the model folder ``source`` whose tokenizer_config.json carries ``template`` (a string, or the
    list of named templates); ``tokenizer_class`` replaces the class named there."""
    import json
    import shutil

    shutil.copytree(source, folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    path.write_text(json.dumps(config), encoding="utf-8")
    return folder

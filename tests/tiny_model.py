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


def build_tiny_gguf(path: Path, template: str | None = GEMMA_TEMPLATE, seed: int = 0,
                    special: tuple[str, ...] = GEMMA_TURN_TOKENS) -> Path:
    """A 2-layer Llama as a float32 ``.gguf`` file, written with the ``gguf`` package as llama.cpp's converter
    would: the byte-level BPE vocabulary of ``_tiny_tokenizer`` with the ``special`` tokens after <pad>, <s>, </s>
    (Gemma's turn tokens; all typed CONTROL), ``add_bos_token`` set, and ``template`` as ``tokenizer.chat_template``
    (None: no template). transformers reads it with ``from_pretrained(folder, gguf_file=name)``."""
    import json

    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    fast = _tiny_tokenizer(path.parent / f"{path.stem}-tokenizer", extra_special=special)
    spec = json.loads(fast.backend_tokenizer.to_str())
    control_ids = {t["content"]: t["id"] for t in spec["added_tokens"]}
    ids = {**spec["model"]["vocab"], **control_ids}
    tokens = sorted(ids, key=ids.get)
    assert [ids[t] for t in tokens] == list(range(len(tokens)))  # no gaps: GGUF stores the list, not the ids
    control, normal = 3, 1  # gguf.TokenType values
    hidden, ff, heads, kv_heads, layers = 32, 64, 2, 1, 2
    head_dim = hidden // heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([control if t in control_ids else normal for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(fast.bos_token_id)
    writer.add_eos_token_id(fast.eos_token_id)
    writer.add_pad_token_id(fast.pad_token_id)
    writer.add_add_bos_token(True)
    if template is not None:
        writer.add_chat_template(template)

    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> "np.ndarray":
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    for block in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv_heads * head_dim, hidden)),
                            ("attn_v", (kv_heads * head_dim, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ff, hidden)), ("ffn_up", (ff, hidden)), ("ffn_down", (hidden, ff))):
            writer.add_tensor(f"blk.{block}.{name}.weight", weight(*shape))
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{block}.{norm}.weight", 1 + weight(hidden))
    writer.add_tensor("output_norm.weight", 1 + weight(hidden))
    writer.add_tensor("output.weight", weight(len(tokens), hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

"""A pure-torch Gemma 3 text decoder: the default model's forward without transformers' generic machinery.

It computes what ``transformers``' ``Gemma3ForCausalLM`` computes (same weights, same names, same operations in
the same dtypes; the tests compare logits), with three differences that make it start and run faster here:

- no transformers import (about 2 s of start-up on two cores);
- its own KV cache, grown in blocks, with ``reorder_cache`` for beam search;
- the output projection reads the tied embedding in the layout that multiplies fastest for the batch: on this CPU
  a ``[hidden, vocab]`` copy makes batch 1 and 2 about 1.8x faster than ``[vocab, hidden]`` (MKL's matrix-vector
  path is slow), while batch 3 and up prefer the original. The loader provides the transposed copy when it can.

By default only the last position is projected to logits (``logits`` is ``[batch, 1, vocab]``): decoding needs
nothing else, and it saves a full-vocabulary matmul per prompt token.

Configurations this module does not implement (soft-capping, other RoPE types, bidirectional attention, …) raise
``Unsupported`` from ``Gemma3Config.from_dict``; the loader then falls back to transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

CACHE_BLOCK = 256  # KV cache capacity grows in steps of this many positions
# A long prompt is read in chunks of this many positions, each attending to the cache so far: the attention mask
# and scores of a chunk are [chunk, keys], never [prompt, prompt] (17 GB for Gemma's 32k context).
PREFILL_CHUNK = 512
# A sliding-window layer reads a prompt chunk in blocks of this many queries, each against only the keys its window
# needs (measured, 4,096 tokens, float32, 2 threads: 481 tok/s in one block of 512, 559 in blocks of 128, 572 of 64).
SLIDING_QUERY_BLOCK = 128
ROPE_BLOCK = 4096  # the RoPE table grows in steps of this many positions
TRANSPOSED_HEAD_MAX_BATCH = 2  # measured: [hidden, vocab] is faster up to here, [vocab, hidden] from 3 rows on


class Unsupported(ValueError):
    """The config asks for something this implementation does not compute."""


@dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    query_pre_attn_scalar: float
    sliding_window: int
    sliding: tuple[bool, ...]  # per layer: sliding-window attention (else full)
    rope_theta_full: float
    rope_theta_sliding: float
    rope_factor_full: float  # linear RoPE scaling (1 = none)
    rope_factor_sliding: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_id: Any = None
    bos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Gemma3Config":
        """Read a ``gemma3_text`` config.json (the transformers 4.5x and 5.x spellings); ``Unsupported`` otherwise."""
        if raw.get("model_type") != "gemma3_text":
            raise Unsupported(f"model_type {raw.get('model_type')!r} is not gemma3_text")
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if raw.get(key) is not None:
                raise Unsupported(f"{key} is set")
        if raw.get("use_bidirectional_attention"):
            raise Unsupported("bidirectional attention")
        if raw.get("attention_bias"):
            raise Unsupported("attention bias")
        if raw.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise Unsupported(f"activation {raw.get('hidden_activation')!r}")
        layers = int(raw["num_hidden_layers"])
        types = raw.get("layer_types")
        if types is None:
            pattern = int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6)
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
        if len(types) != layers or set(types) - {"full_attention", "sliding_attention"}:
            raise Unsupported("layer_types")
        full = _rope(raw, "full_attention", raw.get("rope_theta", 1_000_000.0), raw.get("rope_scaling"))
        sliding = _rope(raw, "sliding_attention", raw.get("rope_local_base_freq", 10_000.0), None)
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads", heads))
        if heads % kv_heads:
            raise Unsupported("attention heads not a multiple of key-value heads")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar", 256)),
            sliding_window=int(raw.get("sliding_window") or 4096),
            sliding=tuple(kind == "sliding_attention" for kind in types),
            rope_theta_full=full[0],
            rope_theta_sliding=sliding[0],
            rope_factor_full=full[1],
            rope_factor_sliding=sliding[1],
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            eos_token_id=raw.get("eos_token_id"),
            bos_token_id=raw.get("bos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
        )


def _rope(raw: dict[str, Any], layer_type: str, theta: float, scaling: Optional[dict]) -> tuple[float, float]:
    params = (raw.get("rope_parameters") or {}).get(layer_type)
    if params is None:  # the transformers 4.5x spelling: rope_theta / rope_local_base_freq / rope_scaling
        params = dict(scaling or {}, rope_theta=theta)
        params.setdefault("rope_type", params.get("type", "default"))
    kind = params.get("rope_type", "default")
    if kind == "default":
        return float(params["rope_theta"]), 1.0
    if kind == "linear":
        return float(params["rope_theta"]), float(params["factor"])
    raise Unsupported(f"RoPE type {kind!r}")


class GenerationDefaults:
    """What decode code reads from ``model.generation_config``."""

    def __init__(self, eos_token_id: Any):
        self.eos_token_id = eos_token_id


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [batch, kept positions, vocab]
    past_key_values: "KVCache"
    row_stats: Any = None  # the last position's sampling.row_stats.RowStats, when the compiled kernel computed them


class KVCache:
    """Keys and values of every layer in preallocated ``[batch, kv_heads, capacity, head_dim]`` buffers."""

    def __init__(self, layers: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * layers
        self.values: list[Optional[torch.Tensor]] = [None] * layers
        self.length = 0  # positions stored (the same in every layer once a forward has finished)
        self.fixed = False  # a StaticKVCache never grows

    def get_seq_length(self) -> int:
        return self.length

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``[batch, kv_heads, new, head_dim]`` after the first ``self.length``; return all stored so far."""
        end = self.length + key.shape[2]
        keys, values = self._room(layer, end, key)
        keys[:, :, self.length : end] = key
        values[:, :, self.length : end] = value
        return keys[:, :, :end], values[:, :, :end]

    def reserve(self, end: int, like: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Room for ``end`` positions in every layer, each buffer shaped (and typed) as ``like`` ``[batch,
        kv_heads, any, head_dim]`` along the others: the buffers, for a writer that fills them itself."""
        for layer in range(len(self.keys)):
            self._room(layer, end, like)
        return self.keys, self.values  # type: ignore[return-value]

    def _room(self, layer: int, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        if self.fixed and (keys is None or keys.shape[2] < end):
            raise ValueError(f"the static KV cache holds {self.capacity} positions, {end} asked for")
        if keys is None or keys.shape[2] < end:
            capacity = -(-end // CACHE_BLOCK) * CACHE_BLOCK
            grown_k = like.new_empty(like.shape[0], like.shape[1], capacity, like.shape[3])
            grown_v = like.new_empty(grown_k.shape)
            if keys is not None:
                grown_k[:, :, : self.length] = keys[:, :, : self.length]
                grown_v[:, :, : self.length] = values[:, :, : self.length]
            self.keys[layer], self.values[layer] = keys, values = grown_k, grown_v
        return keys, values

    def reorder_cache(self, order: torch.Tensor) -> None:
        """Beam search: row ``i`` continues from row ``order[i]``."""
        for layer, keys in enumerate(self.keys):
            if keys is not None:
                self.keys[layer] = keys.index_select(0, order.to(keys.device))
                self.values[layer] = self.values[layer].index_select(0, order.to(keys.device))


class StaticKVCache(KVCache):
    """A KV cache of fixed capacity, allocated up front: its buffers never move or grow, and the next position is
    also kept on the device (``position``), so that ``Gemma3ForCausalLM.decode_step`` runs with fixed shapes and
    no host synchronisation (what a CUDA graph needs). The eager forward reads and writes it like a ``KVCache``.
    """

    def __init__(self, config: "Gemma3Config", batch: int, capacity: int, dtype: torch.dtype, device: Any):
        super().__init__(config.num_hidden_layers)
        shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.fixed = True
        self.capacity = capacity
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # == length, on the device
        self.key_positions = torch.arange(capacity, device=device)

    def reset(self) -> None:
        """Empty, for a new sequence: what the old one left is masked off until written again."""
        self.length = 0
        self.position.zero_()

    def reorder_cache(self, order: torch.Tensor) -> None:
        """Beam search, in place: the buffers keep their addresses (a captured step reads them there)."""
        for keys, values in zip(self.keys, self.values):
            keys.copy_(keys.index_select(0, order.to(keys.device)))
            values.copy_(values.index_select(0, order.to(values.device)))

    def sync_position(self) -> None:
        """After an eager forward moved ``length``: the device copy follows (a fill, no read back)."""
        self.position.fill_(self.length)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.gain = torch.ones(dim)  # 1 + weight in float32, made once by ``prepare`` (not at every call)

    def prepare(self) -> None:
        self.gain = 1.0 + self.weight.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same operations in one call (equal bits, measured), fewer dispatches
            return F.rms_norm(x, self.gain.shape, self.gain, self.eps)
        # As transformers: normalise in float32, scale by the float32 gain (1 + w), cast back.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.gain).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: Gemma3Config, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.window = config.sliding_window if config.sliding[layer] else None
        self.scale = config.query_pre_attn_scalar ** -0.5
        hidden = config.hidden_size
        # Kept apart as transformers has them: the weights stay memory-mapped from the file. (Stacked into one
        # product they were copies, 260 MB more for the default model, and decoded no faster here.)
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qkv: Optional[nn.Module] = None  # q, k and v as one product (int8 weights: quantize.attach_fbgemm)

    def _qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Queries and keys normalised and rotated, and values: ``[batch, heads, new, head_dim]`` each."""
        batch, new, _ = x.shape
        if self.qkv is not None:
            q, k, v = self.qkv(x).split((self.heads * self.head_dim,) + (self.kv_heads * self.head_dim,) * 2, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(batch, new, self.heads, self.head_dim).transpose(1, 2))
        k = self.k_norm(k.view(batch, new, self.kv_heads, self.head_dim).transpose(1, 2))
        v = v.view(batch, new, self.kv_heads, self.head_dim).transpose(1, 2)
        return _rotate(q, rope), _rotate(k, rope), v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache) -> torch.Tensor:
        batch, new, _ = x.shape
        q, k, v = self._qkv(x, rope)
        start = cache.length
        keys, values = cache.append(self.layer, k, v)
        # A sliding layer reads a chunk in blocks of queries: each block needs only the keys from its first query's
        # window on (a chunk of 512 against a 512 window would read up to 1,023 keys for every query).
        block = SLIDING_QUERY_BLOCK if self.window is not None else new
        parts = [self._attend(q[:, :, lo : lo + block], keys, values, start + lo) for lo in range(0, new, block)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        out = out.transpose(1, 2).reshape(batch, new, -1)
        return self.o_proj(out)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """Queries ``q`` ``[batch, heads, n, dim]`` at positions ``start…`` against the cached keys they may see
        (causal, and within the window): ``[batch, heads, n, dim]``. Only those keys are read."""
        batch, _, n, _ = q.shape
        group = self.heads // self.kv_heads
        # Query heads that share a key-value head become extra query rows of it: [batch, kv_heads, group*n, dim].
        folded = q.reshape(batch, self.kv_heads, group * n, self.head_dim)
        end = start + n  # the keys up to the last query
        first = max(0, start - self.window + 1) if self.window is not None else 0
        keys, values = keys[:, :, first:end], values[:, :, first:end]
        mask = None  # one query sees every key kept
        if n > 1:
            query_pos = torch.arange(start, end, device=q.device)[:, None]
            key_pos = torch.arange(first, end, device=q.device)[None, :]
            mask = key_pos <= query_pos
            if self.window is not None:
                mask = mask & (key_pos > query_pos - self.window)
            mask = mask.repeat(group, 1)
        out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=self.scale)
        return out.reshape(batch, self.heads, n, self.head_dim)

    def step(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: StaticKVCache,
             mask: torch.Tensor) -> torch.Tensor:
        """One new position (``x``: ``[batch, 1, hidden]``) against the whole static cache: the position to write
        and the keys to attend (``mask``, ``[1, capacity]`` bool) come from device tensors, never from Python."""
        batch = x.shape[0]
        q, k, v = self._qkv(x, rope)
        keys, values = cache.keys[self.layer], cache.values[self.layer]
        keys.index_copy_(2, cache.position, k)
        values.index_copy_(2, cache.position, v)
        q = q.reshape(batch, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
        return self.o_proj(out.reshape(batch, 1, -1))


def _inv_freqs(config: Gemma3Config, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE inverse frequencies (float32) of full and sliding layers, as transformers computes them."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float, device="cpu") / config.head_dim
    full = 1.0 / (config.rope_theta_full ** exponents) / config.rope_factor_full
    sliding = 1.0 / (config.rope_theta_sliding ** exponents) / config.rope_factor_sliding
    return full.to(device), sliding.to(device)


def _rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE as transformers applies it, ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x) * sin`` is
    computed as ``roll(x, half) * signed_sin`` (sin with its first half negated): the same products and signs,
    so the same bits, in four operations instead of seven (each costs microseconds per layer when decoding)."""
    cos, signed_sin = rope
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class MLP(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up: Optional[nn.Module] = None  # gate and up as one product (quantize.attach_fbgemm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: Gemma3Config, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def step(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: StaticKVCache,
             mask: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn.step(self.input_layernorm(x), rope, cache, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Embedding(nn.Module):
    """The token embedding, also the output projection when tied; optionally held transposed as well."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = vocab, hidden
        self.weight = nn.Parameter(torch.empty(vocab, hidden), requires_grad=False)
        self.weight_t: Optional[torch.Tensor] = None  # [hidden, vocab], the same values

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Gemma3Model(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma3ForCausalLM(nn.Module):
    """Called like a transformers causal LM: ``model(input_ids=, past_key_values=, use_cache=True)``.

    >>> cfg = Gemma3Config.from_dict({"model_type": "gemma3_text", "vocab_size": 16, "hidden_size": 8,
    ...     "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    ...     "head_dim": 4, "sliding_window": 2})
    >>> model = Gemma3ForCausalLM(cfg)
    >>> out = model(input_ids=torch.tensor([[1, 2, 3]]))
    >>> tuple(out.logits.shape), out.past_key_values.get_seq_length()
    ((1, 1, 16), 3)
    """

    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.generation_config = GenerationDefaults(config.eos_token_id)
        self.model = Gemma3Model(config)
        self.lm_head: Optional[nn.Linear] = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.inv_freq_full, self.inv_freq_sliding = _inv_freqs(config, "cpu")
        self._rope_table: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}  # sliding? → cos, signed sin
        self.kernel_step: Any = None  # int8 weights on the CPU: one position in compiled code (decode_kernel)
        if not self.model.norm.weight.is_meta:  # an op on meta tensors imports torch's decompositions (≈1.4 s)
            self.prepare()

    def prepare(self) -> None:
        """Derive what the forward reads from the weights (the norms' gains); again after the weights change."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.prepare()
        self._rope_table = {}

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def get_input_embeddings(self) -> Embedding:
        return self.model.embed_tokens

    def _rope(self, sliding: bool, start: int, new: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and signed sin (see ``_rotate``) ``[new, head_dim]`` for positions ``start…start+new-1``,
        from a table of every position so far (grown in blocks; each entry computed as transformers computes it)."""
        table = self._rope_table.get(sliding)
        if table is None or table[0].shape[0] < start + new or table[0].dtype != dtype:
            inv_freq = self.inv_freq_sliding if sliding else self.inv_freq_full
            length = -(-(start + new) // ROPE_BLOCK) * ROPE_BLOCK
            positions = torch.arange(length, device=inv_freq.device)
            freqs = positions[:, None].float() * inv_freq[None, :].float()
            emb = torch.cat((freqs, freqs), dim=-1)
            sin = emb.sin().to(dtype)
            sin[:, : sin.shape[1] // 2].neg_()
            self._rope_table[sliding] = table = (emb.cos().to(dtype), sin)
        return table[0][start : start + new], table[1][start : start + new]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[rows, hidden]`` to logits ``[rows, vocab]``."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        embed = self.model.embed_tokens
        if embed.weight_t is not None and hidden.shape[0] <= TRANSPOSED_HEAD_MAX_BATCH:
            return hidden @ embed.weight_t
        return F.linear(hidden, embed.weight)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embed = self.model.embed_tokens
        # As transformers: the scale is a float32 tensor cast to the weights' dtype before the multiply.
        return embed(input_ids) * torch.tensor(self.config.hidden_size ** 0.5).to(embed.weight.dtype)

    def _decoder(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The decoder layers over ``input_ids`` ``[batch, new]`` after the cache: hidden states ``[batch, new,
        hidden]`` (before the final norm); the cache grows by ``new``."""
        x = self._embed(input_ids)
        rope = {sliding: self._rope(sliding, cache.length, input_ids.shape[1], x.dtype) for sliding in (True, False)}
        for layer, sliding in zip(self.model.layers, self.config.sliding):
            x = layer(x, rope[sliding], cache)
        cache.length += input_ids.shape[1]
        return x

    def static_cache(self, batch: int, capacity: int) -> StaticKVCache:
        """A cache of ``capacity`` positions for ``batch`` rows, with the RoPE table made for all of them (so that
        ``decode_step`` only reads it)."""
        cache = StaticKVCache(self.config, batch, capacity, self.dtype, self.device)
        for sliding in (True, False):
            self._rope(sliding, 0, capacity, self.dtype)
        return cache

    @torch.inference_mode()
    def decode_step(self, input_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """Logits ``[batch, vocab]`` after one new token per row (``input_ids`` ``[batch, 1]``) at
        ``cache.position``, which then moves on by one.

        Fixed shapes and no host synchronisation: the position is a device tensor, the cache is attended in full
        under a mask, and the rope table is indexed on the device. So the step can be captured as a CUDA graph
        and replayed; on the CPU it gives the eager forward's logits (the test compares them token for token).
        The host's ``cache.length`` is moved too, without reading the device.
        """
        x = self._embed(input_ids)
        seen = (cache.key_positions <= cache.position)[None, :]  # [1, capacity]: one query row against every key
        masks = {False: seen, True: seen & (cache.key_positions > cache.position - self.config.sliding_window)}
        rope = {}
        for sliding in (True, False):
            cos, signed_sin = self._rope_table[sliding]
            rope[sliding] = cos.index_select(0, cache.position), signed_sin.index_select(0, cache.position)
        for layer, sliding in zip(self.model.layers, self.config.sliding):
            x = layer.step(x, rope[sliding], cache, masks[sliding])
        cache.position.add_(1)
        cache.length += 1
        return self.project(self.model.norm(x).reshape(-1, x.shape[-1]))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, past_key_values: Optional[KVCache] = None, use_cache: bool = True,
                logits_to_keep: int = 1, progress: Optional[Callable[[int, int], None]] = None,
                **_: Any) -> ForwardOutput:
        """Logits of the last ``logits_to_keep`` positions (0 = all, as in transformers; perplexity needs them).

        ``progress(done, total)`` hears of every chunk of a long input read.
        """
        cache = past_key_values if past_key_values is not None else KVCache(self.config.num_hidden_layers)
        batch, new = input_ids.shape
        stepped = None
        if self.kernel_step is not None and self.kernel_step.takes(input_ids, logits_to_keep):
            stepped = self.kernel_step.step(input_ids, cache)
        if stepped is not None:
            logits, stats = stepped
            if isinstance(cache, StaticKVCache):
                cache.sync_position()
            if progress is not None:  # a short prompt is read in one call: there is only the end to report
                progress(new, new)
            return ForwardOutput(logits=logits.view(batch, 1, -1), past_key_values=cache, row_stats=stats)
        keep = min(logits_to_keep, new) if logits_to_keep else new
        kept = []  # the hidden states of the last ``keep`` positions, chunk by chunk
        for start in range(0, new, PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, new)
            x = self._decoder(input_ids[:, start:end], cache)
            if end > new - keep:
                kept.append(x[:, max(start, new - keep) - start :])
            if progress is not None:
                progress(end, new)
        if isinstance(cache, StaticKVCache):
            cache.sync_position()
        x = kept[0] if len(kept) == 1 else torch.cat(kept, dim=1)
        hidden = self.model.norm(x).reshape(-1, x.shape[-1])
        logits = self.project(hidden).view(batch, keep, -1)
        stats = None
        if keep == 1 and self.kernel_step is not None:  # the first token's sampler gets them as every later one does
            stats = self.kernel_step.stats(logits.view(batch, -1))
        return ForwardOutput(logits=logits, past_key_values=cache, row_stats=stats)


def load_native(state_dict: dict[str, torch.Tensor], config: Gemma3Config, dtype: torch.dtype,
                device: str = "cpu", embed_t: Optional[torch.Tensor] = None,
                transposed_head: bool = True) -> Gemma3ForCausalLM:
    """Build the model around ``state_dict`` (tensors taken as they are when dtype and device already match).

    ``embed_t`` is the embedding transposed (``[hidden, vocab]``); on the CPU it is made here when not given,
    unless ``transposed_head`` is false (a model about to be quantized has no use for it).
    """
    with torch.device("meta"):
        model = Gemma3ForCausalLM(config)
    weights = {name: tensor.to(device=device, dtype=dtype) for name, tensor in state_dict.items()
               if name != "lm_head.weight" or not config.tie_word_embeddings}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        raise Unsupported(f"weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.inv_freq_full, model.inv_freq_sliding = _inv_freqs(config, device)
    model.prepare()
    embed = model.model.embed_tokens
    if transposed_head and config.tie_word_embeddings and torch.device(device).type == "cpu":
        embed.weight_t = embed_t.to(dtype) if embed_t is not None else transpose_blocked(embed.weight.data)
    return model.eval()


def transpose_blocked(matrix: torch.Tensor, rows: int = 8192) -> torch.Tensor:
    """``matrix.t().contiguous()`` in row blocks: about 4x faster on a large matrix (cache-friendly)."""
    out = matrix.new_empty(matrix.shape[1], matrix.shape[0])
    for start in range(0, matrix.shape[0], rows):
        out[:, start : start + rows].copy_(matrix[start : start + rows].t())
    return out

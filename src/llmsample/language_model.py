"""The one contract between the decode loops and a model: ``LanguageModel``.

decode.py, lab.py and the benchmarks run a model only through it; every engine meets it:

- ``forward(input_ids, cache, progress)``: read ``input_ids`` ``[batch, new]`` after what ``cache`` holds (``None``
  starts one) and return the logits of the last position, ``[batch, vocab]``, with the cache grown by ``new``;
  ``progress(done, total)`` hears how far a long input has been read (at least once, at the end);
- ``all_logits(input_ids)``: the logits of every position, ``[batch, length, vocab]`` (perplexity, benchmarks);
- ``reorder(cache, order)``: beam search, row ``i`` continues from row ``order[i]``;
- ``row_stats(logits)``: the ``sampling.row_stats.RowStats`` of logits the last ``forward`` returned, where the
  engine computed them as it wrote the logits (else None: the sampler computes what it needs);
- ``eos_token_ids``, ``context_length``, ``vocab_size``, ``device``, ``dtype``.

The two engines here are llmsample's own Gemma 3 (``gemma3.py``) and any transformers causal LM. A serving engine
reached over HTTP would meet the same contract.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

Progress = Callable[[int, int], None]

import torch


class LanguageModel:
    """A causal LM behind the contract. ``wrap(module)`` picks the adapter for a loaded module.

    >>> from llmsample import gemma3
    >>> cfg = gemma3.Gemma3Config.from_dict({"model_type": "gemma3_text", "vocab_size": 16, "hidden_size": 8,
    ...     "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    ...     "head_dim": 4, "sliding_window": 2, "eos_token_id": [1, 2]})
    >>> lm = wrap(gemma3.Gemma3ForCausalLM(cfg))
    >>> logits, cache = lm.forward(torch.tensor([[3, 4, 5]]))
    >>> tuple(logits.shape), lm.cache_length(cache), lm.eos_token_ids, lm.context_length
    ((1, 16), 3, (1, 2), 32768)
    >>> tuple(lm.all_logits(torch.tensor([[3, 4, 5]])).shape)
    (1, 3, 16)
    """

    engine = "abstract"

    def __init__(self, module: Any):
        self.module = module

    # ---- what the model is ----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    @property
    def config(self) -> Any:
        """The model's (text) config, for estimates such as the KV cache's size."""
        config = getattr(self.module, "config", None)
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def vocab_size(self) -> int:
        """The logits' width (it may exceed the tokenizer's size: padding rows)."""
        size = getattr(self.config, "vocab_size", None)
        return size if isinstance(size, int) and size > 0 else int(self.module.get_input_embeddings().num_embeddings)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a sequence, from the model's generation config (the tokenizer may add its own)."""
        value = getattr(getattr(self.module, "generation_config", None), "eos_token_id", None)
        if value is None:
            value = getattr(self.config, "eos_token_id", None)
        if isinstance(value, int):
            return (value,)
        return tuple(sorted({int(v) for v in value})) if value else ()

    @property
    def context_length(self) -> Optional[int]:
        """The longest sequence the model was built for, if its config says."""
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    # ---- running it ----------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, cache: Any = None,
                progress: Optional[Progress] = None) -> tuple[torch.Tensor, Any]:
        """Last-position logits ``[batch, vocab]`` after ``input_ids``, and the cache grown by them."""
        raise NotImplementedError

    def all_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of every position of ``input_ids``, ``[batch, length, vocab]`` (no cache kept)."""
        raise NotImplementedError

    def row_stats(self, logits: torch.Tensor) -> Any:
        """The ``RowStats`` of ``logits`` when they are what the last ``forward`` returned and the engine computed
        them with it; else None."""
        return None

    def stepwise_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``all_logits`` computed as decoding computes them: one position at a time through the cache (an int8
        model decodes through other kernels than it reads a prompt with; its quality is measured here)."""
        cache, rows = None, []
        for position in range(input_ids.shape[1]):
            logits, cache = self.forward(input_ids[:, position : position + 1], cache)
            rows.append(logits)
        return torch.stack(rows, dim=1)

    def new_cache(self, batch: int, capacity: int) -> Any:
        """A cache of fixed ``capacity`` for ``batch`` rows where the engine has one (else None: the forward
        starts a growing one)."""
        return None

    def reorder(self, cache: Any, order: torch.Tensor) -> Any:
        """Beam search: row ``i`` of the cache continues from row ``order[i]``; returns the cache."""
        cache.reorder_cache(order)
        return cache

    @staticmethod
    def cache_length(cache: Any) -> int:
        return 0 if cache is None else int(cache.get_seq_length())


class NativeModel(LanguageModel):
    """llmsample's pure-torch Gemma 3 (``gemma3.Gemma3ForCausalLM``): its own KV cache, no transformers.

    With ``fixed_step`` (the default on CUDA) a cache from ``new_cache`` is static and each one-token forward runs
    ``decode_step`` (fixed shapes, no host synchronisation), captured once as a CUDA graph and replayed on CUDA.
    On the CPU the eager forward is faster (it attends only the positions filled), so it is used there.
    """

    engine = "llmsample"

    def __init__(self, module: Any, fixed_step: Optional[bool] = None):
        super().__init__(module)
        self.fixed_step = module.device.type == "cuda" if fixed_step is None else fixed_step
        self.cuda_graphs = module.device.type == "cuda"
        self._graph: Any = None  # (cache, graph, input ids buffer, logits buffer) of the captured step
        self._spare: Any = None  # the last static cache handed out
        self._last: Any = None  # (logits, RowStats) of the last forward, when the compiled kernel computed them

    def new_cache(self, batch: int, capacity: int) -> Any:
        """A static cache; the last one again (emptied) when its shape fits, so a captured graph stays valid."""
        if not self.fixed_step:
            return None
        spare = self._spare
        if spare is not None and spare.keys[0].shape[0] == batch and spare.capacity == capacity:
            spare.reset()
            return spare
        self._spare = self.module.static_cache(batch, capacity)
        return self._spare

    def forward(self, input_ids: torch.Tensor, cache: Any = None,
                progress: Optional[Progress] = None) -> tuple[torch.Tensor, Any]:
        from llmsample.gemma3 import StaticKVCache

        self._last = None
        if self.fixed_step and isinstance(cache, StaticKVCache) and input_ids.shape[1] == 1:
            if not self.cuda_graphs:
                return self.module.decode_step(input_ids, cache), cache
            return self._replay(input_ids, cache), cache
        out = self.module(input_ids=input_ids, past_key_values=cache, logits_to_keep=1, progress=progress)
        logits = out.logits[:, -1, :]
        self._last = None if out.row_stats is None else (logits, out.row_stats)
        return logits, out.past_key_values

    def row_stats(self, logits: torch.Tensor) -> Any:
        last = self._last
        return last[1] if last is not None and last[0] is logits else None

    def _replay(self, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """The decode step as a CUDA graph, captured at the first step of each cache and replayed after."""
        if self._graph is None or self._graph[0] is not cache:
            self._graph = None
            ids = input_ids.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's CUDA graph notes ask
                self.module.decode_step(ids, cache)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.module.decode_step(ids, cache)
            # The warm-up wrote this position and both runs moved the host's length on: undo that (the replay
            # below writes the position again with the real token).
            cache.position.sub_(1)
            cache.length -= 2
            self._graph = (cache, graph, ids, logits)
        _, graph, ids, logits = self._graph
        ids.copy_(input_ids)
        graph.replay()
        cache.length += 1
        return logits

    def all_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.module(input_ids=input_ids, logits_to_keep=0).logits


class TransformersModel(LanguageModel):
    """Any transformers causal LM; the forward's keywords are read off its signature once."""

    engine = "transformers"

    def __init__(self, module: Any):
        super().__init__(module)
        parameters = inspect.signature(module.forward).parameters
        # transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (the old name warns).
        self.cache_keyword = "cache" if "cache" in parameters else "past_key_values"
        # Only the last position's logits: otherwise a prompt's forward returns [batch, prompt, vocab].
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    def forward(self, input_ids: torch.Tensor, cache: Any = None,
                progress: Optional[Progress] = None) -> tuple[torch.Tensor, Any]:
        with torch.inference_mode():
            out = self.module(input_ids=input_ids, use_cache=True, **{self.cache_keyword: cache}, **self._keep_last)
        if progress is not None:  # read in one forward: there is only the end to report
            progress(input_ids.shape[1], input_ids.shape[1])
        return out.logits[:, -1, :], out.past_key_values

    def all_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(input_ids=input_ids, use_cache=False).logits


def wrap(module: Any) -> LanguageModel:
    """The adapter for ``module``; a ``LanguageModel`` is returned as it is."""
    if isinstance(module, LanguageModel):
        return module
    from llmsample import gemma3

    return NativeModel(module) if isinstance(module, gemma3.Gemma3ForCausalLM) else TransformersModel(module)

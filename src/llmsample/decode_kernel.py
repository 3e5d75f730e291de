"""The compiled decoding step of int8 Gemma 3 models on the CPU (``decode_kernel.c``): build, cache, bind.

The C file is compiled at first use with the system C compiler (``$CC``, else ``cc`` or ``gcc``) for this CPU
(``-march=native``) and kept in ``$XDG_CACHE_HOME/llmsample/kernels/``, named by a hash of everything that shapes
the binary (source, compiler, flags, CPU features), so a new compiler or CPU builds a new one. Beside it a
checksum: a damaged file is built again (one line on stderr), never loaded. Where no compiler works, or
``LLMSAMPLE_NO_KERNEL=1`` is set, ``load`` returns None and the eager torch path decodes (slower, same weights).

>>> lib = load()
>>> lib is None or lib.kernel_abi() == KERNEL_ABI
True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch

SOURCE = Path(__file__).with_name("decode_kernel.c")
KERNEL_ABI = 6  # decode_kernel.c's KERNEL_ABI: the structs below match that version
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
PRODUCTS_PER_LAYER = 7  # q, k, v, o, gate, up, down (decode_kernel.c's enum)
NORMS_PER_LAYER = 6  # input, post-attention, pre-feedforward, post-feedforward, q, k
DISABLE_VARIABLE = "LLMSAMPLE_NO_KERNEL"

_loaded: dict[str, Optional[ctypes.CDLL]] = {}
_lock = threading.Lock()


class Product(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("rowsum", ctypes.c_void_p),
                ("out", ctypes.c_int32), ("in_", ctypes.c_int32)]


class Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in
                ("hidden", "intermediate", "heads", "kv_heads", "head_dim", "layers", "window", "vocab")] + [
        ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float),
        ("sliding", ctypes.c_void_p), ("gains", ctypes.c_void_p), ("products", ctypes.c_void_p),
        ("final_gain", ctypes.c_void_p), ("head", Product), ("head_channel_scale", ctypes.c_void_p),
        ("embedding", ctypes.c_void_p), ("rescore_chunk", ctypes.c_int32), ("rescore_chunks", ctypes.c_int32)]


class RowStatsOut(ctypes.Structure):
    _fields_ = [("values", ctypes.c_void_p), ("argmax", ctypes.c_void_p), ("maxima", ctypes.c_void_p),
                ("top_values", ctypes.c_void_p), ("top_columns", ctypes.c_void_p)]


def _compiler() -> Optional[str]:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc")):
        path = shutil.which(name)
        if path:
            return path
    return None


def _fingerprint(compiler: str) -> Optional[str]:
    """A hash of what decides the binary; None when the compiler does not answer."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        cpu = Path("/proc/cpuinfo").read_text(errors="replace")
        flags = next((line for line in cpu.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    digest = hashlib.sha256()
    parts = (SOURCE.read_bytes(), version.encode(), " ".join(FLAGS).encode(), flags.encode(),
             torch.__version__.encode())
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:24]


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(compiler: str, target: Path) -> bool:
    """Compile into ``target`` (through a file beside it, renamed: another process never sees half of it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", partial, str(SOURCE), "-lm"], capture_output=True,
                                text=True, timeout=300)
        if result.returncode != 0:
            return False
        Path(partial + ".sha256").write_text(_checksum(Path(partial)))
        os.replace(partial + ".sha256", str(target) + ".sha256")
        os.replace(partial, target)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        for leftover in (partial, partial + ".sha256"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def unavailable_reason() -> Optional[str]:
    """Why ``load`` gives None here, in a few words (for ``--stats``); None when it gives the library."""
    if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
        return f"{DISABLE_VARIABLE} is set"
    if _compiler() is None:
        return "no C compiler: $CC, cc or gcc"
    return None if load() is not None else "the kernel did not build here"


def load(report: Optional[Callable[[str], None]] = None) -> Optional[ctypes.CDLL]:
    """The kernel library, built on first use; None where it cannot be (no compiler, disabled, build failed).

    ``report`` hears of a build (about a second); a damaged cached build is replaced with one line on stderr.
    """
    if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
        return None
    compiler = _compiler()
    if compiler is None or not SOURCE.is_file():
        return None
    with _lock:
        fingerprint = _fingerprint(compiler)
        if fingerprint is None:
            return None
        if fingerprint in _loaded:
            return _loaded[fingerprint]
        from llmsample.models import cache_root

        target = cache_root() / "kernels" / f"decode-{fingerprint}.so"
        recorded = Path(str(target) + ".sha256")
        if target.is_file():
            try:
                intact = recorded.read_text().strip() == _checksum(target)
            except OSError:
                intact = False
            if not intact:
                print(f"llmsample: the compiled decode kernel {target} is damaged; building it again",
                      file=sys.stderr)
                target.unlink(missing_ok=True)
        if not target.is_file():
            if report:
                report("compiling the decode kernel for this CPU (once)")
            if not _build(compiler, target):
                _loaded[fingerprint] = None
                return None
        try:
            lib = ctypes.CDLL(str(target))
            if lib.kernel_abi() != KERNEL_ABI:
                raise OSError("another ABI")
        except OSError:
            _loaded[fingerprint] = None
            return None
        lib.decode_step.restype = ctypes.c_int
        lib.decode_step.argtypes = ([ctypes.POINTER(Model)] + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 8
                                    + [ctypes.POINTER(RowStatsOut)])
        lib.project.restype = ctypes.c_int
        lib.project.argtypes = [ctypes.POINTER(Model), ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.logits_stats.restype = ctypes.c_int
        lib.logits_stats.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.POINTER(RowStatsOut)]
        lib.stats_chunk.restype = ctypes.c_int
        lib.stats_top.restype = ctypes.c_int
        _loaded[fingerprint] = lib
        return lib


def _ptr(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


def row_stats(lib: ctypes.CDLL, logits: torch.Tensor) -> Any:
    """The ``RowStats`` of float32 ``logits`` ``[batch, vocab]`` as the kernel's step computes them for its own.

    >>> lib = load()
    >>> lib is None or row_stats(lib, torch.tensor([[0.0, 2.0, 2.0, -1.0]])).argmax.tolist() == [1]
    True
    """
    logits = logits.float().contiguous()
    out = _StatsOut(lib, *logits.shape)
    return out.read(lib.logits_stats(torch.get_num_threads(), logits.shape[0], logits.shape[1], _ptr(logits),
                                     ctypes.byref(out.struct)))


class _StatsOut:
    """The buffers the C side writes a step's ``RowStats`` into (``RowStatsOut``), read as they are."""

    def __init__(self, lib: ctypes.CDLL, batch: int, vocab: int):
        self.values = torch.empty(batch, 3)  # the largest logit, the logsumexp, the entropy
        self.argmax = torch.empty(batch, dtype=torch.long)
        self.maxima = torch.empty(batch, vocab // lib.stats_chunk())
        listed = min(lib.stats_top(), vocab)
        self.top_values = torch.empty(batch, listed)
        self.top_columns = torch.empty(batch, listed, dtype=torch.long)
        self.struct = RowStatsOut(_ptr(self.values), _ptr(self.argmax), _ptr(self.maxima), _ptr(self.top_values),
                                  _ptr(self.top_columns))

    def read(self, status: int) -> Any:
        """``RowStats`` after the call that returned ``status`` (-1: out of memory; else the unusable rows)."""
        from llmsample.sampling.row_stats import RowStats

        if status < 0:
            raise MemoryError("the decode kernel could not allocate its working memory")
        values = self.values
        return RowStats(values[:, 0:1], self.argmax, values[:, 1:2], values[:, 2], self.maxima, status == 0,
                        self.top_values, self.top_columns)


class KernelStep:
    """One decoding position of a quantized llmsample ``gemma3`` model (``quantize.Int8Linear`` layers and an
    ``Int8Head``) through the compiled kernel: ``step(input_ids, cache)`` → logits ``[batch, vocab]``.

    It holds what the C side reads (the weights' row sums, the norms' gains, pointers) and keeps every tensor it
    points at alive. The model's own modules stay as they are (prompts are read by the eager forward).
    """

    def __init__(self, lib: ctypes.CDLL, model: Any):
        cfg = model.config
        self.lib, self.model = lib, model
        self._keep: list[Any] = []  # tensors and ctypes arrays the C structs point into
        layers = model.model.layers
        products = (Product * (PRODUCTS_PER_LAYER * len(layers)))()
        gains = (ctypes.c_void_p * (NORMS_PER_LAYER * len(layers)))()
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                       mlp.down_proj)
            for j, linear in enumerate(linears):
                products[i * PRODUCTS_PER_LAYER + j] = self._product(linear)
            norms = (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                     layer.post_feedforward_layernorm, attn.q_norm, attn.k_norm)
            for j, norm in enumerate(norms):
                gains[i * NORMS_PER_LAYER + j] = _ptr(self._kept(norm.gain.float().contiguous()))
        head = model.lm_head
        sliding = self._kept(torch.tensor(cfg.sliding, dtype=torch.uint8))
        from llmsample.quantize import RESCORE_CHUNK, RESCORE_CHUNKS

        embedding = model.get_input_embeddings().weight
        exact = embedding.dtype == torch.float32 and embedding.is_contiguous() and head.exact_weight is not None
        self.struct = Model(
            hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, layers=cfg.num_hidden_layers,
            window=cfg.sliding_window, vocab=cfg.vocab_size, eps=cfg.rms_norm_eps,
            attn_scale=cfg.query_pre_attn_scalar ** -0.5, sliding=_ptr(sliding), gains=ctypes.addressof(gains),
            products=ctypes.addressof(products),
            final_gain=_ptr(self._kept(model.model.norm.gain.float().contiguous())),
            head=self._product(head), head_channel_scale=_ptr(self._kept(head.channel_scale.contiguous())),
            embedding=_ptr(embedding) if exact else None, rescore_chunk=RESCORE_CHUNK,
            rescore_chunks=RESCORE_CHUNKS)
        self._keep += [products, gains]

    def _kept(self, tensor: torch.Tensor) -> torch.Tensor:
        self._keep.append(tensor)
        return tensor

    def _product(self, linear: Any) -> Product:
        weight = linear.int8_weight
        assert weight.dtype == torch.int8 and weight.is_contiguous()
        rowsum = self._kept(weight.sum(dim=1, dtype=torch.int32))
        scales = self._kept(linear.scales.float().contiguous())
        return Product(_ptr(weight), _ptr(scales), _ptr(rowsum), weight.shape[0], weight.shape[1])

    def stats(self, logits: torch.Tensor) -> Any:
        """The ``RowStats`` of logits this model's torch path wrote (the prompt's last position), as a step of the
        kernel computes them for its own."""
        return row_stats(self.lib, logits)

    def takes(self, input_ids: torch.Tensor, logits_to_keep: int) -> bool:
        """Whether ``step`` computes this forward: the last position's logits of one new position per row, or of
        a few (a short prompt; from ``quantize.BF16_PRODUCT_ROWS`` rows on the eager bfloat16 products are faster)."""
        from llmsample.quantize import BF16_PRODUCT_ROWS

        batch, new = input_ids.shape
        return (logits_to_keep == 1 and input_ids.device.type == "cpu" and new > 0
                and (new == 1 or batch * new < BF16_PRODUCT_ROWS))

    def step(self, input_ids: torch.Tensor, cache: Any) -> Optional[tuple[torch.Tensor, Any]]:
        """Logits ``[batch, vocab]`` (float32) of each row's last position after the new tokens ``input_ids``
        ``[batch, new]`` at ``cache.length`` on, and their ``RowStats``; the cache holds them afterwards. None
        (nothing done) where the cache's buffers are not the float32 ``[batch, kv_heads, capacity, head_dim]``
        blocks the kernel writes."""
        model, cfg = self.model, self.model.config
        batch, new = input_ids.shape
        x = model._embed(input_ids).float().contiguous()
        start = cache.length
        like = x.new_empty(batch, cfg.num_key_value_heads, 0, cfg.head_dim)
        keys, values = cache.reserve(start + new, like)
        capacity = keys[0].shape[2]
        expected = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        for buffer in (*keys, *values):  # what the C side assumes of every buffer it writes into
            if buffer.shape != expected or buffer.dtype != torch.float32 or not buffer.is_contiguous():
                return None
        rope = [[part.contiguous() for part in model._rope(sliding, start, new, torch.float32)]
                for sliding in (True, False)]
        logits = torch.empty(batch, cfg.vocab_size)
        stats = _StatsOut(self.lib, batch, cfg.vocab_size)
        key_ptrs = (ctypes.c_void_p * len(keys))(*[k.data_ptr() for k in keys])
        value_ptrs = (ctypes.c_void_p * len(values))(*[v.data_ptr() for v in values])
        status = self.lib.decode_step(ctypes.byref(self.struct), torch.get_num_threads(), batch, new, start,
                                      capacity, _ptr(x), key_ptrs,
                                      value_ptrs, _ptr(rope[0][0]), _ptr(rope[0][1]), _ptr(rope[1][0]),
                                      _ptr(rope[1][1]), _ptr(logits), ctypes.byref(stats.struct))
        row_stats = stats.read(status)
        cache.length = start + new
        return logits, row_stats

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm and the output projection of ``hidden`` ``[batch, hidden]`` as ``step`` computes them:
        logits ``[batch, vocab]``."""
        hidden = hidden.float().contiguous()
        logits = torch.empty(hidden.shape[0], self.model.config.vocab_size)
        if self.lib.project(ctypes.byref(self.struct), torch.get_num_threads(), hidden.shape[0], _ptr(hidden),
                            _ptr(logits)) != 0:
            raise MemoryError("the decode kernel could not allocate its working memory")
        return logits

"""``--quantize int8``: int8 weights, one scale per output channel, float32 between the products (CPU).

Chosen by measurement on this project's 2-core CPU (Gemma 3 270M; perplexity on the benchmark's fixed English and
Chinese texts, float32 = 24.24 and 73.73; decode tok/s, greedy, batch 1):

- int8 weights with dynamically quantized int8 activations (torch's fbgemm ``quantized::linear_dynamic``, what
  ``quantize_dynamic`` builds): about 45 tok/s, but perplexity +10% / +17%, even with every token quantized on
  its own; the model's activations have outlier channels that 7-bit activations cannot hold (8-bit ones may
  overflow fbgemm's 16-bit accumulation).
- torchao 0.18's ``Int8DynamicActivationInt8WeightConfig`` without ``torch.compile``: 3 tok/s.
- int8 weights with bfloat16 activations (``torch._weight_int8pack_mm``), everything else in float32: about
  30 tok/s, perplexity +0.5% / +2.7%. Used for the decoder layers: the text stays the model's.
- The output projection (262,144 x 640, 62% of the weights) dominated that: ``_weight_int8pack_mm`` reads it at
  about 12 GB/s (17 ms a token), where fbgemm's int8 x int8 product reaches about 40 GB/s (4-5 ms). Its 7-bit
  activations are what cost fbgemm the quality, so ``Int8Head`` gives it each activation row twice: rounded to
  7 bits, and the rounding error scaled up and rounded again, about 14 bits together (finer than bfloat16's 8)
  for one weight read. Its weights are quantized after scaling input channel ``j`` by ``|gain_j| ** 0.2``, the
  final norm's gain (activation-aware, as AWQ; the input is divided by the same): the norm's gains span 0.19 to
  301, and the exponent 0.2 gave the lowest KL divergence from float32 on a calibration text that is not the
  benchmark's (``benchmarks/calibrate_head.py``: mean KL 0.0033 against 0.0074 unscaled). Together: 40-44
  tok/s, perplexity -0.1% / +1.4% (``benchmarks/bench_generate.py``).

Every ``nn.Linear`` is replaced, the output projection included (untied from the embedding, which stays in
float32 for the lookup). The int8 values and scales are plain tensors, so a cache maps them back in at once.
Where torch lacks fbgemm's quantized kernels (another CPU architecture, a future torch), the head falls back to
``_weight_int8pack_mm`` with the same weights.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Optional

import torch
from torch import nn

# From this many rows on (reading a prompt) an int8 layer multiplies in bfloat16 instead (measured on this 2-core
# AVX-512 BF16 CPU with 512 rows: about 7 ms against 38 ms for a 2048 x 640 layer).
BF16_PRODUCT_ROWS = 16
HEAD_GAIN_EXPONENT = 0.2  # see the module notes: chosen by benchmarks/calibrate_head.py
_FINE_STEPS = 126  # the second part holds the first's rounding error (within ±0.5) times this: within ±63


class Int8Linear(nn.Module):
    """``y = x @ (int8 * scale).T``, with ``x`` rounded to bfloat16 for the product and ``y`` in ``x``'s dtype."""

    def __init__(self, int8_weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = int8_weight.shape[1], int8_weight.shape[0]
        self.register_buffer("int8_weight", _aligned(int8_weight))
        self.register_buffer("scales", scales.float())
        self._scales_bf16 = scales.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if rows.shape[0] >= BF16_PRODUCT_ROWS:
            # Many rows (a prompt's chunk): compute-bound, where oneDNN's bfloat16 product runs about 5x faster
            # than the int8 kernel here. The int8 values are exact in bfloat16; the scales apply after, in float32.
            y = torch.nn.functional.linear(rows, self.int8_weight.to(torch.bfloat16)).float() * self.scales
        else:
            y = torch._weight_int8pack_mm(rows, self.int8_weight, self._scales_bf16)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


def _aligned(tensor: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """``tensor`` contiguous and starting on a cache line: ``_weight_int8pack_mm`` crashes (SIGSEGV) on an int8
    weight that does not, as one read from a safetensors file may (its tensors are packed back to back)."""
    if tensor.is_contiguous() and tensor.data_ptr() % alignment == 0:
        return tensor
    return tensor.contiguous().clone()


class Int8Head(Int8Linear):
    """The output projection: int8 weights of ``W * channel_scale``, applied to ``x / channel_scale``.

    On fbgemm (x86) each row of ``x`` enters the int8 x int8 product as two 7-bit rows, its values rounded to
    63 steps of the row's largest magnitude and the remainder rounded to 126 finer steps of one of those:
    an error within 1/16,000 of the row's largest value, from one pass over the weights.
    """

    def __init__(self, int8_weight: torch.Tensor, scales: torch.Tensor, channel_scale: torch.Tensor):
        super().__init__(int8_weight, scales)
        self.register_buffer("channel_scale", channel_scale.float())
        self._packing = _PackInBackground(self.int8_weight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float() / self.channel_scale
        packed = self._packing.result()
        if packed is None:
            return super().forward(rows).to(x.dtype).view(*x.shape[:-1], self.out_features)
        peak = rows.abs().amax(dim=1, keepdim=True)
        step = torch.where(peak > 0, peak, torch.ones_like(peak)) / 63
        scaled = rows / step
        coarse = torch.round(scaled)
        both = torch.cat((coarse, (scaled - coarse) * _FINE_STEPS))
        # Inputs on the integer grid with scale 1 and zero point 64: fbgemm sees 1..127 (no 16-bit overflow).
        parts = [_fbgemm_product(both, 1.0, 64, half) for half in packed]
        y = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        n = rows.shape[0]
        y = (y[:n] + y[n:] / _FINE_STEPS) * step
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = "fbgemm, two-part activations" if self._packing.result() is not None else "bfloat16 activations"
        return f"{super().extra_repr()}, channel-scaled, {kernel}"


def _fbgemm_product(*args: Any) -> torch.Tensor:
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(*args)


def _fbgemm_available() -> bool:
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return False
    try:
        torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32  # noqa: B018 (absent in some builds)
    except (AttributeError, RuntimeError):
        return False
    return True


class _PackInBackground:
    """fbgemm's packed form of int8 weights, made by threads while loading goes on; ``result()`` waits for it.

    Packing the default model's head takes about 1.7 s on one core; it is split in two halves of rows (two
    threads, multiplied side by side) and overlaps the tokenizer's loading. That loading holds the GIL for a
    second, so the constructor returns only once each thread is about to enter torch's packing op (which releases
    it). ``result()`` is ``None`` where this torch has no fbgemm int8 product or packing failed.
    """

    def __init__(self, int8_weight: torch.Tensor, scales: torch.Tensor):
        rows = int8_weight.shape[0]
        bounds = [(0, rows)] if rows < 4096 else [(0, rows // 2), (rows // 2, rows)]
        self._packed: list[Any] = [None] * len(bounds)
        self._threads: list[threading.Thread] = []
        self._failed = not _fbgemm_available()
        if self._failed:
            return
        try:
            with warnings.catch_warnings():  # quantized tensors are deprecated; this is their one use here
                warnings.simplefilter("ignore")
                halves = [torch._make_per_channel_quantized_tensor(
                    int8_weight[start:end], scales[start:end].double(), torch.zeros(end - start, dtype=torch.long), 0)
                    for start, end in bounds]
        except (RuntimeError, AttributeError):
            self._failed = True
            return
        entering = [threading.Event() for _ in halves]
        self._threads = [threading.Thread(target=self._pack, args=(i, half, entering[i]), daemon=True)
                         for i, half in enumerate(halves)]
        for thread, event in zip(self._threads, entering):
            thread.start()
            event.wait()

    def _pack(self, i: int, weight: torch.Tensor, entering: threading.Event) -> None:
        try:
            entering.set()
            self._packed[i] = torch.ops.quantized.linear_prepack(weight, None)
        except (RuntimeError, AttributeError):
            self._failed = True

    def result(self) -> Optional[list[Any]]:
        while self._threads:
            self._threads.pop().join()
        return None if self._failed else self._packed


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``weight ≈ int8 * scale[:, None]`` (the scale torch's per-channel observer picks).

    >>> q, s = quantize_weight(torch.tensor([[1.0, -0.5], [0.0, 0.0]]))
    >>> q.tolist(), [round(v, 5) for v in s.tolist()]
    ([[127, -64], [0, 0]], [0.00784, 1.0])
    """
    weight = weight.float()
    amax = weight.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.5, torch.ones_like(amax))
    int8 = torch.clamp(torch.round(weight / scales[:, None]), -128, 127).to(torch.int8)
    return int8, scales


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``(parent, attribute, full name)`` of every ``nn.Linear`` in ``model``."""
    return [(parent, name, f"{prefix}.{name}" if prefix else name) for prefix, parent in model.named_modules()
            for name, child in parent.named_children() if isinstance(child, nn.Linear)]


def untie_output(model: Any) -> None:
    """Give a tied model its own output projection (the same values) so that it can be quantized apart."""
    if getattr(model, "lm_head", None) is None:
        embed = model.get_input_embeddings()
        with torch.device("meta"):  # no random initialisation of 168M values only to replace them
            model.lm_head = nn.Linear(embed.weight.shape[1], embed.weight.shape[0], bias=False)
        model.lm_head.weight = nn.Parameter(embed.weight.detach(), requires_grad=False)
        embed.weight_t = None


def head_channel_scale(model: Any, exponent: float = HEAD_GAIN_EXPONENT) -> torch.Tensor:
    """``|gain| ** exponent`` of the final norm, whose output is the output projection's input."""
    gain = (1.0 + model.model.norm.weight.detach().float()).abs()
    return gain.clamp_min(1e-6) ** exponent


def quantize_int8(model: Any) -> Any:
    """Replace every bias-free ``nn.Linear`` of ``model`` (an llmsample ``gemma3`` model) by an ``Int8Linear``,
    the output projection by an ``Int8Head``."""
    untie_output(model)
    for parent, name, key in _linears(model):
        linear = getattr(parent, name)
        if linear.bias is not None:
            raise ValueError(f"{name} has a bias; int8 quantization here covers bias-free layers only")
        if key == "lm_head":
            channel_scale = head_channel_scale(model)
            weight = linear.weight.detach().float() * channel_scale
            setattr(parent, name, Int8Head(*quantize_weight(weight), channel_scale))
        else:
            setattr(parent, name, Int8Linear(*quantize_weight(linear.weight.detach())))
    return model


def int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The int8 weights and scales of a quantized model, as plain tensors to save."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            state[f"{name}.int8_weight"], state[f"{name}.scales"] = module.int8_weight, module.scales
        if isinstance(module, Int8Head):
            state[f"{name}.channel_scale"] = module.channel_scale
    return state


def from_int8_state(model: Any, state: dict[str, torch.Tensor]) -> Any:
    """Swap ``model``'s linear layers for the saved int8 ones (``state`` from ``int8_state``). A state in an older
    layout (a head without channel scales) raises ``KeyError`` before anything changes."""
    untie_output(model)
    linears = _linears(model)
    for *_, key in linears:  # all checked before the model changes: a caller may quantize it afresh instead
        needed = [f"{key}.int8_weight", f"{key}.scales"] + ([f"{key}.channel_scale"] if key == "lm_head" else [])
        missing = [name for name in needed if name not in state]
        if missing:
            raise KeyError(f"no {missing[0]} in the int8 state")
    for parent, name, key in linears:
        weights = state[f"{key}.int8_weight"], state[f"{key}.scales"]
        if key == "lm_head":
            setattr(parent, name, Int8Head(*weights, state[f"{key}.channel_scale"]))
        else:
            setattr(parent, name, Int8Linear(*weights))
    return model


"""``--quantize int8``: int8 weights, one scale per output channel, computed with bfloat16 activations (CPU).

Chosen by measurement on this project's 2-core CPU (Gemma 3 270M; perplexity on the benchmark's fixed English and
Chinese texts, float32 = 24.24 and 73.73; decode tok/s, greedy, batch 1):

- int8 weights with dynamically quantized int8 activations (torch's fbgemm ``quantized::linear_dynamic``, what
  ``quantize_dynamic`` builds): about 45 tok/s, but perplexity +10% / +17%, even with every token quantized on
  its own; the model's activations have outlier channels that 7-bit activations cannot hold (8-bit ones may
  overflow fbgemm's 16-bit accumulation).
- torchao 0.18's ``Int8DynamicActivationInt8WeightConfig`` without ``torch.compile``: 3 tok/s.
- int8 weights with bfloat16 activations (``torch._weight_int8pack_mm``), everything else in float32: about
  30 tok/s, perplexity +0.5% / +2.7%. This is the one used: the text stays the model's.

Every ``nn.Linear`` is replaced, the output projection included (untied from the embedding, which stays in
float32 for the lookup). The int8 values and scales are plain tensors, so a cache maps them back in at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Int8Linear(nn.Module):
    """``y = x @ (int8 * scale).T``, with ``x`` rounded to bfloat16 for the product and ``y`` in ``x``'s dtype."""

    def __init__(self, int8_weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = int8_weight.shape[1], int8_weight.shape[0]
        self.register_buffer("int8_weight", int8_weight.contiguous())
        self.register_buffer("scales", scales.float())
        self._scales_bf16 = scales.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(rows, self.int8_weight, self._scales_bf16)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


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
        model.lm_head = nn.Linear(embed.weight.shape[1], embed.weight.shape[0], bias=False)
        model.lm_head.weight = nn.Parameter(embed.weight.detach(), requires_grad=False)
        embed.weight_t = None


def quantize_int8(model: Any) -> Any:
    """Replace every bias-free ``nn.Linear`` of ``model`` (an llmsample ``gemma3`` model) by an ``Int8Linear``."""
    untie_output(model)
    for parent, name, _ in _linears(model):
        linear = getattr(parent, name)
        if linear.bias is not None:
            raise ValueError(f"{name} has a bias; int8 quantization here covers bias-free layers only")
        setattr(parent, name, Int8Linear(*quantize_weight(linear.weight.detach())))
    return model


def int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The int8 weights and scales of a quantized model, as plain tensors to save."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            state[f"{name}.int8_weight"], state[f"{name}.scales"] = module.int8_weight, module.scales
    return state


def from_int8_state(model: Any, state: dict[str, torch.Tensor]) -> Any:
    """Swap ``model``'s linear layers for the saved int8 ones (``state`` from ``int8_state``)."""
    untie_output(model)
    for parent, name, key in _linears(model):
        if f"{key}.int8_weight" not in state:
            raise KeyError(f"no int8 weights for {key}")
        setattr(parent, name, Int8Linear(state[f"{key}.int8_weight"], state[f"{key}.scales"]))
    return model


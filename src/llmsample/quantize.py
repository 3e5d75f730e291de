"""``--quantize int8``: int8 weights, per output channel, with int8 activations quantized per call (CPU).

Chosen by measurement on this project's 2-core CPU (Gemma 3 270M, greedy, batch 1): torch's own fbgemm kernels
(``quantized::linear_dynamic`` over per-channel weights) decode at about 46 tok/s; torchao 0.18's
``Int8DynamicActivationInt8WeightConfig`` without ``torch.compile`` at 3 tok/s; per-tensor weights produce
garbage on this model. torch's eager quantization *API* (``torch.ao.quantization.quantize_dynamic``) is
deprecated, so this module calls the kernels directly and keeps its own small ``Int8Linear``.

Every ``nn.Linear`` is replaced, the output projection included (untied from the embedding, which stays in
float32 for the lookup). The int8 values and scales can be saved and loaded as plain tensors
(``int8_state`` / ``from_int8_state``) so that a cache skips the quantization; packing them for fbgemm still
happens at load.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


class Int8Linear(nn.Module):
    """``y = x @ W.T`` with ``W`` int8 per output channel; ``x`` quantized to 8 bits on each call."""

    def __init__(self, int8_weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = int8_weight.shape[1], int8_weight.shape[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensor creation is marked deprecated; the kernels are not
            zero = torch.zeros(int8_weight.shape[0], dtype=torch.long)
            weight = torch._make_per_channel_quantized_tensor(int8_weight, scales.double(), zero, 0)
            self._packed = torch.ops.quantized.linear_prepack(weight, None)

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 values and float32 scales, unpacked (the packed copy is the only one kept)."""
        weight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return weight.int_repr(), weight.q_per_channel_scales().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: fbgemm's activations use 7 bits so that its int16 accumulation cannot overflow.
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)

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
            values, scales = module.int8_weight()
            state[f"{name}.int8_weight"], state[f"{name}.scales"] = values.contiguous(), scales.contiguous()
    return state


def from_int8_state(model: Any, state: dict[str, torch.Tensor]) -> Any:
    """Swap ``model``'s linear layers for the saved int8 ones (``state`` from ``int8_state``)."""
    untie_output(model)
    for parent, name, key in _linears(model):
        if f"{key}.int8_weight" not in state:
            raise KeyError(f"no int8 weights for {key}")
        setattr(parent, name, Int8Linear(state[f"{key}.int8_weight"], state[f"{key}.scales"]))
    return model


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

- Then the decoder layers went through the same kernel and two-part activations as the head (few rows only;
  a prompt's chunks stay bfloat16): its product takes 24-55 us where ``_weight_int8pack_mm`` takes 47-172 us, and
  the activations are finer than bfloat16's, so the layers' error fell too (KL from float32 on the benchmark's
  Chinese text 0.0051 against 0.0080 with the float32 head). Products that read the same input are one product
  (q, k and v; gate and up): per-row int8 quantization makes the concatenated weight exactly the parts'.
- The head's remaining error (int8 over 262,144 rows) is taken out where it matters: the highest logits (the
  chunks of columns around them, ``rescored_columns``) are computed again in float32 from the embedding (which stays in memory for the lookup anyway),
  so the candidates a table shows and the sampler mostly draws from are exact for the hidden state. With it,
  perplexity on the benchmark's texts moved -0.7% / +0.8% from float32 (without: +0.1% / +1.4%).

- Then the per-operation overhead around those products was what was left (about 2,000 torch operations a
  token, ≈24 ms against ≈14 for llama.cpp): ``decode_kernel.c`` runs the same arithmetic for a whole decoding
  step in one compiled call, every product on all threads, about 10 ms a token (``prepare_decoding``). The torch
  path below stays for a machine without a C compiler.

Every ``nn.Linear`` is replaced, the output projection included (untied from the embedding, which stays in
float32 for the lookup). The int8 values and scales are plain tensors, so a cache maps them back in at once.
Where torch lacks fbgemm's quantized kernels (another CPU architecture, a future torch), every product falls back
to ``_weight_int8pack_mm`` with the same weights.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

# From this many rows on (reading a prompt) an int8 layer multiplies in bfloat16 instead (measured on this 2-core
# AVX-512 BF16 CPU with 512 rows: about 7 ms against 38 ms for a 2048 x 640 layer).
BF16_PRODUCT_ROWS = 16
HEAD_GAIN_EXPONENT = 0.2  # see the module notes: chosen by benchmarks/calibrate_head.py
_FINE_STEPS = 126  # the second part holds the first's rounding error (within ±0.5) times this: within ±63
# The head's highest logits are recomputed in float32: every logit of the RESCORE_CHUNKS chunks of RESCORE_CHUNK
# columns with the highest maxima (1,024 tokens; found in ~40 us where a topk over the row takes ~450 us here).
RESCORE_CHUNK = 64
RESCORE_CHUNKS = 16


class Int8Linear(nn.Module):
    """``y = x @ (int8 * scale).T``, ``y`` in ``x``'s dtype. Few rows (decoding) go through fbgemm with two-part
    activations once ``attach_fbgemm`` has packed the weights; otherwise ``x`` is rounded to bfloat16."""

    def __init__(self, int8_weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = int8_weight.shape[1], int8_weight.shape[0]
        self.register_buffer("int8_weight", _aligned(int8_weight))
        self.register_buffer("scales", scales.float())
        self._scales_bf16 = scales.to(torch.bfloat16)
        self.fbgemm: Optional[_Packed] = None  # set by ``attach_fbgemm``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] < BF16_PRODUCT_ROWS and self.fbgemm is not None and self.fbgemm.ready():
            y = two_part_product(rows.float(), self.fbgemm.get())
        else:
            y = self.bf16_product(rows)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def bf16_product(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` ``[n, in]`` rounded to bfloat16 times the int8 weights: ``[n, out]`` in float32."""
        rows = rows.to(torch.bfloat16)
        if rows.shape[0] >= BF16_PRODUCT_ROWS:
            # Many rows (a prompt's chunk): compute-bound, where oneDNN's bfloat16 product runs about 5x faster
            # than the int8 kernel here. The int8 values are exact in bfloat16; the scales apply after, in float32.
            return torch.nn.functional.linear(rows, self.int8_weight.to(torch.bfloat16)).float() * self.scales
        return torch._weight_int8pack_mm(rows, self.int8_weight, self._scales_bf16).float()

    def extra_repr(self) -> str:
        kernel = "fbgemm, two-part activations" if self.fbgemm is not None and self.fbgemm.ready() else \
            "bfloat16 activations"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel, {kernel}"


class Int8Fused(nn.Module):
    """Several ``Int8Linear`` of the same input as one product (q, k, v; gate, up): the outputs side by side.

    The parts stay the saved modules (a plain list here, so their weights are not saved twice); for few rows
    their concatenated weight, packed by ``attach_fbgemm``, makes one product and one quantized input.
    """

    def __init__(self, parts: list[Int8Linear]):
        super().__init__()
        self.parts = list(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(part.out_features for part in parts)
        self.fbgemm: Optional[_Packed] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] < BF16_PRODUCT_ROWS and self.fbgemm is not None and self.fbgemm.ready():
            y = two_part_product(rows.float(), self.fbgemm.get())
        else:
            y = torch.cat([part.bf16_product(rows) for part in self.parts], dim=1)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {len(self.parts)} products as one"


def two_part_product(rows: torch.Tensor, packed: list[Any]) -> torch.Tensor:
    """``rows`` (float32 ``[n, in]``) times fbgemm-packed int8 weights (side by side when several), each row
    entering as two 7-bit rows: its values rounded to 63 steps of the row's largest magnitude, and the rounding
    error rounded to 126 finer steps of one of those (an error within 1/16,000 of the row's largest value) for
    one pass over the weights. ``[n, out]`` in float32.

    >>> layer = Int8Linear(*quantize_weight(torch.tensor([[1.0, -2.0], [0.5, 0.25]])))
    >>> pack_for_fbgemm([layer])
    >>> x, weight = torch.tensor([[0.3, 0.7]]), layer.int8_weight * layer.scales[:, None]
    >>> not layer.fbgemm.ready() or torch.allclose(two_part_product(x, layer.fbgemm.get()), x @ weight.t(), atol=1e-4)
    True
    """
    peak = rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)  # an all-zero row: any step gives zeros
    step = peak / 63
    scaled = rows / step
    coarse = torch.round(scaled)
    both = torch.cat((coarse, scaled.sub_(coarse).mul_(_FINE_STEPS)))
    # Inputs on the integer grid with scale 1 and zero point 64: fbgemm sees 1..127 (no 16-bit overflow).
    parts = [_fbgemm_product(both, 1.0, 64, weight) for weight in packed]
    y = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    n = rows.shape[0]
    return y[:n].add_(y[n:], alpha=1 / _FINE_STEPS).mul_(step)


def _aligned(tensor: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """``tensor`` contiguous and starting on a cache line: ``_weight_int8pack_mm`` crashes (SIGSEGV) on an int8
    weight that does not, as one read from a safetensors file may (its tensors are packed back to back)."""
    if tensor.is_contiguous() and tensor.data_ptr() % alignment == 0:
        return tensor
    return tensor.contiguous().clone()


class Int8Head(Int8Linear):
    """The output projection: int8 weights of ``W * channel_scale``, applied to ``x / channel_scale``, then the
    highest logits of each row (``rescored_columns``) recomputed in float32 from ``exact_weight`` (the embedding, when
    ``attach_fbgemm`` gives it; a head without it returns the int8 logits as they are).

    Over 4,096 rows the weights are packed as two halves, multiplied side by side.
    """

    def __init__(self, int8_weight: torch.Tensor, scales: torch.Tensor, channel_scale: torch.Tensor):
        super().__init__(int8_weight, scales)
        self.register_buffer("channel_scale", channel_scale.float())
        self.exact_weight: Optional[torch.Tensor] = None  # [vocab, hidden] float, not saved (it is the embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        y = super().forward(rows / self.channel_scale)
        if self.exact_weight is not None:
            top = rescored_columns(y)
            exact = torch.bmm(self.exact_weight[top].float(), rows.unsqueeze(2)).squeeze(2)
            y.scatter_(1, top, exact)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        rescored = ", top chunks rescored in float" if self.exact_weight is not None else ""
        return f"{super().extra_repr()}, channel-scaled{rescored}"


def rescored_columns(y: torch.Tensor) -> torch.Tensor:
    """Per row of ``y`` ``[n, width]``: the columns of its ``RESCORE_CHUNKS`` chunks (of ``RESCORE_CHUNK``) with the
    highest maxima, and a ragged tail; every column when the row is narrower than that. The row's highest
    ``RESCORE_CHUNKS`` values are always among them (each lies in a chunk whose maximum is at least its own).

    >>> rescored_columns(torch.arange(10.0)[None]).tolist()
    [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    """
    n, width = y.shape
    chunks = width // RESCORE_CHUNK
    if chunks <= RESCORE_CHUNKS:
        return torch.arange(width, device=y.device).expand(n, -1)
    maxima = y[:, : chunks * RESCORE_CHUNK].view(n, chunks, RESCORE_CHUNK).amax(-1)
    best = torch.topk(maxima, RESCORE_CHUNKS, dim=1, sorted=False).indices
    columns = (best.unsqueeze(-1) * RESCORE_CHUNK + torch.arange(RESCORE_CHUNK, device=y.device)).view(n, -1)
    if width > chunks * RESCORE_CHUNK:
        tail = torch.arange(chunks * RESCORE_CHUNK, width, device=y.device).expand(n, -1)
        columns = torch.cat((columns, tail), dim=1)
    return columns


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
    """fbgemm's packed forms of several int8 weights, made by threads while loading goes on.

    Packing the default model's weights takes about 2.7 core-seconds; two threads share the work and overlap the
    tokenizer's loading. That loading holds the GIL for a second, so the constructor returns only once each thread
    is about to enter torch's packing op (which releases it). ``get(i)`` waits for all of them and is ``None`` where
    this torch has no fbgemm int8 product or packing failed.
    """

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor]], threads: int = 2):
        self._packed: list[Any] = [None] * len(weights)
        self._threads: list[threading.Thread] = []
        self._failed = not _fbgemm_available()
        if self._failed or not weights:
            return
        try:
            with warnings.catch_warnings():  # quantized tensors are deprecated; this is their one use here
                warnings.simplefilter("ignore")
                quantized = [_per_channel(int8, scales) for int8, scales in weights]
        except (RuntimeError, AttributeError):
            self._failed = True
            return
        # Largest first, each to the thread with least so far: the two threads finish together.
        shares: list[list[int]] = [[] for _ in range(min(threads, len(weights)))]
        loads = [0] * len(shares)
        for i in sorted(range(len(weights)), key=lambda i: -weights[i][0].numel()):
            least = loads.index(min(loads))
            shares[least].append(i)
            loads[least] += weights[i][0].numel()
        entering = [threading.Event() for _ in shares]
        self._threads = [threading.Thread(target=self._pack, args=(share, quantized, entering[t]), daemon=True)
                         for t, share in enumerate(shares)]
        for thread, event in zip(self._threads, entering):
            thread.start()
            event.wait()

    def _pack(self, share: list[int], quantized: list[torch.Tensor], entering: threading.Event) -> None:
        try:
            entering.set()
            for i in share:
                self._packed[i] = torch.ops.quantized.linear_prepack(quantized[i], None)
        except (RuntimeError, AttributeError):
            self._failed = True

    def result(self) -> Optional[list[Any]]:
        while self._threads:
            self._threads.pop().join()
        return None if self._failed else self._packed


class _Packed:
    """One module's share of a ``_PackInBackground``: the packed weights it multiplies side by side, looked up
    once (the first product waits for the packing; every later one, each token's, reads the list kept here)."""

    def __init__(self, packer: _PackInBackground, indices: list[int]):
        self._packer, self._indices = packer, indices
        self._weights: Optional[list[Any]] = None
        self._ready: Optional[bool] = None

    def ready(self) -> bool:
        """Whether fbgemm products are available (waits for the packing)."""
        if self._ready is None:
            packed = self._packer.result()
            self._ready = packed is not None
            self._weights = [packed[i] for i in self._indices] if packed is not None else None
        return self._ready

    def get(self) -> list[Any]:
        assert self.ready() and self._weights is not None
        return self._weights


def _per_channel(int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    rows = int8.shape[0]
    return torch._make_per_channel_quantized_tensor(int8, scales.double(), torch.zeros(rows, dtype=torch.long), 0)


def pack_for_fbgemm(modules: list[nn.Module]) -> None:
    """Give each ``Int8Linear``, ``Int8Head`` or ``Int8Fused`` of ``modules`` its fbgemm-packed weights, packed by
    two background threads (a module's first few-row product waits for them)."""
    weights: list[tuple[torch.Tensor, torch.Tensor]] = []
    shares: list[list[int]] = []
    for module in modules:
        first = len(weights)
        if isinstance(module, Int8Fused):
            parts = module.parts
            weights.append((torch.cat([p.int8_weight for p in parts]), torch.cat([p.scales for p in parts])))
        elif module.out_features > 4096:  # the head: two halves, packed and multiplied side by side
            half = module.out_features // 2
            weights += [(module.int8_weight[:half], module.scales[:half]),
                        (module.int8_weight[half:], module.scales[half:])]
        else:
            weights.append((module.int8_weight, module.scales))
        shares.append(list(range(first, len(weights))))
    packer = _PackInBackground(weights)
    for module, indices in zip(modules, shares):
        module.fbgemm = _Packed(packer, indices)


def prepare_decoding(model: Any, report: Optional[Callable[[str], None]] = None) -> Any:
    """Ready a quantized llmsample ``gemma3`` model for fast decoding: the head's top logits rescored from the
    float embedding, and each decoding step through the compiled kernel (``decode_kernel``) where it builds here,
    else through fbgemm (``attach_fbgemm``). Nothing here is saved: it is derived from the int8 state at each load.
    """
    model.lm_head.exact_weight = model.get_input_embeddings().weight
    from llmsample import decode_kernel

    lib = decode_kernel.load(report)
    if lib is None:
        return attach_fbgemm(model)
    model.kernel_step = decode_kernel.KernelStep(lib, model)
    return model


def attach_fbgemm(model: Any) -> Any:
    """The eager decoding path of a quantized llmsample ``gemma3`` model: q/k/v and gate/up fused into one product
    each, every few-row product through fbgemm (packed by background threads), and the head's top logits
    rescored from the float embedding."""
    products: list[nn.Module] = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv = Int8Fused([attn.q_proj, attn.k_proj, attn.v_proj])
        mlp.gate_up = Int8Fused([mlp.gate_proj, mlp.up_proj])
        products += [attn.qkv, attn.o_proj, mlp.gate_up, mlp.down_proj]
    pack_for_fbgemm([model.lm_head] + products)  # the head first: it is the largest
    model.lm_head.exact_weight = model.get_input_embeddings().weight
    return model


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


def quantize_int8(model: Any, report: Optional[Callable[[str], None]] = None) -> Any:
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
    return prepare_decoding(model, report)


def int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The int8 weights and scales of a quantized model, as plain tensors to save."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            state[f"{name}.int8_weight"], state[f"{name}.scales"] = module.int8_weight, module.scales
        if isinstance(module, Int8Head):
            state[f"{name}.channel_scale"] = module.channel_scale
    return state


def from_int8_state(model: Any, state: dict[str, torch.Tensor],
                    report: Optional[Callable[[str], None]] = None) -> Any:
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
    return prepare_decoding(model, report)


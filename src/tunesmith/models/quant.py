"""A quantised frozen base (QLoRA, Dettmers et al., 2023): weight-only int8 / int4 / NF4 Linears.

`model.quantize` stores every frozen Linear weight inside the decoder blocks (not the lm_head, not the
embeddings) in fewer bits; the compute stays in the activations' dtype. A layer dequantises its weight
just before its matmul and again in backward (the dense weight lives for one matmul, it is never
saved for backward), so the memory held is the quantised bytes. Formats:

- `int8`: symmetric, one fp32 scale per output row, q = round(W / s) in [-127, 127].
  8 bits + 32/in bits per weight; |W − s·q| <= s/2.
- `int4`: asymmetric, one fp32 scale and zero per group of `group_size` consecutive weights,
  q = round((W − min) / s) in [0, 15], s = (max − min) / 15, two per byte. 4 + 64/group bits per
  weight; |W − (s·q + min)| <= s/2.
- `nf4`: QLoRA's NormalFloat-4: per block of 64 an fp32 absmax, each weight the nearest of 16
  normal quantiles scaled by it, two per byte (high nibble first) — byte for byte the layout of
  bitsandbytes' `quantize_4bit(quant_type="nf4")` without double quantisation, so on CUDA its
  dequantisation kernel reads our tensors directly. 4.5 bits per weight; error <= absmax times half
  the widest gap between neighbouring codes.

Why dequantise-then-matmul and not an integer kernel: measured on this project's 2-core AVX2 CPU
(a 576→1536 Linear, 2048 tokens, forward + backward to the input, one thread): fp32 220 ms, our
int8 / int4 dequantise + fp32 matmul 227-269 ms, torchao's Int8WeightOnly 300 ms and its int4
(IntxWeightOnly, unpacked: no memory saving) 319 ms, bitsandbytes' CPU Linear8bitLt 336 ms and
Linear4bit nf4 265 ms; torch's own `_weight_int8pack_mm` 4.8-7.3 s and
`_weight_int4pack_mm_for_cpu` 4.9-9.3 s (decode kernels, slow at 2048 rows), any bf16 path 4.8-7.9 s
(no bf16 hardware here). So the CPU path is plain torch, no dependency; on CUDA bitsandbytes, when
installed, dequantises NF4 (its kernel), the rest is the same code.

The quantised tensors are non-persistent buffers: they derive from the base weights, so they are
never saved with an adapter or a checkpoint (the base is quantised again when it is loaded). A
quantised layer's `weight` is a `QuantizedWeight` module that answers what code reads from a weight's
metadata (shape, numel, dtype, device, requires_grad) but is no tensor: `dense(weight)` is the
dequantised one, `linear(x, weight, bias)` the matmul.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("none", "int8", "int4", "nf4")
NF4_BLOCK = 64  # QLoRA's (and bitsandbytes') block size

# The 16 NF4 codes (QLoRA appendix; bitsandbytes' `get_4bit_type("nf4")`), ascending.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


class QuantError(ValueError):
    """model.quantize cannot apply to this model or method."""


def _pack(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes' order)."""
    q = q.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = F.pad(q, (0, 1))
    return (q[::2] << 4) | q[1::2]


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)
    return out[:n]


def _blocks(w: torch.Tensor, size: int) -> torch.Tensor:
    """The flattened weight in rows of `size` (the last one padded by repeating its final value)."""
    flat = w.reshape(-1).float()
    rem = (-flat.numel()) % size
    if rem:
        flat = torch.cat([flat, flat[-1:].expand(rem)])
    return flat.reshape(-1, size)


class QuantizedWeight(nn.Module):
    """A frozen weight in `mode` (see the module docstring). Buffers: `qdata`, `scale` (and int4's
    `zero`), not persistent. The original shape and dtype are kept for the dense weight."""

    requires_grad = False  # frozen by construction: no optimizer or grad-clipping code sees it

    def __init__(self, weight: torch.Tensor, mode: str, group_size: int = 64):
        super().__init__()
        if mode not in MODES[1:]:
            raise QuantError(f"model.quantize: `{mode}` is not a format; choose one of {', '.join(MODES)}")
        if weight.ndim != 2:
            raise QuantError(f"model.quantize: a weight of shape {tuple(weight.shape)} is not a Linear's")
        self.mode, self.shape, self.dtype = mode, torch.Size(weight.shape), weight.dtype
        self.group_size = {"int8": weight.shape[1], "int4": group_size, "nf4": NF4_BLOCK}[mode]
        w = weight.detach()
        if w.is_meta:  # shapes only (the estimate): nothing to compute
            self._empty(w.device)
            return
        if mode == "int8":
            scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127
            qdata = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self._set(qdata, scale)
        elif mode == "int4":
            g = _blocks(w, self.group_size)
            low, high = g.amin(dim=1), g.amax(dim=1)
            scale = ((high - low) / 15).clamp(min=1e-12)
            q = torch.round((g - low[:, None]) / scale[:, None]).clamp(0, 15)
            self._set(_pack(q), scale, low)
        else:
            g = _blocks(w, NF4_BLOCK)
            absmax = g.abs().amax(dim=1).clamp(min=1e-38)
            code = torch.tensor(NF4_CODE, device=w.device)
            bounds = (code[:-1] + code[1:]) / 2
            q = torch.bucketize(torch.clamp(g / absmax[:, None], -1, 1), bounds)
            self._set(_pack(q), absmax)

    def _set(self, qdata, scale, zero=None) -> None:
        self.register_buffer("qdata", qdata, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        if zero is not None:
            self.register_buffer("zero", zero, persistent=False)

    def _empty(self, device) -> None:
        n, groups = self.shape.numel(), -(-self.shape.numel() // self.group_size)
        if self.mode == "int8":
            self._set(torch.empty(self.shape, dtype=torch.int8, device=device),
                      torch.empty(self.shape[0], device=device))
        else:
            zero = torch.empty(groups, device=device) if self.mode == "int4" else None
            self._set(torch.empty((n + 1) // 2 if n % 2 else n // 2, dtype=torch.uint8, device=device),
                      torch.empty(groups, device=device), zero)

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def ndim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.shape.numel()

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in `dtype` (default: the original dtype)."""
        dtype = dtype or self.dtype
        if self.mode == "int8":
            return (self.qdata.to(self.scale.dtype) * self.scale[:, None]).to(dtype)
        if self.mode == "nf4" and self.qdata.is_cuda:
            fast = _bnb_nf4(self, dtype)
            if fast is not None:
                return fast
        n = self.shape.numel()
        q = _unpack(self.qdata, self.scale.numel() * self.group_size).reshape(-1, self.group_size)
        if self.mode == "int4":
            w = q.to(self.scale.dtype) * self.scale[:, None] + self.zero[:, None]
        else:
            w = torch.tensor(NF4_CODE, device=q.device)[q.long()] * self.scale[:, None]
        return w.reshape(-1)[:n].reshape(self.shape).to(dtype)

    def error_bound(self) -> torch.Tensor:
        """The largest |W − dequantize(W)| each weight can have, from the stored scales, (out, in)."""
        if self.mode == "int8":
            return (self.scale / 2)[:, None].expand(self.shape)
        if self.mode == "int4":
            per_group = self.scale / 2
        else:
            code = torch.tensor(NF4_CODE, device=self.scale.device)
            per_group = self.scale * (code[1:] - code[:-1]).max() / 2
        per_weight = per_group[:, None].expand(-1, self.group_size).reshape(-1)
        return per_weight[: self.shape.numel()].reshape(self.shape)

    def extra_repr(self) -> str:
        return f"{self.mode}, shape={tuple(self.shape)}, group_size={self.group_size}"


def _bnb_nf4(q: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor | None:
    """bitsandbytes' CUDA dequantisation of our NF4 tensors (the same layout), or None without it."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    state = bnbf.QuantState(absmax=q.scale, shape=q.shape, code=bnbf.get_4bit_type("nf4", device=q.device),
                            blocksize=NF4_BLOCK, quant_type="nf4", dtype=dtype)
    return bnbf.dequantize_4bit(q.qdata.reshape(-1, 1), state).reshape(q.shape).to(dtype)


def dense(weight) -> torch.Tensor:
    """A Linear's weight as a tensor: itself, or a quantised one dequantised (original dtype)."""
    return weight.dequantize() if isinstance(weight, QuantizedWeight) else weight


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _QuantLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantised in forward and again in backward: the gradient flows to x
    (and a trainable bias), never to the quantised weight, and no dense weight is saved."""

    @staticmethod
    def forward(ctx, x, bias, weight):
        ctx.weight, ctx.bias_grad = weight, bias is not None and bias.requires_grad
        dtype = _compute_dtype(x)
        return F.linear(x.to(dtype), weight.dequantize(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad @ ctx.weight.dequantize(grad.dtype)
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_grad else None
        return grad_x, grad_b, None


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a dense or a quantised weight."""
    if isinstance(weight, QuantizedWeight):
        return _QuantLinearFn.apply(x, bias, weight)
    return F.linear(x, weight, bias)


class QuantLinear(nn.Linear):
    """A frozen nn.Linear with a quantised weight (an nn.Linear to `isinstance`, so adapters and
    FLOP counts still find it)."""

    def __init__(self, base: nn.Linear, mode: str, group_size: int = 64):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = QuantizedWeight(base.weight, mode, group_size)
        self.bias = base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def dequantized(self) -> nn.Linear:
        """A plain nn.Linear holding the dequantised weight (in its original dtype)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight.dequantize())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


_BLOCK = re.compile(r"(^|\.)(layers|layer|h|blocks)\.\d+\.")


def _block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and _BLOCK.search(n + ".")]


def quantize_frozen(model: nn.Module, mode: str, group_size: int = 64) -> list[str]:
    """Quantise every frozen Linear weight inside the decoder blocks in place; return their names.
    A plain Linear becomes a QuantLinear; a wrapper that subclasses nn.Linear (LoRALinear) keeps
    its class and gets a QuantizedWeight as its `weight`. Call it after the method is attached (a
    method that trains base weights is refused: they cannot train in fewer bits)."""
    if mode == "none":
        return []
    if mode not in MODES:
        raise QuantError(f"model.quantize: `{mode}` is not a format; choose one of {', '.join(MODES)}")
    if mode == "int4" and (group_size <= 0 or group_size % 2):
        raise QuantError(f"model.quantize=int4: the group size must be even and positive, got {group_size}")
    chosen = _block_linears(model)
    trained = [n for n, m in chosen if isinstance(m.weight, nn.Parameter) and m.weight.requires_grad]
    if trained:
        raise QuantError(f"model.quantize={mode}: `{trained[0]}.weight` trains, and a quantised weight cannot; "
                         "quantise the base under a method that keeps it frozen (lora, ia3, ...) or set "
                         "model.quantize=none")
    done = []
    for name, mod in chosen:
        if isinstance(mod.weight, QuantizedWeight):
            continue
        if type(mod) is nn.Linear:
            _set_module(model, name, QuantLinear(mod, mode, group_size))
        else:
            weight = mod.weight
            del mod.weight  # the Parameter goes; the module of the same name takes its place
            mod.weight = QuantizedWeight(weight, mode, group_size)
        done.append(name)
    if not done:
        raise QuantError("model.quantize: found no Linear inside the transformer blocks to quantise")
    return done


def dequantize_model(model: nn.Module) -> int:
    """Replace every QuantLinear by a plain nn.Linear of its dequantised weight; return how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        _set_module(model, name, model.get_submodule(name).dequantized())
    return len(names)


def quantization(model: nn.Module) -> dict | None:
    """{"mode", "group_size"} of the model's quantised weights (for an adapter's metadata), or None."""
    for m in model.modules():
        if isinstance(m, QuantizedWeight):
            return {"mode": m.mode, "group_size": m.group_size if m.mode == "int4" else 64}
    return None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

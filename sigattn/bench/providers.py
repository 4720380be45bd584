"""Benchmark providers: sigattn backends, SDPA softmax baselines, eager sigmoid and PyPI peers, each a builder."""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sigattn.bench.flops import MODES
from sigattn.bench.shapes import Shape


@dataclass(frozen=True)
class Unavailable:
    """A provider that cannot run here (missing package, backend, device): the reason goes in the row."""

    reason: str


@dataclass(frozen=True)
class Prepared:
    """A zero-argument callable running one measured step; inputs were made outside it."""

    fn: Callable[[], Any]

    def __call__(self) -> Any:
        return self.fn()


BuildResult = Prepared | Unavailable
Builder = Callable[[Shape, torch.dtype, torch.device, str], BuildResult]
Check = Callable[[torch.device], "str | None"]


def _always(device: torch.device) -> str | None:
    return None


@dataclass(frozen=True)
class Provider:
    """A named way to compute attention.

    check(device) is a cheap test without running anything: None, or why the provider cannot run on
    that device (package missing, backend absent). build(shape, dtype, device, mode) makes the inputs
    and returns a Prepared step for mode ('fwd', 'bwd' or 'fwd+bwd') or Unavailable (for that shape);
    it may raise when the shape cannot run (OOM, unsupported head dim), which the runner records as an
    error row. Both build and the timed
    calls run inside context() (SDPA's backend choice). kind is 'sigmoid' or 'softmax';
    materializes marks providers that allocate the full seqlen_q x seqlen_k score matrix.
    """

    name: str
    build: Builder
    kind: str
    materializes: bool = False
    context: Callable[[], AbstractContextManager[Any]] = field(default=contextlib.nullcontext)
    description: str = ""
    check: Check = _always


def make_inputs(
    shape: Shape, dtype: torch.dtype, device: torch.device, layout: str, requires_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random normal q, k, v (never zeros) in layout 'bnhd' (flash_attn) or 'bhnd' (SDPA), contiguous leaves.

    Drawn on the device in the target dtype (a 16k-token sweep would spend minutes in CPU randn), from a
    fixed seed, so every provider sees the same values at a shape.
    """
    if layout not in ("bnhd", "bhnd"):
        raise ValueError(f"layout must be 'bnhd' or 'bhnd', got {layout!r}")
    gen = torch.Generator(device=device).manual_seed(0)

    def one(seqlen: int) -> torch.Tensor:
        size = (shape.batch, seqlen, shape.nheads, shape.headdim)
        t = torch.randn(size, generator=gen, dtype=dtype, device=device)
        if layout == "bhnd":
            t = t.transpose(1, 2).contiguous()
        return t.requires_grad_(requires_grad)

    return one(shape.seqlen_q), one(shape.seqlen_k), one(shape.seqlen_k)


def with_mode(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], mode: str) -> Prepared:
    """The measured step for a mode.

    fwd: the forward alone (inputs do not require grad, so no graph is recorded). bwd: the forward
    runs once here, and the step is autograd.grad(out, inputs, dout, retain_graph=True), which
    returns fresh gradients instead of accumulating into .grad. fwd+bwd: both per step.
    """
    if mode == "fwd":
        return Prepared(forward)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out = forward()
    dout = torch.randn_like(out)
    if mode == "bwd":
        return Prepared(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))
    return Prepared(lambda: torch.autograd.grad(forward(), inputs, dout))


def _needs_grad(mode: str) -> bool:
    return mode != "fwd"


def _default_bias(seqlen_k: int) -> float:
    return -math.log(seqlen_k)


def _sigattn_check(backend: str) -> Check:
    def check(device: torch.device) -> str | None:
        try:
            import sigattn
        except Exception as e:
            return f"import sigattn failed: {type(e).__name__}: {e}"
        available = sigattn.available_backends(device)
        if backend not in available:
            return f"sigattn backend {backend!r} not available on {device.type} (has {available})"
        return None

    return check


def _sigattn_builder(backend: str, sigmoid_impl: str | None, gluon: bool = True) -> Builder:
    def build(shape: Shape, dtype: torch.dtype, device: torch.device, mode: str) -> BuildResult:
        import sigattn

        q, k, v = make_inputs(shape, dtype, device, "bnhd", _needs_grad(mode))
        kwargs: dict[str, Any] = {"causal": shape.causal, "backend": backend}
        if sigmoid_impl is not None:
            kwargs["sigmoid_impl"] = sigmoid_impl
        if gluon:
            return with_mode(lambda: sigattn.sigmoid_attn_func(q, k, v, **kwargs), (q, k, v), mode)
        with _portable_only():  # the graph's forward (bwd mode) is recorded here; each step is wrapped below
            prepared = with_mode(lambda: sigattn.sigmoid_attn_func(q, k, v, **kwargs), (q, k, v), mode)

        def step() -> Any:
            with _portable_only():
                return prepared()

        return Prepared(step)

    return build


@contextlib.contextmanager
def _portable_only() -> Iterator[None]:
    """Gluon forward and backward off (the portable Triton kernels serve every call), restored on exit."""
    from sigattn.ops import configs

    was = configs.gluon_forward_enabled(), configs.gluon_backward_enabled()
    configs.set_gluon_forward(False)
    configs.set_gluon_backward(False)
    try:
        yield
    finally:
        configs.set_gluon_forward(was[0])
        configs.set_gluon_backward(was[1])


def _sdpa_builder(shape: Shape, dtype: torch.dtype, device: torch.device, mode: str) -> BuildResult:
    if shape.causal and shape.seqlen_q != shape.seqlen_k:
        return Unavailable("SDPA is_causal is top-left aligned; compared only at seqlen_q == seqlen_k")
    q, k, v = make_inputs(shape, dtype, device, "bhnd", _needs_grad(mode))
    return with_mode(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal), (q, k, v), mode)


def _sdpa_context(backend: SDPBackend) -> Callable[[], AbstractContextManager[Any]]:
    return lambda: sdpa_kernel([backend])


def causal_keep_mask(seqlen_q: int, seqlen_k: int, device: torch.device) -> torch.Tensor:
    """Bool (seqlen_q, seqlen_k), True where query i may see key j <= i + seqlen_k - seqlen_q (bottom-right)."""
    return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device).tril(seqlen_k - seqlen_q)


def _naive_builder(shape: Shape, dtype: torch.dtype, device: torch.device, mode: str) -> BuildResult:
    q, k, v = make_inputs(shape, dtype, device, "bhnd", _needs_grad(mode))
    scale = shape.headdim**-0.5
    bias = _default_bias(shape.seqlen_k)
    drop = ~causal_keep_mask(shape.seqlen_q, shape.seqlen_k, device) if shape.causal else None

    def forward() -> torch.Tensor:
        p = torch.sigmoid(q @ k.transpose(-2, -1) * scale + bias)  # [B, H, Nq, Nk]
        if drop is not None:
            p = p.masked_fill(drop, 0.0)
        return p @ v

    return with_mode(forward, (q, k, v), mode)


def _cuda_check(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "needs a CUDA device"


def _peer_check(module: str) -> Check:
    def check(device: torch.device) -> str | None:
        try:
            importlib.import_module(module)
        except Exception as e:
            return f"{module} not importable: {type(e).__name__}: {e}"
        return _cuda_check(device)

    return check


def _flash_attn_builder(shape: Shape, dtype: torch.dtype, device: torch.device, mode: str) -> BuildResult:
    from flash_attn import flash_attn_func

    q, k, v = make_inputs(shape, dtype, device, "bnhd", _needs_grad(mode))
    return with_mode(lambda: flash_attn_func(q, k, v, causal=shape.causal), (q, k, v), mode)


def _triton_sigmoid_builder(shape: Shape, dtype: torch.dtype, device: torch.device, mode: str) -> BuildResult:
    from triton_sigmoid import sigmoid_attention

    if shape.seqlen_q != shape.seqlen_k:
        return Unavailable("triton_sigmoid.sigmoid_attention needs seqlen_q == seqlen_k")
    q, k, v = make_inputs(shape, dtype, device, "bnhd", _needs_grad(mode))
    scale = shape.headdim**-0.5
    bias = _default_bias(shape.seqlen_k)
    return with_mode(
        lambda: sigmoid_attention(q, k, v, is_causal=shape.causal, scale=scale, sigmoid_bias=bias),
        (q, k, v),
        mode,
    )


SIGATTN_BACKENDS: tuple[str, ...] = ("triton", "reference")

PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider(
            "sigattn-triton",
            _sigattn_builder("triton", None),
            "sigmoid",
            description="sigattn Triton kernels, sigmoid_impl='fast'",
            check=_sigattn_check("triton"),
        ),
        Provider(
            "sigattn-triton-portable",
            _sigattn_builder("triton", None, gluon=False),
            "sigmoid",
            description="sigattn portable Triton kernels only (no Gluon forward or backward), sigmoid_impl='fast'",
            check=_sigattn_check("triton"),
        ),
        Provider(
            "sigattn-triton-accurate",
            _sigattn_builder("triton", "accurate"),
            "sigmoid",
            description="sigattn Triton kernels, sigmoid_impl='accurate'",
            check=_sigattn_check("triton"),
        ),
        Provider(
            "sigattn-reference",
            _sigattn_builder("reference", None),
            "sigmoid",
            materializes=True,
            description="sigattn plain-PyTorch reference",
            check=_sigattn_check("reference"),
        ),
        Provider(
            "sdpa-flash",
            _sdpa_builder,
            "softmax",
            context=_sdpa_context(SDPBackend.FLASH_ATTENTION),
            description="torch SDPA, FLASH_ATTENTION backend",
        ),
        Provider(
            "sdpa-cudnn",
            _sdpa_builder,
            "softmax",
            context=_sdpa_context(SDPBackend.CUDNN_ATTENTION),
            description="torch SDPA, CUDNN_ATTENTION backend",
            check=_cuda_check,
        ),
        Provider(
            "sdpa-efficient",
            _sdpa_builder,
            "softmax",
            context=_sdpa_context(SDPBackend.EFFICIENT_ATTENTION),
            description="torch SDPA, EFFICIENT_ATTENTION backend",
            check=_cuda_check,
        ),
        Provider(
            "sdpa-math",
            _sdpa_builder,
            "softmax",
            materializes=True,
            context=_sdpa_context(SDPBackend.MATH),
            description="torch SDPA, MATH backend",
        ),
        Provider(
            "naive-sigmoid",
            _naive_builder,
            "sigmoid",
            materializes=True,
            description="eager torch.sigmoid(q @ k^T * scale + b) @ v",
        ),
        Provider(
            "triton-sigmoid",
            _triton_sigmoid_builder,
            "sigmoid",
            description="PyPI triton-sigmoid: triton_sigmoid.sigmoid_attention",
            check=_peer_check("triton_sigmoid"),
        ),
        Provider(
            "flash-attn",
            _flash_attn_builder,
            "softmax",
            description="PyPI flash-attn: flash_attn.flash_attn_func",
            check=_peer_check("flash_attn"),
        ),
    )
}


def providers_for(device: torch.device | str) -> dict[str, Provider]:
    """PROVIDERS plus a sigattn-<backend> provider for any further backend sigattn reports on device."""
    out = dict(PROVIDERS)
    try:
        import sigattn

        extra = [b for b in sigattn.available_backends(torch.device(device)) if b not in SIGATTN_BACKENDS]
    except Exception:
        extra = []
    for backend in extra:
        name = f"sigattn-{backend}"
        out[name] = Provider(
            name,
            _sigattn_builder(backend, None),
            "sigmoid",
            description=f"sigattn backend {backend!r}",
            check=_sigattn_check(backend),
        )
    return out


def default_providers(device: torch.device | str) -> list[str]:
    """Every provider on CUDA; on CPU all but sigattn-triton*, whose interpreted times say nothing about kernels."""
    names = list(providers_for(device))
    if torch.device(device).type == "cuda":
        return names
    return [n for n in names if not n.startswith("sigattn-triton")]


def provider_status(device: torch.device | str) -> dict[str, str]:
    """'available' or 'unavailable: <why>' for every provider on device, from the cheap checks (runs nothing)."""
    dev = torch.device(device)
    defaults = set(default_providers(dev))
    status = {}
    for name, p in providers_for(dev).items():
        why = p.check(dev)
        if why is not None:
            status[name] = f"unavailable: {why}"
        elif name not in defaults:
            status[name] = "available (Triton interpreter: run only when named in --providers)"
        else:
            status[name] = "available"
    return status

"""Launch configurations of the attention kernels: frozen dataclasses, per-arch defaults, opt-in pinning."""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass, replace
from types import ModuleType

import torch


@dataclass(frozen=True)
class AttnConfig:
    """Tile shape and launch parameters of one kernel. block_m tiles queries, block_n tiles keys."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pipeline_qk: bool = False  # forward only: next tile's q k^T issued before this tile's sigmoid
    block_major: bool = False  # grid order: block index major (heavy causal blocks of all heads first)


@functools.cache
def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1). Read once: Triton decides it when
    the kernels are decorated (at import), so a later change of the variable would not change what they are."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (triton.cdiv is a constexpr_function: ~1 µs of wrapping per call on the host)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of 2 >= n (n >= 1), as triton.next_power_of_2 without its wrapper."""
    return 1 << (n - 1).bit_length()


def fp32_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous float32 tensor, without the two dispatcher calls when it already is one."""
    if t.dtype is torch.float32 and t.is_contiguous():
        return t
    return t.to(torch.float32).contiguous()


def device_index(device: torch.device) -> int:
    """CUDA device index (a tensor's device always has one; a bare "cuda" means the current device)."""
    return torch.cuda.current_device() if device.index is None else device.index


# Per-device facts, cached by device index: torch.cuda.get_device_capability / get_device_properties cost
# microseconds per call, on every launch.
_capability: dict[int, tuple[int, int]] = {}
_sm_counts: dict[int, int] = {}


def cuda_capability(device: torch.device) -> tuple[int, int]:
    idx = device_index(device)
    cap = _capability.get(idx)
    if cap is None:
        cap = _capability[idx] = torch.cuda.get_device_capability(idx)
    return cap


def sm_count(device: torch.device) -> int:
    idx = device_index(device)
    n = _sm_counts.get(idx)
    if n is None:
        n = _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


# The interpreter costs ~2 ms per tile iteration whatever the tile size; 16x16 tiles make the small
# CPU test shapes (17..129 tokens) cross several tiles, so the masked/unmasked loop split is exercised.
INTERPRETER = AttnConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)

# Hopper (sm_90) defaults, bf16/fp16, keyed by padded head dim; from bench/kernel_probe.py sweeps at N=8k,
# H100 (bench/NOTES.md holds the numbers). Picks that avoid spills lost to ones that spill a little (NOTES.md).
_SM90_FWD: dict[int, AttnConfig] = {
    32: AttnConfig(128, 64, 4, 3),
    64: AttnConfig(128, 64, 4, 3),  # 587 TFLOP/s; (128, 64, 4, 4) 543, (64, 64, 4, 3) 479
    # 605 TFLOP/s non-causal ((128, 32, 4, 3) 620, within run-to-run noise); causal 347/507/579 at N=1k/4k/16k
    # against 359/476/522 for (128, 32, 4, 3), so one config serves both.
    128: AttnConfig(128, 64, 4, 2),
    256: AttnConfig(128, 64, 8, 2),
    # Padded head dims load through the rank-3 TMA view; (128, 64, 4, 2) spills 312 B there, this none.
    96: AttnConfig(128, 64, 8, 2),
}
# block_major (all heads' last query blocks first) stays off: one run gave +12% for causal d=128 at 8k, the
# sweep across N gave 252 vs 347 TFLOP/s at 1k, no change at 4k-16k, and -25% at d=64.
_SM90_BWD_DKDV: dict[int, AttnConfig] = {
    32: AttnConfig(64, 64, 4, 3),
    64: AttnConfig(64, 64, 4, 3),  # two-kernel backward 426 TFLOP/s; (64, 128, 8, 3) 367
    128: AttnConfig(64, 128, 8, 3),  # 410 (40 B spill); the spill-free (64, 64, 8, 3) ran 277
    # (64, 64, 8, 2) needs 271 KB of shared memory with the fused dQ buffer; this fits every form (<= 200 KB,
    # 72-120 B spill with TMA); the old (32, 64, 8, 1) spilled 544 B and ran 78 TFLOP/s.
    256: AttnConfig(32, 64, 8, 2),
    96: AttnConfig(64, 128, 8, 2),  # rank-3 TMA view: 56 B spill vs 112 B at 3 stages
}
_SM90_BWD_DQ: dict[int, AttnConfig] = {
    32: AttnConfig(64, 64, 4, 3),
    64: AttnConfig(64, 64, 4, 3),  # 425 with the dK/dV pick above; (128, 64, 8, 3) 402
    128: AttnConfig(128, 64, 8, 3),  # 460; (128, 64, 8, 2) 414, (64, 64, 4, 3) 408
    256: AttnConfig(64, 32, 8, 2),  # 131 KB, no spill with TMA; the old (64, 32, 8, 1) spilled 592 B
}
# dQ by fp32 atomics inside the dK/dV kernel (5 matmuls instead of 7) measured slower than the two
# atomic-free kernels on H100 (d=64: 395 vs 426, d=128: 400 vs 460 TFLOP/s), so it is off by default.
_SM90_FUSED_DQ = False

# Other GPUs (Ampere and older, less shared memory): conservative tiles that fit 100 KB.
_GENERIC_FWD = AttnConfig(64, 64, 4, 2)
_GENERIC_BWD = AttnConfig(64, 64, 4, 1)


def _padded(head_dim: int) -> int:
    return max(32, 1 << (head_dim - 1).bit_length())


def _lookup(table: dict[int, AttnConfig], head_dim: int) -> AttnConfig:
    """The entry for this exact head dim if measured, else the one of its padded power of 2."""
    return table.get(head_dim) or table[_padded(head_dim)]


def _is_sm90(device: torch.device) -> bool:
    return device.type == "cuda" and cuda_capability(device)[0] == 9


# fp32 (3xTF32 matmuls) keeps its tiles and their split hi/lo operands in shared memory: a bf16 config with half the
# key tile and one stage fewer asked for 262 KB (dK/dV, d=128) and 320 KB (dQ, d=96..256) of the 227 KB on an
# H100/H200 (the 2-GPU ring test died on it). These are the largest tiles with the most stages that fit, from sm_90
# compiles with the launch's specialization (python -m sigattn.bench.launch_compile): shared memory in KB per entry.
# Not timed (fp32 is the accuracy path, not the fast one).
_SM90_FP32_FWD: dict[int, AttnConfig] = {
    32: AttnConfig(128, 32, 4, 2),  # 16
    64: AttnConfig(128, 32, 4, 2),  # 32
    96: AttnConfig(128, 32, 8, 1),  # 64
    128: AttnConfig(128, 32, 4, 1),  # 64
    192: AttnConfig(64, 32, 8, 1),  # 192 (pointer path); (128, 32, 8, 1) 320
    256: AttnConfig(128, 32, 8, 1),  # 128
}
_SM90_FP32_BWD_DKDV: dict[int, AttnConfig] = {
    32: AttnConfig(64, 32, 4, 2),  # 32
    64: AttnConfig(64, 32, 4, 2),  # 80
    96: AttnConfig(64, 32, 8, 2),  # 144; (64, 64, 8, 2) 256
    128: AttnConfig(64, 32, 8, 2),  # 144; (64, 64, 8, 2) 256
    192: AttnConfig(32, 32, 8, 1),  # 192 (pointer path)
    256: AttnConfig(32, 32, 8, 1),  # 160
}
_SM90_FP32_BWD_DQ: dict[int, AttnConfig] = {
    32: AttnConfig(64, 32, 4, 2),  # 48
    64: AttnConfig(64, 32, 4, 2),  # 96
    96: AttnConfig(64, 32, 8, 2),  # 192; (128, 32, 8, 2) 320
    128: AttnConfig(64, 32, 8, 2),  # 192; (128, 32, 8, 2) 320
    192: AttnConfig(32, 16, 4, 2),  # 160 (pointer path); (64, 16, 8, 1) 288
    256: AttnConfig(32, 16, 4, 2),  # 164; (64, 16, 8, 1) 288
}


# Resolved configs by (kind, head_dim, dtype, causal, device index): a lookup per launch instead of the table walk
# (and dataclasses.replace for fp32). Cleared whenever a config is pinned.
_resolved: dict[tuple, object] = {}


def forward_config(head_dim: int, dtype: torch.dtype, device: torch.device, causal: bool) -> AttnConfig:
    """Forward tile config for this head dim / dtype / device (causal uses the same tiles)."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER
    key = ("fwd", head_dim, dtype, causal, device_index(device))
    cfg = _resolved.get(key)
    if cfg is None:
        cfg = _resolved[key] = _forward_config(head_dim, dtype, device, causal)
    return cfg  # type: ignore[return-value]


def _forward_config(head_dim: int, dtype: torch.dtype, device: torch.device, causal: bool) -> AttnConfig:
    tuned = _autotuned.get(("fwd", head_dim, dtype, causal))
    if tuned is not None:
        return tuned
    if _is_sm90(device):
        return sm90_forward_config(head_dim, dtype)
    return _GENERIC_FWD


def backward_configs(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[AttnConfig, AttnConfig]:
    """(dK/dV kernel config, dQ kernel config) for this head dim / dtype / device."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER, INTERPRETER
    key = ("bwd", head_dim, dtype, False, device_index(device))
    cfgs = _resolved.get(key)
    if cfgs is None:
        cfgs = _resolved[key] = _backward_configs(head_dim, dtype, device)
    return cfgs  # type: ignore[return-value]


def _backward_configs(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[AttnConfig, AttnConfig]:
    if _is_sm90(device):
        return sm90_backward_configs(head_dim, dtype)
    return _GENERIC_BWD, _GENERIC_BWD


def sm90_forward_config(head_dim: int, dtype: torch.dtype) -> AttnConfig:
    """The sm_90 default forward config (also what sigattn.bench.launch_compile checks without a GPU)."""
    return _lookup(_SM90_FP32_FWD if dtype == torch.float32 else _SM90_FWD, head_dim)


def sm90_backward_configs(head_dim: int, dtype: torch.dtype) -> tuple[AttnConfig, AttnConfig]:
    """The sm_90 default (dK/dV, dQ) configs."""
    if dtype == torch.float32:
        return _lookup(_SM90_FP32_BWD_DKDV, head_dim), _lookup(_SM90_FP32_BWD_DQ, head_dim)
    return _lookup(_SM90_BWD_DKDV, head_dim), _lookup(_SM90_BWD_DQ, head_dim)


def sm90_fused_dq() -> bool:
    """Whether sm_90 adds dQ by atomics inside the dK/dV kernel when not deterministic."""
    return _SM90_FUSED_DQ


def use_fused_dq(deterministic: bool, device: torch.device) -> bool:
    """Whether the backward adds dQ by atomics inside the dK/dV kernel (never when deterministic)."""
    if deterministic:
        return False
    if interpreting() or device.type != "cuda":
        return True  # so the CPU tests exercise the fused form too
    return _SM90_FUSED_DQ if _is_sm90(device) else False


DECODE_MAX_BLOCK_M = 64  # the decode kernel's default M tile cap (its split bucket is chosen before the config)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the KV-cache decode kernel (sigattn.ops.decode).

    block_n keys per tile; the M tile is the group's query rows (nheads_q // nheads_kv · seqlen_q) padded to a power
    of 2 ≥ 16 (tl.dot's minimum), at most max_block_m (more rows take more programs). Split-KV aims at
    programs_per_sm programs per SM, each with ≥ min_tiles_per_split key tiles, at most max_splits splits.
    num_stages_paged: the paged kernel's block-id loads take pipeline stages of their own (sm_90 TTGIR: 3 stages
    give K/V one buffer, 5 give two), so it needs 2 more stages than the contiguous kernel for the same buffering.
    """

    block_n: int
    num_warps: int
    num_stages: int
    num_stages_paged: int
    max_block_m: int = DECODE_MAX_BLOCK_M
    programs_per_sm: int = 2
    min_tiles_per_split: int = 4
    max_splits: int = 64


# Memory-bound: every K/V byte is read once, so each SM must keep ~bandwidth x latency / SMs = 3.35 TB/s x ~1 µs
# / 132 ≈ 25 KB in flight. d=128 bf16, 64-key tiles: K+V = 32 KB per buffer; 3 stages (2 buffers, cp.async) take
# 72 KB of shared memory and 112 registers, no spills (sm_90 ptxas with launch-time specialisation), so 3 programs
# fit an SM. Not yet measured on a GPU: `python -m sigattn.bench.decode --sweep` compares candidates.
_SM90_DECODE: dict[int, DecodeConfig] = {
    32: DecodeConfig(128, 4, 3, 5),
    64: DecodeConfig(128, 4, 3, 5),
    128: DecodeConfig(64, 4, 3, 5),
    256: DecodeConfig(32, 4, 3, 5),
}
# Split bucket: launches whose (sequence, kv head, m block) programs are fewer than the SMs (batch 1-16 at 8 kv
# heads), which fill the GPU only by splitting keys, so each program streams a short run (~256-1000 keys) and the
# pipeline's fill matters. Session 2 sweep, H100, B=1, Hkv=8, d=128, 32k keys, 33 splits: contiguous (64, 4, 4, 6)
# 66.5 µs, (32, 4, 4, 6) 66.6, (128, 4, 3, 5) 71.3, (128, 8, 3, 5) 71.6, the 3-stage (64, 4, 3, 5) 115 and 124 (two
# rows) and (64, 8, 3, 5) 110; paged 68-80 for all six. The 4k rows (~6 µs of GPU work) were host-bound, not a
# ranking: one config timed 147 and 176 µs in one run, and the fastest there (128, 8, 3, 5) was the slowest paged.
# So one pick for every context: the 4-stage 64-key tile (3 K/V buffers in flight). Batch >= 8: all six within 3%.
_SM90_DECODE_SPLIT: dict[int, DecodeConfig] = {
    128: DecodeConfig(64, 4, 4, 6),
}
_GENERIC_DECODE = DecodeConfig(64, 4, 2, 4)
# The interpreter: 16-key tiles so the CPU tests' short caches cross several tiles and split.
INTERPRETER_DECODE = DecodeConfig(16, 4, 1, 1, max_block_m=32, min_tiles_per_split=1)


def decode_config(head_dim: int, dtype: torch.dtype, device: torch.device, split_bucket: bool = False) -> DecodeConfig:
    """Decode kernel config for this head dim / dtype / device (fp32 halves the key tile and drops a stage: d=256
    with 64 query rows then takes 192 KiB of shared memory instead of 224 KiB, next to the 227 KiB limit).
    split_bucket: the launch has fewer (sequence, kv head, m block) programs than SMs (it splits keys to fill them)."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_DECODE
    key = ("decode", head_dim, dtype, split_bucket, device_index(device))
    cfg = _resolved.get(key)
    if cfg is None:
        cfg = _resolved[key] = _decode_config(head_dim, dtype, device, split_bucket)
    return cfg  # type: ignore[return-value]


def _decode_config(head_dim: int, dtype: torch.dtype, device: torch.device, split_bucket: bool) -> DecodeConfig:
    cfg = _decode_pinned.get((head_dim, dtype))
    if cfg is not None:
        return cfg
    if not _is_sm90(device):
        return _GENERIC_DECODE
    cfg = (split_bucket and _SM90_DECODE_SPLIT.get(head_dim)) or _lookup(_SM90_DECODE, head_dim)
    if dtype != torch.float32:
        return cfg
    return replace(cfg, block_n=max(16, cfg.block_n // 2), num_stages=max(2, cfg.num_stages - 1),
                   num_stages_paged=max(2, cfg.num_stages_paged - 1))


_decode_pinned: dict[tuple[int, torch.dtype], DecodeConfig] = {}


def set_decode_config(head_dim: int, dtype: torch.dtype, config: DecodeConfig | None) -> None:
    """Pin (or with None, unpin) the decode kernel config used for (head_dim, dtype) on CUDA."""
    if config is None:
        _decode_pinned.pop((head_dim, dtype), None)
    else:
        _decode_pinned[(head_dim, dtype)] = config
    _resolved.clear()


# Opt-in autotune results (filled by `set_forward_config`, e.g. from bench/kernel_probe.py): key
# ("fwd", head_dim, dtype, causal) -> config. Nothing is tuned implicitly at call time.
_autotuned: dict[tuple[str, int, torch.dtype, bool], AttnConfig] = {}


def set_forward_config(head_dim: int, dtype: torch.dtype, causal: bool, config: AttnConfig) -> None:
    """Pin the forward config used for (head_dim, dtype, causal) on CUDA, overriding the defaults."""
    _autotuned[("fwd", head_dim, dtype, causal)] = config
    _resolved.clear()


# The Gluon forward (sigattn/ops/gluon_forward.py: warp-specialized TMA producer + ping-pong wgmma consumers) serves
# sm_90, bf16/fp16, head dim 128 (dispatch; 64 when called directly), no window/ALiBi, default configs;
# 1.16-1.24x cuDNN at d=128 (bench/NOTES.md, v6). Its output is bitwise equal to the portable kernel's, so the
# backward is unchanged.
# SIGATTN_GLUON=0 (or set_gluon_forward(False)) keeps every forward on the portable Triton kernel.
_gluon_forward = os.environ.get("SIGATTN_GLUON", "1") != "0"


def gluon_forward_enabled() -> bool:
    """Whether dense forwards the Gluon kernel supports go to it."""
    return _gluon_forward


def set_gluon_forward(enabled: bool) -> None:
    """Route supported dense forwards to the Gluon kernel (True, the default) or keep the portable kernel."""
    global _gluon_forward
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool; got {type(enabled).__name__}")
    _gluon_forward = enabled


# The Gluon backward (sigattn/ops/gluon_backward.py: TMA producer warp, two wgmma consumer warpgroups per 128 keys,
# dQ by TMA reduce-adds) serves sm_90, bf16/fp16, head dims 64 and 128, no window/ALiBi, when not deterministic
# (dQ's fp32 adds land in any order; dK/dV are bitwise reproducible). SIGATTN_GLUON_BWD=0 (or
# set_gluon_backward(False)) keeps every backward on the portable Triton kernels.
_gluon_backward = os.environ.get("SIGATTN_GLUON_BWD", "1") != "0"


def gluon_backward_enabled() -> bool:
    """Whether dense backwards the Gluon kernel supports go to it."""
    return _gluon_backward


def set_gluon_backward(enabled: bool) -> None:
    """Route supported dense backwards to the Gluon kernel (True, the default) or keep the portable kernels."""
    global _gluon_backward
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool; got {type(enabled).__name__}")
    _gluon_backward = enabled


# The Gluon kernels' VARLEN form is experimental and OFF by default: its first GPU run (session 4, H100) hit an
# illegal memory access in the forward (tests/ops/test_gluon_varlen.py, case 0, grid schedule), so varlen calls keep
# the portable Triton kernels unless SIGATTN_GLUON_VARLEN=1 (or set_gluon_varlen(True)) opts in.
_gluon_varlen = os.environ.get("SIGATTN_GLUON_VARLEN", "0") == "1"


def gluon_varlen_enabled() -> bool:
    """Whether varlen calls the Gluon kernels support go to their VARLEN form (experimental, default off)."""
    return _gluon_varlen


def set_gluon_varlen(enabled: bool) -> None:
    """Route supported varlen calls to the Gluon kernels' VARLEN form (experimental) or keep the portable kernels
    (False, the default). The dense Gluon switches apply as well."""
    global _gluon_varlen
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool; got {type(enabled).__name__}")
    _gluon_varlen = enabled


_lazy_modules: dict[str, ModuleType] = {}


def lazy_module(name: str) -> ModuleType:
    """Module `name`, imported on first use and kept: for modules a hot path must not import at start-up (Triton's
    for the reference path, Gluon's off sm_90). A function-level `from ... import` per call cost 0.3-0.7 µs (CPU);
    callers look the module's functions up per call, so patched ones are seen."""
    module = _lazy_modules.get(name)
    if module is None:
        module = _lazy_modules[name] = importlib.import_module(name)
    return module


# Imported on the first launch (configs imports without Triton; fast_launch imports configs), then kept: the two
# function-level imports cost ~1.3 µs per launch (CPU). fast_launch.launch is looked up per call, so a patched one
# is seen.
_fast_launch: ModuleType | None = None
_out_of_resources: type[Exception] | None = None  # set before _fast_launch (one tuple assignment, in that order)


def launch_fitting(kernel, grid: tuple[int, ...], *args, num_stages: int, **kwargs) -> tuple[object, int]:
    """kernel[grid](*args, num_stages=num_stages, **kwargs), retried with one pipeline stage fewer each time Triton
    reports that the compiled kernel needs more shared memory than the GPU has. A safety net, not the plan: the sm_90
    defaults are checked against the launch's own compile (tests/ops/test_configs.py; the fp32 configs once asked for
    262 KB of the 227 KB). Triton raises before the launch, so nothing was written. Returns (fast_launch.launch's
    result, the stages that launched)."""
    global _fast_launch, _out_of_resources
    if _fast_launch is None:
        from triton.runtime.errors import OutOfResources

        from sigattn.ops import fast_launch

        _out_of_resources, _fast_launch = OutOfResources, fast_launch
    stages = num_stages  # launched as given first: a config's 0 (or less) is Triton's to take or refuse
    while True:
        try:
            return _fast_launch.launch(kernel, grid, *args, num_stages=stages, **kwargs), stages
        except _out_of_resources:  # type: ignore[misc]
            stages -= 1
            if stages < 1:
                raise

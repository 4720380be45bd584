"""Launch configurations of the attention kernels: frozen dataclasses, per-arch defaults, opt-in pinning."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

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


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The interpreter costs ~2 ms per tile iteration whatever the tile size; 16x16 tiles make the small
# CPU test shapes (17..129 tokens) cross several tiles, so the masked/unmasked loop split is exercised.
INTERPRETER = AttnConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)

# Hopper (sm_90) defaults, bf16/fp16, keyed by padded head dim; from bench/kernel_probe.py sweeps
# (bench/NOTES.md holds the numbers).
_SM90_FWD: dict[int, AttnConfig] = {
    32: AttnConfig(128, 64, 4, 3),
    64: AttnConfig(128, 64, 4, 3),  # 588 TFLOP/s at N=8k (TMA); (128, 64, 8, 3) 514, (128, 64, 8, 4) 509
    128: AttnConfig(128, 64, 4, 2),  # 645 TFLOP/s at N=8k (TMA); (64, 64, 4, 3) 629, (128, 64, 8, 3) 540
    256: AttnConfig(128, 64, 8, 2),
}
_SM90_BWD_DKDV: dict[int, AttnConfig] = {
    32: AttnConfig(64, 64, 4, 3),
    64: AttnConfig(64, 64, 4, 3),  # fused dQ: 393 TFLOP/s at N=8k; (32, 128, 4, 3) 343
    128: AttnConfig(64, 128, 8, 3),  # fused dQ: 403 TFLOP/s at N=8k; (64, 128, 8, 2) 339
    256: AttnConfig(32, 64, 8, 1),
}
_SM90_BWD_DQ: dict[int, AttnConfig] = {
    32: AttnConfig(128, 64, 8, 2),
    64: AttnConfig(128, 64, 8, 2),
    128: AttnConfig(128, 64, 8, 2),
    256: AttnConfig(64, 32, 8, 1),
}
# Other GPUs (Ampere and older, less shared memory): conservative tiles that fit 100 KB.
_GENERIC_FWD = AttnConfig(64, 64, 4, 2)
_GENERIC_BWD = AttnConfig(64, 64, 4, 1)


def _padded(head_dim: int) -> int:
    return max(32, 1 << (head_dim - 1).bit_length())


def _is_sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _fp32_fit(cfg: AttnConfig, dtype: torch.dtype) -> AttnConfig:
    """fp32 tiles take twice the shared memory: halve the key tile and keep one stage fewer."""
    if dtype != torch.float32:
        return cfg
    return replace(cfg, block_n=max(16, cfg.block_n // 2), num_stages=max(1, cfg.num_stages - 1))


def forward_config(head_dim: int, dtype: torch.dtype, device: torch.device, causal: bool) -> AttnConfig:
    """Forward tile config for this head dim / dtype / device (causal uses the same tiles)."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER
    tuned = _autotuned.get(("fwd", head_dim, dtype, causal))
    if tuned is not None:
        return tuned
    if _is_sm90(device):
        return _fp32_fit(_SM90_FWD[_padded(head_dim)], dtype)
    return _GENERIC_FWD


def backward_configs(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[AttnConfig, AttnConfig]:
    """(dK/dV kernel config, dQ kernel config) for this head dim / dtype / device."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER, INTERPRETER
    if _is_sm90(device):
        p = _padded(head_dim)
        return _fp32_fit(_SM90_BWD_DKDV[p], dtype), _fp32_fit(_SM90_BWD_DQ[p], dtype)
    return _GENERIC_BWD, _GENERIC_BWD


# Opt-in autotune results (filled by `set_forward_config`, e.g. from bench/kernel_probe.py): key
# ("fwd", head_dim, dtype, causal) -> config. Nothing is tuned implicitly at call time.
_autotuned: dict[tuple[str, int, torch.dtype, bool], AttnConfig] = {}


def set_forward_config(head_dim: int, dtype: torch.dtype, causal: bool, config: AttnConfig) -> None:
    """Pin the forward config used for (head_dim, dtype, causal) on CUDA, overriding the defaults."""
    _autotuned[("fwd", head_dim, dtype, causal)] = config

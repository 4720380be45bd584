"""Context parallelism: ring and all-gather across 2 and 4 gloo processes equal single-process attention; sharding."""

from __future__ import annotations

import json
import math
import os
import sys
import zlib
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sigattn import available_backends, sigmoid_attn_func
from sigattn.distributed import (
    all_gather_sigmoid_attn,
    gather_sequence,
    ring_sigmoid_attn,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)
from sigattn.distributed import context_parallel as cp_module
from sigattn.distributed import ring as ring_module
from sigattn.distributed.ring import LocalArgs, Ring, RingSigmoidAttn, StepTimer
from sigattn.distributed.sharding import chunk_ids, gathered_plan, pair_plan

# ---------------------------------------------------------------- sharding (no processes)


@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip(sharding: str, world: int) -> None:
    n = 2 * world * 3
    x = torch.randn(2, n, 3, 5)
    shards = [shard_sequence(x, r, world, sharding) for r in range(world)]
    assert all(s.shape == (2, n // world, 3, 5) for s in shards)
    torch.testing.assert_close(unshard_sequence(shards, sharding), x, rtol=0, atol=0)
    pos = torch.cat([shard_positions(n, r, world, sharding) for r in range(world)])
    assert sorted(pos.tolist()) == list(range(n))
    for r in range(world):
        torch.testing.assert_close(shards[r], x[:, shard_positions(n, r, world, sharding)], rtol=0, atol=0)


def test_zigzag_layout_and_other_dims() -> None:
    assert [chunk_ids(r, 4, "zigzag") for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert shard_positions(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert shard_positions(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    x = torch.arange(24).reshape(2, 12)
    torch.testing.assert_close(shard_sequence(x, 1, 3, "zigzag", dim=-1), x[:, [2, 3, 8, 9]])
    torch.testing.assert_close(unshard_sequence([shard_sequence(x, r, 3, dim=1) for r in range(3)], dim=1), x)


def test_sharding_errors() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        shard_sequence(torch.zeros(1, 10), 0, 2, "zigzag")
    with pytest.raises(ValueError, match="sharding must be one of"):
        shard_sequence(torch.zeros(1, 8), 0, 2, "striped")
    with pytest.raises(ValueError, match="rank < world"):
        shard_sequence(torch.zeros(1, 8), 2, 2)
    with pytest.raises(ValueError, match="must be even"):
        unshard_sequence([torch.zeros(1, 3)] * 2, "zigzag")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_plans_cover_the_global_causal_mask(sharding: str, world: int, causal: bool) -> None:
    """Every (query, key) pair of the global mask is attended exactly once by the ring and the gathered plans."""
    length = 2 * 3
    n = world * length
    pos = [shard_positions(n, r, world, sharding).tolist() for r in range(world)]
    want = torch.ones(n, n, dtype=torch.int64)
    if causal:
        want = want.tril()
    for name in ("ring", "gathered"):
        got = torch.zeros(n, n, dtype=torch.int64)
        for qr in range(world):
            pairs = [(kr, pair_plan(qr, kr, world, length, causal, sharding)) for kr in range(world)]
            if name == "gathered":
                pairs = [(None, gathered_plan(qr, world, length, causal, sharding))]
            for kr, blocks in pairs:
                keys = list(range(n)) if kr is None else pos[kr]
                for b in blocks:
                    for qi in range(b.q_start, b.q_end):
                        for kj in range(b.kv_end):
                            # bottom-right causal inside the block: row qi - q_start sees kj <= its diagonal
                            diag = qi - b.q_start + b.kv_end - (b.q_end - b.q_start)
                            if not b.causal or kj <= diag:
                                got[pos[qr][qi], keys[kj]] += 1
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name} plan")


def test_zigzag_ring_work_is_balanced() -> None:
    """Causal zigzag: every rank attends the same number of (query, key) pairs over the whole ring."""
    world, length = 4, 6
    work = []
    for qr in range(world):
        blocks = [b for kr in range(world) for b in pair_plan(qr, kr, world, length, True, "zigzag")]
        work.append(sum((b.q_end - b.q_start) * b.kv_end / (2 if b.causal else 1) for b in blocks))
    assert len(set(work)) == 1, work


# ---------------------------------------------------------------- multi-process (gloo on CPU, NCCL on GPUs)


@dataclass(frozen=True)
class Case:
    """One comparison of a context-parallel call with sigmoid_attn_func over the whole sequence."""

    name: str
    fn: str  # "ring" | "all_gather"
    causal: bool
    sharding: str
    nheads: int
    nheads_kv: int
    bias: str  # "none" (default -log N) | "float" | "scalar" (() tensor) | "per_head" ((nheads,) tensor)
    dtype: str
    headdim: int = 12
    reduce_bias_grad: bool = False
    strided: bool = False  # q/k/v as transposed views of (batch, nheads, seqlen, headdim) tensors
    subgroups: bool = False  # two interleaved CP groups of world / 2 ranks, different data in each
    backend: str = "auto"  # of the local calls; "triton" on CPU runs the kernels under Triton's interpreter
    deterministic: bool = False
    timed: bool = False  # through RingSigmoidAttn with a StepTimer: also checks the overlap marks


CPU_CASES = [
    Case("ring-causal-zigzag-perhead", "ring", True, "zigzag", 4, 4, "per_head", "float64"),
    Case("ring-causal-zigzag-gqa-reduce", "ring", True, "zigzag", 4, 2, "per_head", "float64", reduce_bias_grad=True),
    Case("ring-causal-contiguous-gqa-default", "ring", True, "contiguous", 4, 2, "none", "float64", headdim=8),
    Case("ring-full-zigzag-mqa-scalar", "ring", False, "zigzag", 4, 1, "scalar", "float64"),
    Case("ring-full-contiguous-float-fp32", "ring", False, "contiguous", 2, 2, "float", "float32"),
    Case("ring-causal-zigzag-gqa-fp32", "ring", True, "zigzag", 4, 2, "per_head", "float32"),
    Case("ring-causal-zigzag-gqa-bf16", "ring", True, "zigzag", 4, 2, "per_head", "bfloat16"),
    # A contiguous causal shard wholly after the queries has no block: its dK/dV zeros must travel in bf16/fp16.
    Case("ring-causal-contiguous-gqa-bf16", "ring", True, "contiguous", 4, 2, "per_head", "bfloat16"),
    Case("ring-causal-contiguous-fp16", "ring", True, "contiguous", 2, 2, "none", "float16"),
    Case("ring-causal-zigzag-strided", "ring", True, "zigzag", 2, 1, "per_head", "float64", strided=True),
    Case("ring-causal-zigzag-subgroups", "ring", True, "zigzag", 4, 2, "per_head", "float64", subgroups=True),
    Case("allgather-causal-zigzag-gqa", "all_gather", True, "zigzag", 4, 2, "per_head", "float64"),
    Case("allgather-causal-contiguous-default", "all_gather", True, "contiguous", 2, 2, "none", "float64"),
    Case("allgather-full-zigzag-mqa-fp32", "all_gather", False, "zigzag", 4, 1, "scalar", "float32",
         reduce_bias_grad=True),
    Case("ring-causal-zigzag-timed", "ring", True, "zigzag", 2, 2, "scalar", "float64", timed=True),
    Case("ring-causal-zigzag-gqa-triton", "ring", True, "zigzag", 4, 2, "per_head", "float32", headdim=16,
         backend="triton"),
    Case("ring-causal-contiguous-fp16-triton", "ring", True, "contiguous", 2, 1, "scalar", "float16", headdim=16,
         backend="triton", deterministic=True),
    Case("allgather-causal-zigzag-triton", "all_gather", True, "zigzag", 2, 2, "per_head", "float32", headdim=16,
         backend="triton"),
]
# The interpreted kernels cost ~0.1 s a call: the 4-process spawn runs one of them.
CPU_RUNS = [(w, c) for w in (2, 4) for c in CPU_CASES
            if c.backend != "triton" or w == 2 or c.name == "ring-causal-zigzag-gqa-triton"]

GPU_CASES = [
    Case("gpu-ring-causal-zigzag-gqa-bf16", "ring", True, "zigzag", 8, 2, "per_head", "bfloat16", headdim=64),
    Case("gpu-ring-causal-zigzag-bf16-d128-timed", "ring", True, "zigzag", 16, 16, "none", "bfloat16", headdim=128,
         timed=True),
    Case("gpu-ring-causal-zigzag-bf16-deterministic", "ring", True, "zigzag", 4, 2, "scalar", "bfloat16",
         headdim=128, deterministic=True, reduce_bias_grad=True),
    Case("gpu-ring-full-contiguous-gqa-bf16", "ring", False, "contiguous", 8, 2, "per_head", "bfloat16", headdim=96),
    Case("gpu-ring-causal-contiguous-fp16", "ring", True, "contiguous", 4, 4, "none", "float16", headdim=64),
    Case("gpu-ring-full-zigzag-fp32", "ring", False, "zigzag", 4, 1, "float", "float32", headdim=128),
    Case("gpu-allgather-causal-zigzag-bf16", "all_gather", True, "zigzag", 8, 2, "per_head", "bfloat16", headdim=64),
]


def _local_length(case: Case, world: int, gpu: bool) -> int:
    """Odd lengths: zigzag chunks of 5 or 3 tokens; contiguous shards of 7 or 5 (GPU: a few kernel tiles)."""
    if gpu:
        return 2 * 97 if case.sharding == "zigzag" else 161
    if case.sharding == "zigzag":
        return 2 * (5 if world <= 2 else 3)
    return 7 if world <= 2 else 5


def _tolerance(single: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """4x the error of the same math done in one process in `dtype`, plus fp32 (fp64) summation slack."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = ref.abs().max().item()
    return 4 * (single.double() - ref).abs().max().item() + 64 * torch.finfo(acc).eps * scale


def _run_case(case: Case, world: int, rank: int, device: torch.device) -> list[str]:
    """Runs one case on this rank; returns the failures (empty = pass)."""
    group, cp_world, cp_rank, seed_extra = None, world, rank, 0
    if case.subgroups:
        # Every rank creates every group (new_group is collective); CP groups {0, 2, ..} and {1, 3, ..}.
        groups = [dist.new_group(list(range(p, world, 2))) for p in (0, 1)]
        group = groups[rank % 2]
        cp_world, cp_rank, seed_extra = world // 2, rank // 2, rank % 2
    dtype = getattr(torch, case.dtype)
    gpu = device.type == "cuda"
    length = _local_length(case, cp_world, gpu)
    n = cp_world * length
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()) + seed_extra)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    b, h, hkv, d = 2, case.nheads, case.nheads_kv, case.headdim
    q, k, v, do = rand(b, n, h, d), rand(b, n, hkv, d), rand(b, n, hkv, d), rand(b, n, h, d)
    bias_value: float | torch.Tensor | None = {
        "none": None,
        "float": -2.5,
        "scalar": torch.tensor(-2.0, dtype=torch.float64, device=device),
        "per_head": -2.0 + 0.5 * torch.randn(h, generator=gen, dtype=torch.float64).to(device),
    }[case.bias]

    def full(inputs: list[torch.Tensor], bias: float | torch.Tensor | None, backend: str) -> list[torch.Tensor]:
        leaves = [t.detach().requires_grad_() for t in inputs]
        bl = bias.detach().requires_grad_() if isinstance(bias, torch.Tensor) else bias
        out = sigmoid_attn_func(*leaves, bias=bl, causal=case.causal, backend=backend, deterministic=case.deterministic)
        grads = torch.autograd.grad(out, leaves + ([bl] if isinstance(bl, torch.Tensor) else []), do.to(out.dtype))
        return [out.detach(), *grads]

    lp_bias = bias_value
    if isinstance(bias_value, torch.Tensor):
        lp_bias = bias_value.to(torch.float64 if dtype == torch.float64 else torch.float32)
    ref = full([q.double(), k.double(), v.double()], bias_value, "reference")
    single = full([q, k, v], lp_bias, case.backend)

    def local(x: torch.Tensor) -> torch.Tensor:
        x = shard_sequence(x, cp_rank, cp_world, case.sharding)
        if case.strided:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return x.detach().requires_grad_()

    leaves = [local(q), local(k), local(v)]
    bias_l = lp_bias
    if isinstance(lp_bias, torch.Tensor):
        bias_l = lp_bias.detach().requires_grad_()
        leaves.append(bias_l)
    fn = ring_sigmoid_attn if case.fn == "ring" else all_gather_sigmoid_attn
    timer = StepTimer(gpu) if case.timed else None
    if timer is not None:
        bias_t = bias_l if isinstance(bias_l, torch.Tensor) else None
        bias_f = -math.log(n) if bias_l is None else (0.0 if bias_t is not None else bias_l)
        args = LocalArgs(case.headdim**-0.5, case.deterministic, "fast", case.backend)
        out = RingSigmoidAttn.apply(*leaves[:3], bias_t, bias_f, Ring(group, timer), case.causal, case.sharding,
                                    args, case.reduce_bias_grad)
    else:
        out = fn(*leaves[:3], group=group, bias=bias_l, causal=case.causal, sharding=case.sharding,
                 reduce_bias_grad=case.reduce_bias_grad, backend=case.backend, deterministic=case.deterministic)
    grads = list(torch.autograd.grad(out, leaves, shard_sequence(do, cp_rank, cp_world, case.sharding)))
    if len(grads) == 4 and not case.reduce_bias_grad:
        dist.all_reduce(grads[3], group=group)  # the trainer's sum over the CP group
    gathered_out = gather_sequence(out.detach(), group, case.sharding)

    failures = [] if timer is None else _timer_failures(timer, cp_world)
    for name, g, want_dtype, r, s in zip(
        ["out", "dq", "dk", "dv", "dbias"], [out, *grads], [dtype] + [t.dtype for t in leaves], ref, single
    ):
        if g.dtype != want_dtype:
            failures.append(f"{name}: dtype {g.dtype}, want {want_dtype}")
        if name != "dbias":
            r = shard_sequence(r, cp_rank, cp_world, case.sharding)
            s = shard_sequence(s, cp_rank, cp_world, case.sharding)
        err, tol = (g.detach().double() - r).abs().max().item(), _tolerance(s, r, dtype)
        if not err <= tol:
            failures.append(f"{name}: max abs err {err:.3g} > tol {tol:.3g}")
    if not torch.equal(shard_sequence(gathered_out, cp_rank, cp_world, case.sharding), out.detach()):
        failures.append("gather_sequence does not give back the local shard")
    err, tol = (gathered_out.double() - ref[0]).abs().max().item(), _tolerance(single[0], ref[0], dtype)
    if not err <= tol:
        failures.append(f"gather_sequence: max abs err {err:.3g} > tol {tol:.3g}")
    return failures


def _timer_failures(timer: StepTimer, world: int) -> list[str]:
    """The marks of one forward + backward: a compute span per step, a wait span per transfer, none negative."""
    if timer.cuda:
        torch.cuda.synchronize()
    spans = timer.spans()
    fwd = ["fwd0.compute"] + [x for s in range(1, world) for x in (f"fwd{s - 1}.kv_wait", f"fwd{s}.compute")]
    bwd = ["bwd0.compute"]
    for s in range(1, world):
        bwd += [f"bwd{s - 1}.kv_wait", f"bwd{s}.compute"] + ([f"bwd{s}.dkdv_wait"] if s > 1 else [])
    want = fwd + ["bwd.start"] + bwd + (["bwd.dkdv_wait"] if world > 1 else [])
    failures = []
    if [label for label, _ in spans] != want:
        failures.append(f"timer marks {[label for label, _ in spans]}, want {want}")
    if any(not ms >= 0 for _, ms in spans):
        failures.append(f"negative or NaN timer span: {spans}")
    return failures


def _worker(rank: int, world: int, store: str, out_dir: str, backend: str, cases: list[dict]) -> None:
    torch.set_num_threads(1)
    if sys.platform == "linux":
        # Loopback: gloo otherwise binds to whatever the host name resolves to, which CI containers get wrong.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = {}
    try:
        # An exception ends the worker (spawn then stops the others and raises its traceback in the parent):
        # the other ranks would otherwise wait in a collective until the timeout.
        for c in cases:
            case = Case(**c)
            try:
                results[case.name] = _run_case(case, world, rank, device)
            except Exception as e:  # name the case: one spawn runs them all and pytest shows only the first id
                raise RuntimeError(f"rank {rank}, case {case.name}: {type(e).__name__}: {e}") from e
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Results written, group destroyed: skip interpreter finalization, where torch's gloo sometimes aborts
    # (tests/distributed/test_modules.py, _leave). Reached only when the worker succeeded.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def _spawn(world: int, tmp: Path, backend: str, cases: list[Case]) -> dict[str, list[str]]:
    """Runs all cases in `world` processes; returns {case name: failures on any rank}."""
    import torch.multiprocessing as mp

    tmp.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world, str(tmp / "store"), str(tmp), backend, [asdict(c) for c in cases]),
             nprocs=world, join=True)
    merged: dict[str, list[str]] = {c.name: [] for c in cases}
    for r in range(world):
        for name, fails in json.loads((tmp / f"rank{r}.json").read_text()).items():
            merged[name] += [f"rank {r}: {f}" for f in fails]
    return merged


_RESULTS: dict[tuple[str, int], dict[str, list[str]]] = {}


def _results(backend: str, world: int, tmp_path_factory: pytest.TempPathFactory, cases: list[Case]) -> dict:
    """One spawn per (backend, world size) for all of its cases: starting processes costs seconds each."""
    key = (backend, world)
    if key not in _RESULTS:
        _RESULTS[key] = _spawn(world, tmp_path_factory.mktemp(f"cp_{backend}_{world}"), backend, cases)
    return _RESULTS[key]


@pytest.mark.parametrize(("world", "case"), CPU_RUNS, ids=[f"{w}-{c.name}" for w, c in CPU_RUNS])
def test_gloo_matches_single_process(world: int, case: Case, tmp_path_factory: pytest.TempPathFactory) -> None:
    if case.backend == "triton" and "triton" not in available_backends("cpu"):
        pytest.skip("the Triton interpreter is not available")
    cases = [c for w, c in CPU_RUNS if w == world]
    failures = _results("gloo", world, tmp_path_factory, cases)[case.name]
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_nccl_matches_single_process(case: Case, tmp_path_factory: pytest.TempPathFactory) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    failures = _results("nccl", 2, tmp_path_factory, GPU_CASES)[case.name]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- one process: argument checks, world = 1


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory: pytest.TempPathFactory):
    """A gloo group of this process alone; the ring degenerates to one local call."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = tmp_path_factory.mktemp("cp_world1") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_needs_a_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_sigmoid_attn(x, x, x)


@pytest.mark.parametrize("fn", [ring_sigmoid_attn, all_gather_sigmoid_attn])
@pytest.mark.parametrize("causal", [False, True])
def test_world_of_one_equals_local_call(world_of_one: None, fn, causal: bool) -> None:
    q, k, v = (torch.randn(2, 6, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.full((4,), -1.5, dtype=torch.float64, requires_grad=True)
    out = fn(q, k, v, bias=bias, causal=causal)
    ref = sigmoid_attn_func(q, k, v, bias=bias, causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), do)
    want = torch.autograd.grad(ref, (q, k, v, bias), do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    default = fn(q, k, v, causal=causal)
    torch.testing.assert_close(default, sigmoid_attn_func(q, k, v, causal=causal, bias=-math.log(6)))


@pytest.mark.parametrize(
    ("kwargs", "shape", "error", "match"),
    [
        ({"window_size": (4, 0)}, (1, 4, 2, 8), ValueError, "window_size is not supported"),
        ({"alibi_slopes": torch.ones(2)}, (1, 4, 2, 8), ValueError, "alibi_slopes is not supported"),
        ({"causal": True}, (1, 5, 2, 8), ValueError, "seqlen_local must be even"),
        ({"sharding": "striped"}, (1, 4, 2, 8), ValueError, "sharding must be one of"),
        ({"bias": torch.zeros(3)}, (1, 4, 2, 8), ValueError, "bias tensor must have shape"),
        ({"reduce_bias_grad": 1}, (1, 4, 2, 8), TypeError, "reduce_bias_grad must be a bool"),
        ({}, (1, 0, 2, 8), ValueError, "at least one token"),
    ],
)
@pytest.mark.parametrize("fn", [ring_sigmoid_attn, all_gather_sigmoid_attn])
def test_argument_errors(world_of_one: None, fn, kwargs: dict, shape: tuple, error: type, match: str) -> None:
    x = torch.randn(*shape)
    with pytest.raises(error, match=match):
        fn(x, x, x, **kwargs)


@pytest.mark.parametrize("fn", [ring_sigmoid_attn, all_gather_sigmoid_attn])
def test_backward_recomputes_no_forward(world_of_one: None, fn, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward calls the backward entry point once per block and never the forward (no recompute)."""
    calls: list[str] = []
    real_fwd, real_bwd = ring_module.sigmoid_attn_func, ring_module.sigmoid_attn_backward
    monkeypatch.setattr(ring_module, "sigmoid_attn_func", lambda *a, **kw: calls.append("fwd") or real_fwd(*a, **kw))
    monkeypatch.setattr(ring_module, "sigmoid_attn_backward",
                        lambda *a, **kw: calls.append("bwd") or real_bwd(*a, **kw))
    monkeypatch.setattr(cp_module, "sigmoid_attn_func", lambda *a, **kw: calls.append("fwd") or real_fwd(*a, **kw))
    q, k, v = (torch.randn(1, 6, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.tensor(-1.0, dtype=torch.float64)  # a tensor that needs no gradient: none is returned
    out = fn(q, k, v, bias=bias, causal=True)
    calls.clear()
    out.backward(torch.randn_like(out))
    assert calls == ["bwd"] * (1 if fn is ring_sigmoid_attn else 2)  # all-gather: one block per zigzag chunk
    assert bias.grad is None and q.grad is not None


def test_causal_contiguous_allows_odd_local_length(world_of_one: None) -> None:
    x = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    out = ring_sigmoid_attn(x, x, x, causal=True, sharding="contiguous")
    torch.testing.assert_close(out, sigmoid_attn_func(x, x, x, causal=True))


def test_qkv_must_share_positions(world_of_one: None) -> None:
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="same positions"):
        ring_sigmoid_attn(q, k, k)


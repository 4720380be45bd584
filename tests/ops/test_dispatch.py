"""Which kernel serves a backward or varlen call: the Gluon dispatch rules, checked on CPU with the kernels stubbed
(the GPU tests in test_gluon_backward.py and test_gluon_varlen.py run the real thing)."""

from __future__ import annotations

import pytest
import torch

from sigattn.ops import backward, configs, gluon_backward


@pytest.mark.parametrize("name", ["set_gluon_forward", "set_gluon_backward"])
def test_gluon_switches_take_bools(name):
    setter = getattr(configs, name)
    getter = getattr(configs, name.replace("set_", "") + "_enabled")
    was = getter()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        setter("no")
    try:
        setter(not was)
        assert getter() is (not was)
    finally:
        setter(was)
    assert getter() is was


@pytest.fixture
def routes(monkeypatch):
    """Pretend to be an sm_90 GPU the Gluon backward supports; record which launcher each call reaches."""
    seen: list[str] = []

    def gluon(do, q, k, v, bias, scale, causal, impl, need_dbias=True, checked=False):
        seen.append("gluon")
        assert do.is_contiguous()
        assert checked  # the dispatch has just asked gluon_bwd_supports: no second check
        z = torch.zeros_like(q)
        return z, torch.zeros_like(k), torch.zeros_like(v), torch.zeros(q.shape[2]) if need_dbias else None

    def portable(do, q, k, v, bias, *args):
        seen.append("portable")
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None

    monkeypatch.setattr(backward, "_gluon_bwd_ready", lambda q: configs.gluon_backward_enabled())
    monkeypatch.setattr(gluon_backward, "gluon_bwd_supports", lambda do, q, k, v: None)
    monkeypatch.setattr(gluon_backward, "gluon_dense_bwd", gluon)
    monkeypatch.setattr(backward, "launch_bwd", portable)
    return seen


def _call(**kw):
    q = torch.randn(1, 8, 2, 64)
    k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 8, 1, 64)
    do = kw.pop("do", torch.randn(1, 8, 2, 64))
    args = dict(bias=torch.zeros(2), scale=0.125, causal=True, window_left=-1, window_right=-1, alibi_slopes=None,
                deterministic=False, sigmoid_impl="fast")
    args.update(kw)
    return backward.sigmoid_attn_bwd(do, q, k, v, **args)


def test_default_backward_goes_to_gluon(routes):
    dq, dk, dv, dbias = _call()
    assert routes == ["gluon"]
    assert dbias.shape == (2,)
    _call(do=torch.randn(1, 8, 2, 64).transpose(1, 2).contiguous().transpose(1, 2))  # strided dO: made contiguous
    _call(need_dbias=False)
    assert routes == ["gluon"] * 3


@pytest.mark.parametrize("kw", [
    {"deterministic": True},
    {"alibi_slopes": torch.ones(1, 2)},
    {"window_left": 3},
    {"causal": False, "window_right": 2},
    {"fused_dq": True},
    {"fused_dq": False},
    {"use_tma": False},
    {"bias": torch.zeros(1, 2)},
], ids=["deterministic", "alibi", "window-left", "window-right", "fused-dq", "two-kernel", "use-tma", "batch-bias"])
def test_what_keeps_the_portable_kernels(routes, kw):
    _call(**kw)
    assert routes == ["portable"]


def test_switch_off_keeps_the_portable_kernels(routes):
    configs.set_gluon_backward(False)
    try:
        _call()
    finally:
        configs.set_gluon_backward(True)
    _call()
    assert routes == ["portable", "gluon"]


@pytest.mark.parametrize("through_op", [False, True])
def test_autograd_paths_reach_the_dispatch(routes, through_op):
    """Eager autograd (the autograd.Function that skips the custom op) and the custom op's registered backward
    both go through sigmoid_attn_bwd's dispatch (eager once called the portable launcher directly)."""
    import sigattn

    q = torch.randn(1, 8, 2, 64, requires_grad=True)
    k, v = (torch.randn(1, 8, 1, 64, requires_grad=True) for _ in range(2))
    if through_op:
        out = torch.ops.sigattn.dense_fwd(q, k, v, torch.zeros(2), 0.125, True, -1, 0, None, False, "fast")
    else:
        out = sigattn.sigmoid_attn_func(q, k, v, causal=True, backend="triton")
    out.sum().backward()
    assert routes == ["gluon"]


def test_gluon_backward_refuses_grids_past_cuda_limit():
    """batch * kv heads is the launch grid's y dimension (CUDA: at most 65535): past it the supports check says no,
    so the dispatch keeps the portable kernels (checked before any device facts: runs on CPU tensors)."""
    from sigattn.ops.gluon_backward import MAX_GRID_Y, gluon_bwd_supports

    q = torch.empty(8192, 1, 8, 64)
    k = v = torch.empty(8192, 1, 8, 64)
    assert "grid" in gluon_bwd_supports(q, q, k, v)
    assert MAX_GRID_Y == 65535


def test_launch_fitting_retries_fewer_stages_and_launches_any_given_count():
    from triton.runtime.errors import OutOfResources

    calls = []

    class Kernel:
        def __init__(self, fits_at):
            self.fits_at = fits_at

        def __getitem__(self, grid):
            def launch(*args, num_stages, **kwargs):
                calls.append(num_stages)
                if num_stages > self.fits_at:
                    raise OutOfResources(300000, 232448, "shared memory")

            return launch

    configs.launch_fitting(Kernel(2), (1,), num_stages=4)
    assert calls == [4, 3, 2]
    calls.clear()
    configs.launch_fitting(Kernel(2), (1,), num_stages=0)  # a config's 0: launched as given, not skipped
    assert calls == [0]
    calls.clear()
    with pytest.raises(OutOfResources):
        configs.launch_fitting(Kernel(0), (1,), num_stages=2)
    assert calls == [2, 1]


@pytest.fixture
def varlen_routes(monkeypatch):
    """Pretend to be an sm_90 GPU the Gluon kernels support; record which launcher each varlen call reaches."""
    from sigattn.ops import forward, gluon_forward

    seen: list[str] = []

    def gluon_fwd(q, k, v, cu_q, cu_k, max_q, max_k, bias, scale, causal, impl):
        seen.append("gluon-fwd")
        assert (max_q, max_k) == (5, 7) and bias.shape == (2, 2)
        return torch.zeros_like(q)

    def gluon_bwd(do, q, k, v, cu_q, cu_k, max_q, max_k, bias, scale, causal, impl, need_dbias=True):
        seen.append("gluon-bwd")
        assert do.is_contiguous()
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                torch.zeros(bias.shape) if need_dbias else None)

    def portable_fwd(q, *args):
        seen.append("portable-fwd")
        return torch.zeros_like(q)

    def portable_bwd(do, q, k, v, bias, *args):
        seen.append("portable-bwd")
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None

    monkeypatch.setattr(configs, "_gluon_varlen", True)  # the experimental opt-in (default off)
    monkeypatch.setattr(forward, "_gluon_ready", lambda q: configs.gluon_forward_enabled())
    monkeypatch.setattr(gluon_forward, "gluon_varlen_supports", lambda q, k, v: None)
    monkeypatch.setattr(gluon_forward, "gluon_varlen_fwd", gluon_fwd)
    monkeypatch.setattr(forward, "_launch_fwd", portable_fwd)
    monkeypatch.setattr(backward, "_gluon_bwd_ready", lambda q: configs.gluon_backward_enabled())
    monkeypatch.setattr(gluon_backward, "gluon_varlen_bwd_supports", lambda do, q, k, v, batch: None)
    monkeypatch.setattr(gluon_backward, "gluon_varlen_bwd", gluon_bwd)
    monkeypatch.setattr(backward, "launch_bwd", portable_bwd)
    return seen


def _varlen_call(direction: str, **kw):
    """A varlen forward or backward of 2 sequences (lengths 5 and 3 / 7 and 2), 2 query heads, 1 kv head."""
    from sigattn.ops.forward import Varlen, sigmoid_attn_varlen_fwd

    q, do = torch.randn(8, 2, 64), torch.randn(8, 2, 64)
    k, v = torch.randn(9, 1, 64), torch.randn(9, 1, 64)
    varlen = Varlen(torch.tensor([0, 5, 8], dtype=torch.int32), torch.tensor([0, 7, 9], dtype=torch.int32), 5, 7)
    args = dict(bias=kw.pop("bias", torch.zeros(2, 2)), scale=0.125, causal=True, window_left=-1, window_right=-1,
                alibi_slopes=None)
    args.update({k_: kw.pop(k_) for k_ in list(kw) if k_ in args})
    if direction == "fwd":
        return sigmoid_attn_varlen_fwd(q, k, v, varlen, sigmoid_impl="fast", **args, **kw)
    return backward.sigmoid_attn_varlen_bwd(do, q, k, v, varlen, deterministic=kw.pop("deterministic", False),
                                            sigmoid_impl="fast", **args, **kw)


def test_default_varlen_goes_to_gluon(varlen_routes):
    _varlen_call("fwd")
    dq, dk, dv, dbias = _varlen_call("bwd")
    assert varlen_routes == ["gluon-fwd", "gluon-bwd"]
    assert dbias.shape == (2, 2)  # the per-sequence bias's gradient keeps its shape
    _, _, _, dbias = _varlen_call("bwd", need_dbias=False, bias=torch.zeros(2))
    assert dbias.shape == (2,)  # zeros of bias's shape (the eager autograd path discards it)
    assert varlen_routes == ["gluon-fwd", "gluon-bwd", "gluon-bwd"]


@pytest.mark.parametrize("kw", [
    {"alibi_slopes": torch.ones(2, 2)},
    {"window_left": 3},
    {"causal": False, "window_right": 2},
    {"use_tma": True},
], ids=["alibi", "window-left", "window-right", "use-tma"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_what_keeps_the_portable_varlen_kernels(varlen_routes, direction, kw):
    _varlen_call(direction, **kw)
    assert varlen_routes == [f"portable-{direction}"]


@pytest.mark.parametrize("kw", [{"deterministic": True}, {"fused_dq": True}, {"fused_dq": False}],
                         ids=["deterministic", "fused-dq", "two-kernel"])
def test_what_keeps_the_portable_varlen_backward(varlen_routes, kw):
    _varlen_call("bwd", **kw)
    assert varlen_routes == ["portable-bwd"]


def test_switches_off_keep_the_portable_varlen_kernels(varlen_routes):
    configs.set_gluon_forward(False), configs.set_gluon_backward(False)
    try:
        _varlen_call("fwd"), _varlen_call("bwd")
    finally:
        configs.set_gluon_forward(True), configs.set_gluon_backward(True)
    assert varlen_routes == ["portable-fwd", "portable-bwd"]


@pytest.mark.parametrize("through_op", [False, True])
def test_varlen_autograd_paths_reach_the_dispatch(varlen_routes, through_op):
    """Eager autograd (_VarlenFn) and the custom op's registered backward both reach the varlen dispatch (eager
    called the portable launcher directly, so eager varlen training never reached the Gluon VARLEN backward)."""
    from sigattn.ops import custom_ops

    q = torch.randn(8, 2, 64, requires_grad=True)
    k, v = (torch.randn(9, 1, 64, requires_grad=True) for _ in range(2))
    cu_q, cu_k = torch.tensor([0, 5, 8], dtype=torch.int32), torch.tensor([0, 7, 9], dtype=torch.int32)
    bias = torch.zeros(2, 2)
    args = (q, k, v, cu_q, cu_k, 5, 7, bias, 0.125, True, -1, 0, None, False, "fast")
    out = torch.ops.sigattn.varlen_fwd(*args) if through_op else custom_ops.sigmoid_attn_varlen(*args)
    out.sum().backward()
    assert varlen_routes == ["gluon-fwd", "gluon-bwd"]
    assert q.grad is not None and k.grad is not None


def test_gluon_varlen_backward_refuses_grids_past_cuda_limit():
    """batch * kv heads is the varlen grid's y dimension too (CPU tensors: checked before any device facts)."""
    q = torch.empty(64, 8, 64)
    k = torch.empty(64, 8, 64)
    assert "grid" in gluon_backward.gluon_varlen_bwd_supports(q, q, k, k, 8192)
    assert "grid" not in str(gluon_backward.gluon_varlen_bwd_supports(q, q, k, k, 8))


def test_gluon_forward_default_schedule():
    """Rows of up to STATIC_SCHEDULE_MAX_KEYS keys take the persistent static schedule, longer ones one program per
    item (the measured rule in gluon_forward.py)."""
    from sigattn.ops import gluon_forward

    limit = gluon_forward.STATIC_SCHEDULE_MAX_KEYS
    assert gluon_forward.default_schedule(1) == "static"
    assert gluon_forward.default_schedule(limit) == "static"
    assert gluon_forward.default_schedule(limit + 1) == "grid"
    assert gluon_forward.default_schedule(16384) == "grid"


def test_varlen_gluon_is_opt_in(varlen_routes, monkeypatch):
    """The Gluon VARLEN form is experimental (an illegal memory access on its first H100 run): without the opt-in,
    varlen calls keep the portable kernels even where the Gluon kernels would serve."""
    monkeypatch.setattr(configs, "_gluon_varlen", False)
    _varlen_call("fwd"), _varlen_call("bwd")
    assert varlen_routes == ["portable-fwd", "portable-bwd"]
    with pytest.raises(TypeError, match="enabled must be a bool"):
        configs.set_gluon_varlen(1)

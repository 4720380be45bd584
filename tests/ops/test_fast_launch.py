"""Fast launches (sigattn/ops/fast_launch.py): the key never stands for two specializations, and every way out
(miss, hooks, interpreter, switch) takes Triton's normal launch. CPU tests drive Triton's real JITFunction.run with a
faked driver and compile; GPU tests compare fast and normal launches bit for bit."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from sigattn.ops import fast_launch  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_switch():
    """Tests flip the process-wide switch; each leaves it as it found it (the default is off)."""
    before = fast_launch._enabled
    yield
    fast_launch.set_enabled(before)


def _probe(X, Y, n, m, f, flag, BLOCK: tl.constexpr, MODE: tl.constexpr = 0):
    pass


class _Driver:
    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


class _Compiled:
    """A CompiledKernel as launch() sees one: loaded handles, a launcher that records its arguments."""

    function = 1
    packed_metadata = ()
    _run = True

    def __init__(self, key: str) -> None:
        self.key = key
        self.calls: list[tuple] = []

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args) -> None:
        self.calls.append(args)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch):
    """A JITFunction (not the interpreter's) with Triton's real run path; compiles are fakes, one per Triton key.
    kernel.normal counts launches through JITFunction.run."""
    monkeypatch.setattr(driver, "_active", _Driver())

    def compile_(self, key, signature, device, constexprs, options, attrs, warmup):
        compiled = _Compiled(key)
        self.device_caches[device][0][key] = compiled
        return compiled

    monkeypatch.setattr(triton_jit.JITFunction, "_do_compile", compile_)
    monkeypatch.setattr(fast_launch, "interpreting", lambda: False)
    monkeypatch.setattr(fast_launch, "_enabled", True)
    monkeypatch.setattr(fast_launch, "_states", {})
    k = triton_jit.JITFunction(_probe, do_not_specialize=["m"])
    k.normal = 0
    real_run = k.run

    def counted(*args, **kwargs):
        k.normal += 1
        return real_run(*args, **kwargs)

    k.run = counted
    return k


def _args(dtype=torch.float16, offset=0, n=64, m=100, f=0.5, flag=True, block=16, **kw):
    x = torch.zeros(64, dtype=dtype)[offset:]
    y = torch.zeros(64, dtype=torch.float32)
    return (x, y, n, m, f, flag), {"BLOCK": block, "num_warps": 4, **kw}


def _triton_kernel(kernel, args, kwargs):
    """The CompiledKernel Triton's own lookup returns for these arguments (a warmup: no launch)."""
    return triton_jit.JITFunction.run(kernel, *args, grid=(1,), warmup=True, **kwargs)


def _launched(kernel, args, kwargs) -> _Compiled:
    """Launch once through fast_launch; the compiled kernel that ran (exactly one must have)."""
    before = {c: len(c.calls) for c in kernel.device_caches[0][0].values()} if kernel.device_caches else {}
    fast_launch.launch(kernel, (3, 1, 1), *args, **kwargs)
    ran = [c for c in kernel.device_caches[0][0].values() if len(c.calls) != before.get(c, 0)]
    assert len(ran) == 1
    return ran[0]


def test_same_args_hit(kernel):
    args, kwargs = _args()
    first = _launched(kernel, args, kwargs)
    assert kernel.normal == 1
    for _ in range(3):
        assert _launched(kernel, *_args()) is first
    assert kernel.normal == 1 and len(first.calls) == 4
    assert fast_launch.cached_specializations(kernel) == 1
    # The fast launch hands the launcher what JITFunction.run does: grid, stream, function, metadata, no hooks, then
    # every argument in signature order (constexprs and defaults included).
    assert first.calls[-1][:9] == (3, 1, 1, 0, 1, (), None, None, None)
    assert first.calls[0][:6] == first.calls[-1][:6]  # the normal launch passed Triton's (empty) hook chains
    assert first.calls[0][11:] == first.calls[-1][11:] == (*args[2:], 16, 0)
    assert first.calls[-1][9].dtype == torch.float16 and first.calls[-1][10].dtype == torch.float32


@pytest.mark.parametrize("change", [
    dict(dtype=torch.bfloat16),  # pointer dtype
    dict(offset=1),  # data_ptr no longer 16-byte aligned
    dict(n=1),  # a specialized int == 1 (a constexpr to Triton)
    dict(n=63),  # a specialized int no longer divisible by 16
    dict(m=2**40),  # do_not_specialize int past int32: i64
    dict(block=32),  # constexpr value
    dict(block=16.0),  # constexpr of another type
    dict(MODE=1),  # a defaulted constexpr given
    dict(num_warps=8),  # launch option
])
def test_specialization_change_misses(kernel, change):
    base = _launched(kernel, *_args())
    args, kwargs = _args(**change)
    other = _launched(kernel, args, kwargs)
    assert kernel.normal == 2  # the miss went through Triton
    assert other is _triton_kernel(kernel, args, kwargs)
    if "block" not in change or type(change["block"]) is int:  # Triton keys a constexpr 16.0 as 16 (its choice)
        assert other is not base


@pytest.mark.parametrize("change", [dict(m=7), dict(m=2**31 - 1), dict(f=-3.0), dict(flag=False), dict(n=80)])
def test_values_triton_does_not_specialize_on_hit_or_agree(kernel, change):
    """do_not_specialize ints within int32, floats, bools: the same specialization for Triton; they may hit (ints
    that Triton specializes are keyed by value: a miss then, but the same kernel)."""
    base = _launched(kernel, *_args())
    other = _launched(kernel, *_args(**change))
    assert other is base


def test_every_fast_launch_runs_tritons_kernel(kernel):
    """Over a grid of argument variants, launched in two orders: whatever fast_launch runs is the CompiledKernel
    that Triton's own cache lookup returns for those arguments."""
    variants = [dict(zip(("dtype", "offset", "n", "m", "block"), combo)) for combo in itertools.product(
        (torch.float16, torch.float32), (0, 8), (1, 16, 17), (5, 2**33), (16, True))]
    for order in (variants, variants[::-1]):
        for change in order:
            args, kwargs = _args(**change)
            assert _launched(kernel, args, kwargs) is _triton_kernel(kernel, args, kwargs)
    assert kernel.normal < 2 * len(variants)  # the second pass hit


def test_argument_of_another_type_launches_normally(kernel):
    _launched(kernel, *_args())
    args, kwargs = _args()
    odd = (args[0], args[1], torch.zeros(4), *args[3:])  # a tensor where an int was
    fast_launch.launch(kernel, (1,), *odd, **kwargs)
    none = (args[0], None, *args[2:])  # None where a tensor was: bind raises, normal launch
    fast_launch.launch(kernel, (1,), *none, **kwargs)
    assert kernel.normal == 3
    assert fast_launch.cached_specializations(kernel) == 1  # neither kept


def test_switch_hooks_interpreter_and_callable_grid_launch_normally(kernel, monkeypatch):
    args, kwargs = _args()
    _launched(kernel, args, kwargs)
    fast_launch.set_enabled(False)
    fast_launch.launch(kernel, (1,), *args, **kwargs)
    assert kernel.normal == 2
    fast_launch.set_enabled(True)
    assert fast_launch.cached_specializations(kernel) == 0  # switching dropped the tables
    _launched(kernel, args, kwargs)
    _launched(kernel, args, kwargs)
    assert kernel.normal == 3

    seen = []
    hook = lambda metadata: seen.append(metadata)
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        fast_launch.launch(kernel, (1,), *args, **kwargs)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert kernel.normal == 4

    kernel.add_pre_run_hook(lambda *a, **kw: seen.append("pre"))
    fast_launch.launch(kernel, (1,), *args, **kwargs)
    assert kernel.normal == 5 and "pre" in seen
    kernel.pre_run_hooks.clear()

    fast_launch.launch(kernel, lambda meta: (1,), *args, **kwargs)
    assert kernel.normal == 6

    monkeypatch.setattr(fast_launch, "interpreting", lambda: True)
    fast_launch.launch(kernel, (1,), *args, **kwargs)
    assert kernel.normal == 7


def test_debug_knob_is_part_of_the_key(kernel, monkeypatch):
    base = _launched(kernel, *_args())
    monkeypatch.setattr(knobs.runtime, "debug", True)
    assert _launched(kernel, *_args()) is not base
    assert kernel.normal == 2


def test_table_is_bounded(kernel, monkeypatch):
    monkeypatch.setattr(fast_launch, "MAX_ENTRIES", 4)
    for n in range(2, 12):
        _launched(kernel, *_args(n=n))
    assert fast_launch.cached_specializations(kernel) <= 4


def test_env_switch(monkeypatch):
    """Opt-in until a GPU run has checked it: off unless SIGATTN_FAST_LAUNCH=1."""
    try:
        monkeypatch.delenv("SIGATTN_FAST_LAUNCH", raising=False)
        assert not importlib.reload(fast_launch)._enabled
        monkeypatch.setenv("SIGATTN_FAST_LAUNCH", "0")
        assert not importlib.reload(fast_launch)._enabled
        monkeypatch.setenv("SIGATTN_FAST_LAUNCH", "1")
        assert importlib.reload(fast_launch)._enabled
    finally:
        monkeypatch.delenv("SIGATTN_FAST_LAUNCH", raising=False)
        importlib.reload(fast_launch)


def test_interpreter_runs_kernels_normally(device):
    """The CPU suite's interpreter: never fast (no CompiledKernel to keep)."""
    if device != "cpu":
        pytest.skip("CPU interpreter only")
    assert not fast_launch.enabled()


@pytest.mark.parametrize("dtype,rows,cols", [(torch.bfloat16, 128, None), (torch.float16, 64, None),
                                             (torch.float32, 64, 32)])
def test_lean_gluon_descriptors_equal_validated_ones(dtype, rows, cols):
    """gluon_forward builds its descriptors without TensorDescriptor.__post_init__ and with a cached layout: the
    fields, and so Triton's specialization of them, must be those of a validated descriptor."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from sigattn.ops import gluon_forward

    t = torch.zeros(2, 48, 4, 64, dtype=dtype)[:, :40]  # a strided (B, N, H, D) view
    lean = gluon_forward._rank3_desc(t, rows, cols)
    gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[dtype]
    block = [1, rows, cols or 64]
    ref = TensorDescriptor(t, [2, 40, 256], [t.stride(0), t.stride(1), 1], block,
                           gl.NVMMASharedLayout.get_default_for(block, gdt))
    for field in ("shape", "strides", "block_shape", "layout", "padding"):
        assert getattr(lean, field) == getattr(ref, field), field
    assert lean.base is ref.base
    assert triton_jit.mangle_type(lean) == triton_jit.mangle_type(ref)
    packed = torch.zeros(137, 4, 64, dtype=dtype)[37:]  # 37 rows of headroom (gluon_forward._seq_desc)
    seq = gluon_forward._seq_desc(packed, rows, cols or 64, 37)
    assert seq.shape == [101, 37, 256] and seq.strides == [256, 256, 1] and seq.block_shape == block
    assert seq.layout == ref.layout and seq.padding == "zero"
    assert seq.base.data_ptr() == packed.data_ptr() - 37 * 256 * packed.element_size()
    assert triton_jit.mangle_type(seq) == triton_jit.mangle_type(ref)


# GPU: fast and normal launches give bitwise the same outputs (portable forward/backward kernels, both dQ forms, and
# the Gluon forward/backward on sm_90).

def _run(fn, fast: bool):
    fast_launch.set_enabled(fast)
    return [fn() for _ in range(3)]  # the first call compiles or launches normally; later ones may go fast


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("gluon", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_fast_launch_bitwise(head_dim, gluon, deterministic, device):
    from sigattn.ops import backward, configs, forward

    if gluon and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("Gluon kernels need sm_90")
    q, k, v, do = (torch.randn(2, 200, 4, head_dim, device=device, dtype=torch.bfloat16) for _ in range(4))
    bias = torch.full((4,), -5.0, device=device)
    old = configs.gluon_forward_enabled(), configs.gluon_backward_enabled()
    configs.set_gluon_forward(gluon)
    configs.set_gluon_backward(gluon)
    try:
        def step():
            out = forward.sigmoid_attn_fwd(q, k, v, bias, head_dim**-0.5, True, -1, -1, None, "fast")
            grads = backward.sigmoid_attn_bwd(do, q, k, v, bias, head_dim**-0.5, True, -1, -1, None, deterministic,
                                              "fast", need_dbias=True)
            return (out, *grads)

        normal, fast = _run(step, False), _run(step, True)
    finally:
        configs.set_gluon_forward(old[0])
        configs.set_gluon_backward(old[1])
    out, dq, dk, dv, dbias = normal[-1]
    f_out, f_dq, f_dk, f_dv, f_dbias = fast[-1]
    assert torch.equal(out, f_out) and torch.equal(dk, f_dk) and torch.equal(dv, f_dv) and torch.equal(dbias, f_dbias)
    if gluon and not deterministic:  # dQ by TMA reduce-adds: fp32 adds in any order, not bitwise run to run
        torch.testing.assert_close(dq, f_dq)
    else:
        assert torch.equal(dq, f_dq)
    from sigattn.ops import gluon_backward, gluon_forward

    kernels = [forward._sigmoid_attn_fwd_kernel, backward._sigmoid_attn_bwd_dkdv_kernel,
               backward._sigmoid_attn_bwd_dq_kernel, gluon_forward._sigmoid_attn_fwd_gluon_kernel,
               gluon_backward._sigmoid_attn_bwd_gluon_kernel]
    assert sum(fast_launch.cached_specializations(kern) for kern in kernels) >= 2  # forward and backward went fast


@pytest.mark.gpu
def test_gpu_fast_launch_under_cuda_graph_capture(device):
    """Fast launches go to the current stream, so a captured graph replays them (side stream, as torch requires)."""
    from sigattn.ops import backward, forward

    q, k, v, do = (torch.randn(2, 200, 4, 64, device=device, dtype=torch.bfloat16) for _ in range(4))
    bias = torch.full((4,), -5.0, device=device)

    def step():
        out = forward.sigmoid_attn_fwd(q, k, v, bias, 0.125, True, -1, -1, None, "fast")
        return (out, *backward.sigmoid_attn_bwd(do, q, k, v, bias, 0.125, True, -1, -1, None, True, "fast"))

    eager = [step() for _ in range(3)][-1]  # warm: compiled, and the fast tables hold every launch
    assert fast_launch.cached_specializations(forward._sigmoid_attn_fwd_kernel) >= 1
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)


def test_replay_launches_as_a_fast_launch_with_the_new_tensors(kernel, monkeypatch):
    """A Replay (the launchers' plans) hands the launcher exactly what a fast launch with the new tensors does, and
    refuses (False, nothing launched) where the recorded launch's conditions no longer hold."""
    args, kwargs = _args()
    compiled = fast_launch.launch(kernel, (3,), *args, **kwargs)
    assert compiled is not None
    replay = fast_launch.Replay.record(kernel, compiled, (3,), args, kwargs, (args[0], args[1]))
    assert replay is not None and replay.template[0] is None and replay.template[1] is None  # tensors not kept
    new_args, _ = _args()
    assert replay(new_args[0], new_args[1])
    expected = _launched(kernel, new_args, kwargs)
    assert expected is compiled and len(compiled.calls) == 3
    replayed, fast = compiled.calls[1], compiled.calls[2]
    assert replayed[:9] == fast[:9] and replayed[9] is fast[9] and replayed[10] is fast[10]
    assert replayed[11:] == fast[11:]
    unaligned, _ = _args(offset=1)
    assert not replay(unaligned[0], new_args[1])  # alignment is part of Triton's specialization
    monkeypatch.setattr(knobs.runtime, "debug", True)
    assert not replay(*new_args[:2])
    monkeypatch.setattr(knobs.runtime, "debug", False)
    assert replay(*new_args[:2])
    fast_launch.set_enabled(False)
    fast_launch.set_enabled(True)
    assert not replay(*new_args[:2])  # tables dropped since the recording
    assert len(compiled.calls) == 4
    x = args[1]
    same = (x, x, *args[2:])
    compiled2 = fast_launch.launch(kernel, (3,), *same, **kwargs)
    assert fast_launch.Replay.record(kernel, compiled2, (3,), same, kwargs, (x, x)) is None  # one object, two roles

"""Triton forward/backward kernels against the float64 reference (interpreter on CPU, real kernels on GPU)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from sigattn.ops.backward import sigmoid_attn_bwd
from sigattn.ops.configs import forward_config, interpreting
from sigattn.ops.forward import sigmoid_attn_fwd
from sigattn.ops.reference import alibi_bias, sigmoid_attn, visible_mask

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


def make_inputs(b, sq, sk, hq, hkv, d, dtype, device, alibi=False, bias_mean=None):
    q = torch.randn(b, sq, hq, d, dtype=dtype, device=device)
    k = torch.randn(b, sk, hkv, d, dtype=dtype, device=device)
    v = torch.randn(b, sk, hkv, d, dtype=dtype, device=device)
    # The paper's b = -log n plus per-head spread, so weights span ~1e-3..0.5 as in training.
    mean = -math.log(max(sk, 2)) if bias_mean is None else bias_mean
    bias = mean + torch.randn(hq, dtype=torch.float32, device=device)
    slopes = torch.rand(b, hq, dtype=torch.float32, device=device) * 0.5 if alibi else None
    do = torch.randn(b, sq, hq, d, dtype=dtype, device=device)
    return q, k, v, bias, slopes, do


def torch_lowp(q, k, v, bias, scale, causal, window, slopes):
    """The same math as the kernels, done by PyTorch in the inputs' dtype: the error budget's yardstick."""
    dt = q.dtype
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale + bias.to(dt)[None, :, None, None]
    if slopes is not None:
        s = s + alibi_bias(slopes, q.shape[1], k.shape[1]).to(dt)
    p = torch.sigmoid(s)
    vis = visible_mask(q.shape[1], k.shape[1], causal, window, device=q.device)
    p = torch.where(vis, p, torch.zeros((), dtype=dt, device=q.device))
    return torch.einsum("bhij,bjhd->bihd", p, vv)


def grads(fn, tensors, do):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def check_against_reference(b, sq, sk, hq, hkv, d, dtype, device, causal=False, window=(-1, -1),
                            alibi=False, impl="accurate", factor=3.0, bias_mean=None, deterministic=False,
                            fused_dq=None):
    q, k, v, bias, slopes, do = make_inputs(b, sq, sk, hq, hkv, d, dtype, device, alibi, bias_mean)
    scale = d**-0.5
    left, right = window

    out = sigmoid_attn_fwd(q, k, v, bias, scale, causal, left, right, slopes, impl)
    dq, dk, dv, dbias = sigmoid_attn_bwd(do, q, k, v, bias, scale, causal, left, right, slopes, deterministic, impl,
                                         fused_dq=fused_dq)
    ours = [out, dq, dk, dv, dbias]

    win = (left, 0 if causal else right)
    ref = grads(
        lambda q_, k_, v_, b_: sigmoid_attn(
            q_, k_, v_, scale=scale, bias=b_, causal=causal, window_size=win,
            alibi_slopes=None if slopes is None else slopes.double(),
        ),
        [t.double() for t in (q, k, v, bias)],
        do.double(),
    )
    lowp = grads(
        lambda q_, k_, v_, b_: torch_lowp(q_, k_, v_, b_, scale, causal, win, slopes),
        [q, k, v, bias.to(dtype)],
        do,
    )
    names = ["out", "dq", "dk", "dv", "dbias"]
    # Terms each entry sums: the floor of rounding error grows like sqrt(terms) ulps.
    terms = [sk, sk, sq * hq // hkv, sq * hq // hkv, b * sq * sk]
    for name, x, r, lp, n in zip(names, ours, ref, lowp, terms):
        assert x.shape == r.shape, name
        assert torch.isfinite(x).all(), f"{name}: non-finite (unwritten) entries"
        # 2 + sqrt(terms) ulps of the largest reference value: the floor when PyTorch's own error is ~0
        # (fp32 on GPU runs 3xTF32 products, a few ulps off fp32).
        atol = torch.finfo(dtype).eps * r.abs().max().item() * (2 + math.sqrt(n))
        err, budget = max_err(x, r), factor * max_err(lp, r) + atol
        assert err <= budget, f"{name}: max err {err:.3e} > {budget:.3e} (torch {dtype} err {max_err(lp, r):.3e})"


CASES = [
    # b, sq, sk, hq, hkv, d, causal, window, alibi
    (1, 17, 17, 2, 1, 32, False, (-1, -1), False),
    (2, 63, 63, 2, 2, 32, True, (-1, -1), False),
    (1, 17, 63, 4, 1, 32, True, (-1, -1), False),
    (1, 63, 17, 2, 1, 32, True, (-1, -1), False),
    (1, 1, 129, 2, 2, 16, True, (-1, -1), False),
    (1, 129, 1, 2, 1, 16, False, (-1, -1), False),
    (1, 63, 63, 4, 2, 32, False, (8, 5), False),
    (1, 40, 63, 2, 1, 32, True, (16, -1), True),
    (2, 33, 47, 4, 4, 32, False, (-1, -1), True),
    (1, 33, 33, 2, 1, 48, True, (-1, -1), False),
]


@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,causal,window,alibi", CASES)
@pytest.mark.parametrize("dtype,deterministic", [(torch.float16, False), (torch.float32, True)])
def test_dense_matches_reference(b, sq, sk, hq, hkv, d, causal, window, alibi, dtype, deterministic, device):
    """deterministic=False: fused dK/dV/dQ kernel with dQ atomics; True: the two atomic-free kernels."""
    check_against_reference(b, sq, sk, hq, hkv, d, dtype, device, causal, window, alibi, deterministic=deterministic)


@pytest.mark.parametrize("causal", [False, True])
def test_fast_sigmoid_matches_reference(causal, device):
    check_against_reference(1, 47, 47, 2, 1, 32, torch.float16, device, causal=causal, impl="fast")


def test_dbias_skipped_when_not_needed(device):
    """need_dbias=False skips the reduction: dbias is zeros and dq/dk/dv are unchanged."""
    q, k, v, bias, _, do = make_inputs(1, 33, 33, 2, 1, 16, torch.float32, device)
    full = sigmoid_attn_bwd(do, q, k, v, bias, 0.25, True, -1, 0, None, True, "accurate")
    lean = sigmoid_attn_bwd(do, q, k, v, bias, 0.25, True, -1, 0, None, True, "accurate", need_dbias=False)
    for x, y in zip(full[:3], lean[:3]):
        assert torch.equal(x, y)
    assert (lean[3] == 0).all() and (full[3] != 0).all()


def test_rows_without_keys_are_zero(device):
    """Causal with seqlen_q > seqlen_k: the first sq - sk queries see no key and output exactly 0."""
    q, k, v, bias, _, do = make_inputs(1, 40, 9, 2, 1, 16, torch.float32, device)
    out = sigmoid_attn_fwd(q, k, v, bias, 0.25, True, -1, 0, None, "accurate")
    assert (out[:, :31] == 0).all()
    dq, *_ = sigmoid_attn_bwd(do, q, k, v, bias, 0.25, True, -1, 0, None, False, "accurate")
    assert (dq[:, :31] == 0).all()


def test_strided_inputs(device):
    """q, k, v as views into one packed (b, n, 3, h, d) tensor, and a transposed dO."""
    qkv = torch.randn(1, 33, 3, 2, 32, dtype=torch.float32, device=device)
    q, k, v = qkv.unbind(2)
    do = torch.randn(1, 2, 33, 32, dtype=torch.float32, device=device).transpose(1, 2)
    bias = torch.randn(2, device=device) - 3
    out = sigmoid_attn_fwd(q, k, v, bias, 0.2, True, -1, 0, None, "accurate")
    got = sigmoid_attn_bwd(do, q, k, v, bias, 0.2, True, -1, 0, None, True, "accurate")
    qc, kc, vc, doc = (t.contiguous() for t in (q, k, v, do))
    want = sigmoid_attn_bwd(doc, qc, kc, vc, bias, 0.2, True, -1, 0, None, True, "accurate")
    assert torch.equal(out, sigmoid_attn_fwd(qc, kc, vc, bias, 0.2, True, -1, 0, None, "accurate"))
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def test_deterministic_backward_is_bitwise_reproducible(device):
    q, k, v, bias, slopes, do = make_inputs(1, 45, 45, 4, 2, 32, torch.float16, device, alibi=True)
    runs = [sigmoid_attn_bwd(do, q, k, v, bias, 0.17, True, -1, 0, slopes, True, "accurate") for _ in range(2)]
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("d", [32, 48])
@pytest.mark.parametrize("causal", [False, True])
def test_tma_path_matches_pointer_path(causal, d, device):
    """The TMA-descriptor kernels (Hopper default; rank-3 view for padded head dims) compute what the pointer
    kernels do, batch edges included, forward and both backward forms."""
    q, k, v, bias, slopes, do = make_inputs(2, 37, 45, 4, 2, d, torch.float16, device, alibi=True)
    args = (q, k, v, bias, 0.2, causal, -1, 0 if causal else -1, slopes)
    tma = sigmoid_attn_fwd(*args, "accurate", use_tma=True)
    ptr = sigmoid_attn_fwd(*args, "accurate", use_tma=False)
    torch.testing.assert_close(tma, ptr, rtol=0, atol=2e-3)
    # The interpreter has no TMA reduce-add, so the atomic-dQ form with descriptors is checked on GPUs only.
    for fused in (False,) if interpreting() else (False, True):
        got = sigmoid_attn_bwd(do, *args, False, "accurate", use_tma=True, fused_dq=fused)
        want = sigmoid_attn_bwd(do, *args, False, "accurate", use_tma=False, fused_dq=fused)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("sq,sk", [(40, 40), (16, 50), (33, 16)])
def test_pipelined_forward_matches_plain(sq, sk, device):
    """pipeline_qk=True (next tile's q k^T issued before this tile's sigmoid) computes the same forward."""
    q, k, v, bias, slopes, _ = make_inputs(1, sq, sk, 2, 1, 32, torch.float16, device, alibi=True)
    base = forward_config(32, q.dtype, q.device, False)
    args = (q, k, v, bias, 0.2, False, 20, -1, slopes, "accurate")
    plain = sigmoid_attn_fwd(*args, config=replace(base, pipeline_qk=False))
    piped = sigmoid_attn_fwd(*args, config=replace(base, pipeline_qk=True))
    torch.testing.assert_close(piped, plain, rtol=0, atol=1e-3)


@pytest.mark.parametrize("deterministic", [False, True])
def test_block_major_grid_order_same_result(deterministic, device):
    """block_major=True only reorders programs: forward and deterministic backward are bitwise unchanged."""
    q, k, v, bias, _, do = make_inputs(2, 40, 40, 2, 1, 16, torch.float32, device)
    base = forward_config(16, q.dtype, q.device, True)
    major = replace(base, block_major=True)
    fwd = [sigmoid_attn_fwd(q, k, v, bias, 0.2, True, -1, 0, None, "accurate", config=c) for c in (base, major)]
    assert torch.equal(*fwd)
    bwd = [sigmoid_attn_bwd(do, q, k, v, bias, 0.2, True, -1, 0, None, deterministic, "accurate", configs=(c, c))
           for c in (base, major)]
    for x, y in zip(*bwd):
        torch.testing.assert_close(x, y, rtol=0, atol=0 if deterministic else 1e-5)


def poisoned_neighbour_check(q, k, v, do, poison_rows, clean_rows, fwd, bwd, exact_dq=True):
    """Plant +inf/NaN in poison_rows = (q-side index, k-side index), one tensor of q, k, v, dO at a time: outputs
    and gradients at clean_rows = (q-side, k-side) must be unchanged (bitwise), so no 0 * inf from a boundary
    tile reaches another sequence. exact_dq=False (the atomic dQ form, whose float adds land in any order): dQ
    must stay finite and within rounding instead of bitwise."""
    clean = [fwd(q, k, v)] + list(bwd(do, q, k, v)[:3])
    for i in range(4):
        args = [t.clone() for t in (q, k, v, do)]
        rows = poison_rows[1] if i in (1, 2) else poison_rows[0]
        bad = args[i][rows]
        bad[..., ::2] = float("inf")
        bad[..., 1::2] = float("nan")
        args[i][rows] = bad
        got = [fwd(*args[:3])] + list(bwd(args[3], *args[:3])[:3])
        for name, x, y in zip(("out", "dq", "dk", "dv"), got, clean):
            rows = clean_rows[0] if name in ("out", "dq") else clean_rows[1]
            if name == "dq" and not exact_dq:
                assert torch.isfinite(x[rows]).all(), f"{'qkvd'[i]} poisoned -> {name} not finite"
                torch.testing.assert_close(x[rows], y[rows], rtol=2e-2, atol=2e-2 * y[rows].abs().max().item())
                continue
            assert torch.equal(x[rows], y[rows]), f"{'qkvd'[i]} poisoned -> {name} changed"


@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_nonfinite_next_batch_does_not_leak(use_tma, deterministic, device):
    """inf/NaN in batch 1's first rows leaves batch 0 exact: TMA tiles of batch 0's boundary block must read zeros
    there (a (B, N, ...) descriptor), not batch 1's rows (0 * inf = NaN). The interpreter runs descriptors too."""
    if use_tma and not deterministic and interpreting():
        pytest.skip("the interpreter has no TMA reduce-add (atomic dQ with descriptors)")
    q, k, v, bias, slopes, do = make_inputs(2, 21, 19, 2, 1, 16, torch.float32, device, alibi=True)
    args = (bias, 0.25, False, -1, -1, slopes, "accurate")

    def fwd(q_, k_, v_):
        return sigmoid_attn_fwd(q_, k_, v_, *args, use_tma=use_tma)

    def bwd(do_, q_, k_, v_):
        return sigmoid_attn_bwd(do_, q_, k_, v_, *args[:-1], deterministic, "accurate", use_tma=use_tma)

    poisoned_neighbour_check(q, k, v, do, ((1, slice(0, 8)),) * 2, ((0,), (0,)), fwd, bwd)


# GPU only (marked gpu, skipped on CPU): bf16, real tile sizes, long sequences, 64-bit addressing.


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_nonfinite_next_batch_does_not_leak(d, deterministic, device):
    """As above with the real TMA tiles (Hopper), both backward forms, bf16 at real tile sizes."""
    q, k, v, bias, _, do = make_inputs(2, 300, 260, 4, 2, d, torch.bfloat16, device)
    args = (bias, d**-0.5, False, -1, -1, None, "fast")

    def fwd(q_, k_, v_):
        return sigmoid_attn_fwd(q_, k_, v_, *args)

    def bwd(do_, q_, k_, v_):
        return sigmoid_attn_bwd(do_, q_, k_, v_, *args[:-1], deterministic, "fast", fused_dq=not deterministic)

    poisoned_neighbour_check(q, k, v, do, ((1, slice(0, 40)),) * 2, ((0,), (0,)), fwd, bwd, exact_dq=deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [32, 64, 96, 128, 192, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["accurate", "fast"])
def test_gpu_bf16_head_dims(d, causal, impl, device):
    # Default form: on sm_90 the Gluon backward at d 64/128, the portable fused-dQ kernels elsewhere.
    check_against_reference(2, 300, 300, 4, 2, d, torch.bfloat16, device, causal=causal, impl=impl)
    check_against_reference(2, 300, 300, 4, 2, d, torch.bfloat16, device, causal=causal, impl=impl,
                            fused_dq=True)
    check_against_reference(2, 300, 300, 4, 2, d, torch.bfloat16, device, causal=causal, impl=impl,
                            deterministic=True)


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["atomic-dq", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_gpu_features(case, dtype, form, device):
    b, sq, sk, hq, hkv, d, causal, window, alibi = case
    check_against_reference(b, sq, sk, hq, hkv, d, dtype, device, causal, window, alibi,
                            deterministic=form == "deterministic", fused_dq=form == "atomic-dq")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["accurate", "fast"])
def test_gpu_long_sequence(causal, impl, device):
    check_against_reference(1, 4100, 4099, 4, 2, 128, torch.bfloat16, device, causal=causal, impl=impl)  # default
    check_against_reference(1, 4096, 4096, 2, 1, 128, torch.bfloat16, device, causal=causal, impl=impl,
                            fused_dq=True)
    check_against_reference(1, 4100, 4099, 4, 1, 64, torch.bfloat16, device, causal=causal, impl=impl,
                            deterministic=True)


@pytest.mark.gpu
def test_gpu_deterministic_large(device):
    q, k, v, bias, slopes, do = make_inputs(2, 1000, 1000, 8, 2, 64, torch.bfloat16, device)
    runs = [sigmoid_attn_bwd(do, q, k, v, bias, 0.125, False, -1, -1, None, True, "fast") for _ in range(2)]
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@pytest.mark.bigmem
@pytest.mark.gpu
@pytest.mark.parametrize("use_tma", [False, True])
def test_gpu_huge_sequence_stride(use_tma, device):
    """Rows 21M elements apart (a sequence-first layout with a large batch * heads * d): a pointer tile's offsets
    rows * stride pass 2^31 and must be int64 (WIDE_OFFS). q, k, v share one 8 GB buffer of such rows."""
    n, h, d, stride = 200, 2, 64, 2**24 + 2**22
    assert 127 * stride >= 2**31
    buf = torch.randn(n, stride, dtype=torch.bfloat16, device=device)
    q, k, v = (buf[:, i * h * d:(i + 1) * h * d].view(n, h, d)[None] for i in range(3))
    do = torch.randn(1, n, h, d, dtype=torch.bfloat16, device=device)
    bias = torch.full((h,), -math.log(n), device=device)
    args = (bias, d**-0.5, True, -1, 0, None, "accurate")
    got = [sigmoid_attn_fwd(q, k, v, *args, use_tma=use_tma)]
    got += sigmoid_attn_bwd(do, q, k, v, *args[:-1], True, "accurate", use_tma=use_tma)[:3]
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    want = [sigmoid_attn_fwd(qc, kc, vc, *args, use_tma=use_tma)]
    want += sigmoid_attn_bwd(do, qc, kc, vc, *args[:-1], True, "accurate", use_tma=use_tma)[:3]
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def test_wide_offsets_form_matches(monkeypatch, device):
    """The int64 tile-offset form (WIDE_OFFS, forced here) computes what the int32 form does."""
    from sigattn.ops import backward, forward

    q, k, v, bias, _, do = make_inputs(1, 20, 20, 2, 1, 16, torch.float32, device)
    args = (bias, 0.25, True, -1, 0, None)
    want = [sigmoid_attn_fwd(q, k, v, *args, "accurate")] + list(sigmoid_attn_bwd(do, q, k, v, *args, True,
                                                                                   "accurate"))
    monkeypatch.setattr(forward, "wide_offsets", lambda *a: True)
    monkeypatch.setattr(backward, "wide_offsets", lambda *a: True)
    got = [sigmoid_attn_fwd(q, k, v, *args, "accurate")] + list(sigmoid_attn_bwd(do, q, k, v, *args, True,
                                                                                  "accurate"))
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.bigmem
@pytest.mark.gpu
def test_gpu_int64_addressing(device):
    """B*N*H*D > 2^31 elements: the last batch (highest addresses) matches the reference."""
    b, n, h, d = 1040, 256, 64, 128  # 2.18e9 elements per tensor
    assert b * n * h * d > 2**31
    q = torch.randn(b, n, h, d, dtype=torch.bfloat16, device=device)
    k, v = torch.randn_like(q), torch.randn_like(q)
    bias = torch.full((h,), -math.log(n), device=device)
    out = sigmoid_attn_fwd(q, k, v, bias, d**-0.5, True, -1, 0, None, "fast")
    ref = sigmoid_attn(q[-1:].double(), k[-1:].double(), v[-1:].double(), scale=d**-0.5, bias=-math.log(n),
                       causal=True)
    assert torch.isfinite(out[-1]).all()
    assert max_err(out[-1:], ref) < 0.02 * ref.abs().max().item()
    del out
    do = torch.randn_like(q)
    dq, dk, dv, _ = sigmoid_attn_bwd(do, q, k, v, bias, d**-0.5, True, -1, 0, None, True, "fast")
    for g in (dq, dk, dv):
        assert torch.isfinite(g[-1]).all()



@pytest.mark.parametrize("window", [(2**31 - 1, 0), (-1, 2**31 - 1), (2**31 - 1, 2**31 - 1)])
def test_windows_near_int32_limit_match_reference(window, device):
    """A window that fits in int32 must not wrap pos_shift ± window inside the kernels (it used to give zeros)."""
    from sigattn import sigmoid_attn_func

    q, k, v = (torch.randn(1, n, 2, 16, device=device) for n in (10, 5, 5))
    got = sigmoid_attn_func(q, k, v, window_size=window, backend="triton", sigmoid_impl="accurate")
    want = sigmoid_attn_func(q, k, v, window_size=window, backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

"""Tests for sigattn.integrations.transformers: tiny random-init HF models with attn_implementation="sigmoid"."""

import copy
import functools
import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AttentionInterface,
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    ViTConfig,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from sigattn.integrations import transformers as sighf  # noqa: E402
from sigattn.nn import SigmoidAttention  # noqa: E402

ORACLE = "sigmoid_oracle_f64"
ORACLE_LOW = "sigmoid_oracle_low"
VOCAB = 61
DECODERS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,  # q/k/v projections with bias
    "mistral": MistralConfig,  # sliding window 5 < the test lengths: the masks carry the window
}


def _oracle(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, compute=torch.float64, **kwargs):
    """The formula by hand in `compute` precision, GQA by repetition; the mask is always materialised (see
    _oracle_mask). compute=None: in the inputs' dtype, PyTorch's own low-precision error (the tolerance budget)."""
    if attention_mask is None:
        assert not getattr(module, "is_causal", False), "a causal layer must get a mask from _oracle_mask"
    cdt = query.dtype if compute is None else compute
    bias = sighf.attention_bias(module)
    if isinstance(bias, torch.Tensor):
        bias = bias.to(cdt).reshape(-1, 1, 1)
    groups = query.shape[1] // key.shape[1]
    q = query.to(cdt)
    k, v = (t.to(cdt).repeat_interleave(groups, dim=1) for t in (key, value))
    scores = scaling * q @ k.transpose(-1, -2) + bias  # [b, h, sq, sk]
    if attention_mask is None:
        weights = torch.sigmoid(scores)
    elif attention_mask.dtype == torch.bool:
        weights = torch.sigmoid(scores) * attention_mask
    else:
        weights = torch.sigmoid(scores + attention_mask.to(cdt))
    out = weights @ v
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


def _oracle_mask(**kwargs):
    """transformers' own bool masks, never skipped for a causal layer, so the oracle is told every pattern."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(**kwargs)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    sighf.register()
    AttentionInterface.register(ORACLE, _oracle)
    AttentionMaskInterface.register(ORACLE, _oracle_mask)
    AttentionInterface.register(ORACLE_LOW, functools.partial(_oracle, compute=None))
    AttentionMaskInterface.register(ORACLE_LOW, _oracle_mask)


def _decoder(family: str, dtype=torch.float64, **overrides):
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sigmoid_attn_train_seqlen=16, pad_token_id=0,
        initializer_range=0.2, tie_word_embeddings=False,
    )
    if family == "mistral":
        kwargs["sliding_window"] = 5
    kwargs.update(overrides)
    config = DECODERS[family](**kwargs)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sigmoid").to(dtype).eval()


def _oracle_copy(model, name=ORACLE):
    other = copy.deepcopy(model)
    other.set_attn_implementation(name)
    return other


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", list(DECODERS))
def test_decoder_forward_backward_match_float64_formula(family):
    model = _decoder(family)
    oracle = _oracle_copy(model)
    ids = torch.randint(1, VOCAB, (2, 11))
    out, ref = model(ids).logits, oracle(ids).logits
    assert model.config._attn_implementation == "sigmoid"
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_llama_float32_error_within_budget():
    """float32 through the registered function vs float64 truth, against the error of float32 with the oracle."""
    model = _decoder("llama", torch.float32)
    truth = _oracle_copy(model).double()
    fp32_oracle = _oracle_copy(model)
    ids = torch.randint(1, VOCAB, (2, 13))
    want = truth(ids).logits
    budget = _max_err(fp32_oracle(ids).logits.double(), want)
    assert _max_err(model(ids).logits.double(), want) <= 4 * budget + 1e-6


def test_llama_attention_layer_matches_sigattn_module():
    """One Llama attention layer (no mask: causal from module.is_causal) equals SigmoidAttention with its weights."""
    model = _decoder("llama")
    cfg = model.config
    layer = model.model.layers[0].self_attn
    rope_theta = cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta  # v5 / v4
    ours = SigmoidAttention(
        cfg.hidden_size, cfg.num_attention_heads, nheads_kv=cfg.num_key_value_heads, positional="rope",
        rope_base=rope_theta, causal=True, train_seqlen=16, backend="reference",
        dtype=torch.float64,
    )
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(ours, name).load_state_dict(getattr(layer, name).state_dict())
    x = torch.randn(2, 9, cfg.hidden_size, dtype=torch.float64)
    cos_sin = model.model.rotary_emb(x, torch.arange(9)[None].expand(2, -1))
    out, weights = layer(x, position_embeddings=cos_sin, attention_mask=None)
    assert weights is None
    # transformers builds the rotary angles in float32: ~1e-7 relative error per angle.
    torch.testing.assert_close(out, ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(DECODERS))
def test_decoder_right_padding_equals_unpadded_runs(family):
    """Masked keys contribute exactly 0 and the bias is fixed, so padding changes nothing for real tokens."""
    model = _decoder(family)
    lengths = [11, 6]
    ids = torch.randint(1, VOCAB, (2, 11))
    mask = (torch.arange(11)[None] < torch.tensor(lengths)[:, None]).long()
    logits = model(ids * mask, attention_mask=mask).logits
    for i, n in enumerate(lengths):
        alone = model(ids[i : i + 1, :n]).logits[0]
        torch.testing.assert_close(logits[i, :n], alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits, _oracle_copy(model)(ids * mask, attention_mask=mask).logits,
                               rtol=1e-10, atol=1e-10)


def _greedy(model, ids, mask, **kwargs):
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
        return_dict_in_generate=True, output_logits=True, **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)  # [b, len], [b, new, vocab]


@pytest.mark.parametrize("family", list(DECODERS))
def test_generate_with_cache_equals_without_and_unpadded(family):
    model = _decoder(family)
    lengths = [7, 4]
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = (torch.arange(7)[None] >= 7 - torch.tensor(lengths)[:, None]).long()  # left padding
    ids = ids * mask
    seq, logits = _greedy(model, ids, mask, use_cache=True)
    seq_nc, logits_nc = _greedy(model, ids, mask, use_cache=False)
    assert torch.equal(seq, seq_nc)
    torch.testing.assert_close(logits, logits_nc, rtol=1e-9, atol=1e-9)
    for i, n in enumerate(lengths):
        seq_i, logits_i = _greedy(model, ids[i : i + 1, 7 - n :], mask[i : i + 1, 7 - n :], use_cache=True)
        assert torch.equal(seq[i, 7 - n :], seq_i[0])
        torch.testing.assert_close(logits[i], logits_i[0], rtol=1e-9, atol=1e-9)


def test_generate_static_cache_equals_dynamic():
    """A static cache prefill has kv_length > q_length with no padding: the mask must still be causal."""
    model = _decoder("llama")
    ids = torch.randint(1, VOCAB, (2, 5))
    mask = torch.ones_like(ids)
    seq, logits = _greedy(model, ids, mask)
    seq_s, logits_s = _greedy(model, ids, mask, cache_implementation="static")
    assert torch.equal(seq, seq_s)
    torch.testing.assert_close(logits, logits_s, rtol=1e-9, atol=1e-9)


def test_generate_decode_steps_run_the_decode_kernel(monkeypatch):
    """Unpadded cached steps go to sigmoid_attn_with_kvcache: on backend="triton" (the interpreter here) the decode
    kernel, whose greedy generation equals the reference without a cache."""
    from sigattn.ops import decode

    calls = []
    real = decode.sigmoid_attn_kvcache
    monkeypatch.setattr(decode, "sigmoid_attn_kvcache", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    sighf.register("sigmoid_triton", backend="triton", sigmoid_impl="accurate")
    model = _decoder("llama", torch.float32, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    seq_ref, logits_ref = _greedy(model, ids, mask, use_cache=False)
    model.set_attn_implementation("sigmoid_triton")
    seq, logits = _greedy(model, ids, mask, use_cache=True)
    assert calls and all(shape[1] == 1 for shape in calls)  # 2 layers x 5 cached steps, one query each
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)


def test_dropout_training_is_causal_and_differentiable():
    model = _decoder("llama", attention_dropout=0.3).train()
    ids = torch.randint(1, VOCAB, (2, 9))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    torch.manual_seed(0)
    a = model(ids).logits
    torch.manual_seed(0)
    b = model(changed).logits
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=0)
    model.eval()
    assert not torch.allclose(a, model(ids).logits)
    a.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="BERT uses AttentionInterface from v5")
def test_bert_encoder_bidirectional_with_padding():
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = AutoModel.from_config(config, attn_implementation="sigmoid", add_pooling_layer=False).double().eval()
    oracle = _oracle_copy(model)
    assert sighf.config_bias(config) == pytest.approx(-math.log(32))
    ids = torch.randint(1, VOCAB, (2, 10))
    out = model(ids).last_hidden_state
    torch.testing.assert_close(out, oracle(ids).last_hidden_state, rtol=1e-10, atol=1e-10)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    assert not torch.allclose(out[:, 0], model(changed).last_hidden_state[:, 0])  # bidirectional
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    padded = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(padded, oracle(ids, attention_mask=mask).last_hidden_state, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(padded[1, :6], model(ids[1:, :6]).last_hidden_state[0], rtol=1e-10, atol=1e-10)
    padded.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_vit_encoder_default_bias_from_patch_grid():
    config = ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, initializer_range=0.2,
    )
    assert sighf.config_bias(config) == pytest.approx(-math.log(2 * 2 + 1))  # 4 patches + the class token
    model = AutoModel.from_config(config, attn_implementation="sigmoid", add_pooling_layer=False).double().eval()
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(out, _oracle_copy(model)(pixel_values=pixels).last_hidden_state,
                               rtol=1e-10, atol=1e-10)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_bias_resolution_order():
    config = LlamaConfig(max_position_embeddings=4096)
    assert sighf.config_bias(config) == pytest.approx(-math.log(4096))
    config.sigmoid_attn_train_seqlen = 256
    assert sighf.config_bias(config) == pytest.approx(-math.log(256))
    config.sigmoid_attn_bias = -3.0
    assert sighf.config_bias(config) == -3.0
    with pytest.raises(ValueError, match="sigmoid_attn_train_seqlen"):
        sighf.config_bias(type("Bare", (), {})())
    config.sigmoid_attn_bias = None
    config.sigmoid_attn_train_seqlen = 0
    with pytest.raises(ValueError, match="int >= 1"):
        sighf.config_bias(config)


def test_learnable_bias_on_the_module_gets_gradients():
    model = _decoder("llama")
    layer = model.model.layers[1].self_attn
    layer.sigmoid_attn_bias = torch.nn.Parameter(torch.full((4,), -2.0, dtype=torch.float64))
    ids = torch.randint(1, VOCAB, (2, 8))
    out = model(ids).logits
    torch.testing.assert_close(out, _oracle_copy(model)(ids).logits, rtol=1e-10, atol=1e-10)
    out.square().mean().backward()
    assert layer.sigmoid_attn_bias.grad is not None and layer.sigmoid_attn_bias.grad.abs().sum() > 0


def test_register_rejects_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        sighf.register("sdpa")
    with pytest.raises(ValueError, match="backend"):
        sighf.register(backend="cuda")
    assert sighf.register("sigmoid_ref", backend="reference") == "sigmoid_ref"


def test_import_sigattn_does_not_import_transformers():
    code = "import sys, sigattn, sigattn.nn, sigattn.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _within_budget(x: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(error, budget): 3x PyTorch's own error doing the same math in `dtype`, plus a floor of a few ulps of the
    largest value (fp32 kernels run 3xTF32 products, a few ulps off fp32, where PyTorch's error can be ~0)."""
    floor = torch.finfo(dtype).eps * ref.abs().max().item() * 16
    return _max_err(x.double(), ref), 3 * _max_err(low.double(), ref) + floor


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "impl"), [(torch.float32, "sigmoid_accurate"), (torch.bfloat16, "sigmoid")])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_decoder_on_gpu_uses_kernels_within_budget(family, dtype, impl, monkeypatch):
    """CUDA: logits and gradients stay within PyTorch's own error in `dtype`; Llama's no-mask calls run the Triton
    kernels (Mistral's sliding window comes as a mask, which runs the reference). float32 uses
    sigmoid_impl="accurate": "fast" (tanh.approx, ~5e-4 relative) is meant for 16-bit inputs."""
    from sigattn.ops import custom_ops

    sighf.register("sigmoid_accurate", sigmoid_impl="accurate")
    calls = []
    dense = custom_ops.sigmoid_attn_dense
    monkeypatch.setattr(custom_ops, "sigmoid_attn_dense", lambda *a: calls.append(1) or dense(*a))
    # head_dim 32: the kernels' tl.dot needs head_dim >= 16.
    truth = _oracle_copy(_decoder(family, hidden_size=64, num_attention_heads=2, num_key_value_heads=1).cuda())
    model = copy.deepcopy(truth).to(dtype)
    model.set_attn_implementation(impl)
    low = _oracle_copy(model, ORACLE_LOW)
    ids = torch.randint(1, VOCAB, (2, 40), device="cuda")
    outs = [m(ids).logits for m in (truth, model, low)]
    assert bool(calls) == (family == "llama")
    err, budget = _within_budget(outs[1], outs[0], outs[2], dtype)
    assert err <= budget, f"logits: {err:.3e} > {budget:.3e}"
    for out in outs:
        out.float().square().mean().backward()
    for (name, p), q, r in zip(truth.named_parameters(), model.parameters(), low.parameters()):
        err, budget = _within_budget(q.grad, p.grad, r.grad, dtype)
        assert err <= budget, f"{name}.grad: {err:.3e} > {budget:.3e}"


@pytest.mark.gpu
def test_generate_on_gpu_with_cache_equals_without(monkeypatch):
    """The cached steps run the decode kernel (auto on CUDA), the uncached ones the dense kernel."""
    from sigattn.ops import decode

    calls = []
    real = decode.sigmoid_attn_kvcache
    monkeypatch.setattr(decode, "sigmoid_attn_kvcache", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _decoder("llama", torch.float32, hidden_size=64, num_attention_heads=2, num_key_value_heads=1).cuda()
    ids = torch.randint(1, VOCAB, (2, 12), device="cuda")
    mask = torch.ones_like(ids)
    seq, logits = _greedy(model, ids, mask, use_cache=True)
    assert calls
    seq_nc, logits_nc = _greedy(model, ids, mask, use_cache=False)
    assert torch.equal(seq, seq_nc)
    torch.testing.assert_close(logits, logits_nc, rtol=1e-4, atol=1e-4)

"""Tests of the ASR recipe: mel filterbank, espeak-ng corpus, CTC encoder with padding, decoding, `train asr`."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from sigattn.recipes import asr_data
from sigattn.recipes import cli as recipes_cli
from sigattn.recipes.asr import CTCEncoder, ctc_loss, edit_distance, error_counts, greedy_decode, subsampled_lengths
from sigattn.recipes.models import ModelShape
from sigattn.recipes.variants import VARIANTS

ASR_VARIANTS = ("softmax", "sigmoid", "sigmoid-b0")
needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (CI: apt-get install -y espeak-ng)"
)
SMALL = asr_data.CorpusSpec("pytest", train_size=16, test_size=6, max_digits=2, n_mels=24)


def test_mel_filterbank_matches_formula() -> None:
    n_mels, n_fft, sr = 10, 64, 8000
    fb = asr_data.mel_filterbank(n_mels, n_fft, sr)
    assert fb.shape == (n_fft // 2 + 1, n_mels)

    def mel(f: float) -> float:
        return 2595 * math.log10(1 + f / 700)

    top = mel(sr / 2)
    centres = [700 * (10 ** (top * i / (n_mels + 1) / 2595) - 1) for i in range(n_mels + 2)]
    for b in range(n_fft // 2 + 1):
        f = b * sr / n_fft
        for m in range(n_mels):
            lo, c, hi = centres[m], centres[m + 1], centres[m + 2]
            expect = (f - lo) / (c - lo) if lo <= f <= c else (hi - f) / (hi - c) if c < f <= hi else 0.0
            assert fb[b, m].item() == pytest.approx(expect, abs=1e-6)
    assert (fb.max(0).values > 0).all()  # every filter covers at least one bin


def test_log_mel_is_normalised_per_utterance() -> None:
    t = torch.arange(4000) / asr_data.SAMPLE_RATE
    audio = torch.sin(2 * math.pi * 440 * t) + 0.01 * torch.randn(4000)
    feats = asr_data.log_mel(audio, asr_data.mel_filterbank(24))
    assert feats.shape == (4000 // asr_data.HOP + 1, 24)
    torch.testing.assert_close(feats.mean(0), torch.zeros(24), atol=1e-4, rtol=0)


def test_speed_and_noise() -> None:
    audio = torch.randn(1000).numpy()
    assert len(asr_data.change_speed(audio, 1.1)) == round(1000 / 1.1)
    noisy = asr_data.add_noise(audio, 20.0, __import__("numpy").random.default_rng(0))
    snr = 10 * math.log10((audio**2).mean() / ((noisy - audio) ** 2).mean())
    assert abs(snr - 20.0) < 1.0


def test_text_codec_roundtrip() -> None:
    ids = asr_data.encode_text("Three four!")
    assert ids.min() > asr_data.BLANK and ids.max() < asr_data.VOCAB_SIZE
    assert asr_data.decode_ids(ids.tolist()) == "three four"


def test_missing_espeak_names_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(asr_data.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match="apt-get install -y espeak-ng"):
        asr_data.load_speech(SMALL, tmp_path)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (CI: apt-get install -y espeak-ng)")
    root = tmp_path_factory.mktemp("asr")
    asr_data.load_speech(SMALL, root)
    return root


@needs_espeak
def test_corpus_build_and_cache(corpus_dir: Path) -> None:
    files = list(corpus_dir.glob("pytest-*.pt"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime
    c = asr_data.load_speech(SMALL, corpus_dir)  # cached: not rebuilt
    assert files[0].stat().st_mtime == mtime and c.path == str(files[0])
    assert (len(c.train), len(c.test)) == (16, 6)
    assert set(c.train.voices).isdisjoint(c.test.voices)
    for split in (c.train, c.test):
        assert split.features.shape == (int(split.offsets[-1]), SMALL.n_mels)
        assert torch.isfinite(split.features).all()
        assert (split.lengths() > 20).all()  # every utterance is at least ~0.2 s
        assert all(w in asr_data.DIGITS + asr_data.WORDS for t in split.texts for w in t.split())
    again = asr_data.load_speech(SMALL, corpus_dir)
    assert again.digest == c.digest and again.train.texts == c.train.texts


@needs_espeak
def test_cached_corpus_loads_without_espeak(corpus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A GPU machine without espeak-ng trains from a cache built elsewhere and carried there.
    built = asr_data.load_speech(SMALL, corpus_dir)
    monkeypatch.setattr(asr_data.shutil, "which", lambda _: None)
    carried = asr_data.load_speech(SMALL, corpus_dir)
    assert carried.digest == built.digest and torch.equal(carried.test.features, built.test.features)


def _model(variant: str, n_mels: int = 16) -> CTCEncoder:
    return CTCEncoder(ModelShape(32, 2, 2), VARIANTS[variant], n_mels=n_mels, train_seqlen=8)


def _padded(lengths: list[int], n_mels: int = 16) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    feats = [torch.randn(n, n_mels) for n in lengths]
    return feats, torch.nn.utils.rnn.pad_sequence(feats, batch_first=True), torch.tensor(lengths)


@pytest.mark.parametrize("variant", ASR_VARIANTS)
def test_ctc_forward_backward_with_padding(variant: str) -> None:
    model = _model(variant)
    _, x, lengths = _padded([41, 17, 30])
    log_probs, out_lengths = model(x, lengths)
    assert log_probs.shape == (3, subsampled_lengths(torch.tensor(41)).item(), asr_data.VOCAB_SIZE)
    assert out_lengths.tolist() == subsampled_lengths(lengths).tolist() == [9, 3, 6]
    labels = torch.tensor([[3, 4, 5, 1], [6, 7, 0, 0], [8, 1, 9, 0]])
    loss = ctc_loss((log_probs, out_lengths), (labels, torch.tensor([4, 2, 3])))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.blocks[0].attn.parameters())


@pytest.mark.parametrize("variant", ASR_VARIANTS)
def test_padding_invariance(variant: str) -> None:
    model = _model(variant).eval()
    feats, x, lengths = _padded([45, 19, 32, 7])
    with torch.no_grad():
        batched, out_lengths = model(x, lengths)
        for i, f in enumerate(feats):
            alone, n = model(f[None], lengths[i : i + 1])
            assert int(n) == int(out_lengths[i])
            torch.testing.assert_close(batched[i, : int(n)], alone[0], atol=2e-5, rtol=1e-5)


def test_padding_changes_nothing_only_because_of_the_mask() -> None:
    # Without the mask the padded keys would be attended: the check above is not vacuous.
    model = _model("sigmoid").eval()
    for block in model.blocks:
        block.attn.o_proj.weight.data.normal_(std=0.5)
        block.attn_scale.gamma.data.fill_(1.0)
    feats, x, lengths = _padded([45, 19])
    with torch.no_grad():
        masked = model(x, lengths)[0][1, :4]
        unmasked = model(x, torch.tensor([45, 45]))[0][1, :4]
        alone = model(feats[1][None], lengths[1:])[0][0]
    torch.testing.assert_close(masked, alone, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-3)


def test_greedy_decode_and_error_rates() -> None:
    # frames: t t <b> h h r <b> e e <b> e <b> <pad>; a = 2 (1 is the space), so t = 21
    ids = [21, 21, 0, 9, 9, 19, 0, 6, 6, 0, 6, 0, 3]
    log_probs = torch.full((1, len(ids), asr_data.VOCAB_SIZE), -10.0)
    log_probs[0, torch.arange(len(ids)), torch.tensor(ids)] = 0.0
    assert greedy_decode(log_probs, torch.tensor([len(ids) - 1])) == ["three"]
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "ab") == 2
    assert error_counts(["one two", "three"], ["one too", "three"]) == (1, 12, 1, 3)


@needs_espeak
def test_train_asr_smoke_writes_results(corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(asr_data.CORPORA, "pytest", SMALL)
    parser = argparse.ArgumentParser()
    recipes_cli.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(["asr", "--variants", "softmax", "sigmoid", "--steps", "4", "--batch-size", "4",
                              "--corpus", "pytest", "--data-dir", str(corpus_dir), "--out", str(out),
                              "--device", "cpu", "--no-progress"])
    assert recipes_cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in results] == ["softmax", "sigmoid"]
    for r in results:
        assert r["last_step"] == 4 and not r["diverged"] and 0 <= r["val_cer"] and math.isfinite(r["val_loss"])
    table = (out / "results.md").read_text()
    assert "CER %" in table and "sigmoid" in table
    assert (out / "curves.png").stat().st_size > 0
    config = json.loads((out / "sigmoid" / "log.jsonl").read_text().splitlines()[0])
    assert config["data"] == "espeak-ng-pytest" and config["test_voices"]


def test_spec_augment_masks_inside_each_utterance_only() -> None:
    from sigattn.recipes.asr import spec_augment

    x = torch.randn(3, 50, 16)
    lengths = torch.tensor([50, 30, 12])
    out = spec_augment(x, lengths, torch.Generator().manual_seed(1), freq_width=4, time_width=6)
    again = spec_augment(x, lengths, torch.Generator().manual_seed(1), freq_width=4, time_width=6)
    assert torch.equal(out, again) and not torch.equal(out, x)
    changed = out != x
    assert not changed[1, 30:].any() and not changed[2, 12:].any()
    assert torch.equal(out[changed], torch.zeros(int(changed.sum())))


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_key_padding_mask_equals_truncation(attention: str, causal: bool) -> None:
    from sigattn.nn import SigmoidAttention

    attn = SigmoidAttention(32, 4, nheads_kv=2, attention=attention, causal=causal, positional="rope",
                            qk_norm="rms", train_seqlen=16)
    x = torch.randn(2, 13, 32)
    keep = torch.arange(13) < torch.tensor([[13], [6]])  # [batch, seqlen]
    out = attn(x, attn_mask=keep[:, None, None, :])
    torch.testing.assert_close(out[1, :6], attn(x[1:, :6])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], attn(x[:1])[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_mask"):
        SigmoidAttention(32, 4, positional="alibi")(x, attn_mask=keep[:, None, None, :])
    with pytest.raises(ValueError, match="attn_mask"):
        attn(x, attn_mask=keep[:, None, None, :].float())

"""Offline speech data for the ASR recipe: spoken digits and command words synthesised with espeak-ng, as log-mels.

No speech corpus can be downloaded where the recipes run, but speech can be made: espeak-ng (Debian package
``espeak-ng``) speaks digit strings and a few command words with many accents, voice variants, rates and
pitches; numpy adds speed changes (resampling, as sox ``speed``) and white noise. The test split uses voices
(accent + variant pairs) that no training utterance uses. Features are log-mel filterbanks in plain torch
(torch.stft and a triangular HTK-mel filterbank computed here), normalised per utterance.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

INSTALL_HINT = "apt-get install -y espeak-ng"
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
# CTC vocabulary: index 0 is the blank, then space and a-z.
BLANK = 0
ALPHABET = " abcdefghijklmnopqrstuvwxyz"
VOCAB_SIZE = len(ALPHABET) + 1

# Voices are "<accent>+<variant>" (`espeak-ng --voices=en`, variants in espeak-ng-data/voices/!v). The test
# voices pair held-out accents with held-out variants: no test accent, and no test variant, occurs in training.
TRAIN_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029")
TRAIN_VARIANTS = ("m1", "m3", "m5", "f1", "f2", "f4")
TEST_ACCENTS = ("en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
TEST_VARIANTS = ("m7", "f3", "f5")

SAMPLE_RATE = 22050  # espeak-ng's output rate
N_FFT, HOP = 512, 220  # 23 ms windows every 10 ms
DEFAULT_DIR_ENV = "SIGATTN_ASR_DIR"


@dataclass(frozen=True)
class CorpusSpec:
    """What fixes a synthetic corpus (its cache key): sizes, text and voice sampling, augmentation, features.

    max_digits: digit strings have 1..max_digits digits; word_fraction: share of utterances that are one or
    two command words instead. rates (words per minute) and pitches (0-99) are sampled uniformly in their
    ranges; speeds are resampling factors; train utterances get white noise at an SNR uniform in snr_db, test
    utterances at test_snr_db.
    """

    name: str
    train_size: int
    test_size: int
    max_digits: int = 4
    word_fraction: float = 0.2
    rates: tuple[int, int] = (130, 210)
    pitches: tuple[int, int] = (25, 75)
    speeds: tuple[float, ...] = (0.9, 1.0, 1.1)
    snr_db: tuple[float, float] = (10.0, 40.0)
    test_snr_db: float = 25.0
    n_mels: int = 40
    seed: int = 0


CORPORA: dict[str, CorpusSpec] = {
    "tiny": CorpusSpec("tiny", train_size=1200, test_size=150),
    # ~48 MB of float16 features: small enough to build here and carry to a GPU machine without espeak-ng.
    "gpu": CorpusSpec("gpu", train_size=5000, test_size=500),
}


@dataclass(frozen=True)
class SpeechData:
    """Log-mel utterances of one split: features (total_frames, n_mels) float32 concatenated, offsets (n + 1,).

    Utterance i is features[offsets[i]:offsets[i + 1]]; texts[i] its transcript, voices[i] its voice.
    """

    features: torch.Tensor
    offsets: torch.Tensor
    texts: list[str]
    voices: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def utterance(self, i: int) -> torch.Tensor:
        return self.features[int(self.offsets[i]) : int(self.offsets[i + 1])]


@dataclass(frozen=True)
class SpeechCorpus:
    """Train and test splits of a corpus; `digest` names the exact build (spec + espeak-ng version)."""

    spec: CorpusSpec
    train: SpeechData
    test: SpeechData
    digest: str
    path: str


def espeak_binary() -> str:
    """Path of espeak-ng; raises RuntimeError naming the install command when it is missing."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError(f"the ASR recipe synthesises its speech with espeak-ng, which is not installed: "
                           f"run `{INSTALL_HINT}` (Debian/Ubuntu)")
    return path


def espeak_version() -> str:
    out = subprocess.run([espeak_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("Data at")[0].strip()


def synthesize(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """espeak-ng's waveform of text, float32 in [-1, 1] at SAMPLE_RATE Hz."""
    with tempfile.TemporaryDirectory(prefix="sigattn-espeak-") as tmp:
        path = os.path.join(tmp, "out.wav")
        subprocess.run([espeak_binary(), "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", path, text],
                       check=True, capture_output=True)
        with wave.open(path) as w:
            if w.getframerate() != SAMPLE_RATE or w.getsampwidth() != 2:
                raise RuntimeError(f"espeak-ng wrote {w.getframerate()} Hz, {8 * w.getsampwidth()}-bit audio; "
                                   f"expected {SAMPLE_RATE} Hz 16-bit")
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """Play audio `factor` times faster (tempo and pitch together, as sox ``speed``) by linear resampling."""
    if factor == 1.0:
        return audio
    n = max(1, int(round(len(audio) / factor)))
    return np.interp(np.arange(n) * factor, np.arange(len(audio)), audio).astype(np.float32)


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """audio plus white Gaussian noise at signal-to-noise ratio snr_db (signal power over the whole clip)."""
    power = float(np.mean(audio.astype(np.float64) ** 2)) or 1e-8
    noise = rng.standard_normal(len(audio)) * math.sqrt(power / 10 ** (snr_db / 10))
    return (audio + noise).astype(np.float32)


def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """Triangular HTK-mel filters (n_fft // 2 + 1, n_mels), float32, unnormalised (peak 1), as torchaudio's
    ``melscale_fbanks(..., norm=None, mel_scale="htk")``: filter m rises linearly from centre m-1 to centre
    m and falls to centre m+1, the n_mels + 2 centres equally spaced in mel between f_min and f_max
    (default sample_rate / 2).
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # [bins]
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2,
                                     dtype=torch.float64))  # [n_mels + 2]
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rise = (freqs[:, None] - lower) / (centre - lower)  # [bins, n_mels]
    fall = (upper - freqs[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rise, fall), min=0.0).float()


def log_mel(audio: torch.Tensor, filterbank: torch.Tensor, n_fft: int = N_FFT, hop: int = HOP) -> torch.Tensor:
    """Per-utterance-normalised log-mel features (frames, n_mels) of a mono waveform (samples,) float32.

    Power spectrum of a Hann-windowed STFT (centre padding, reflect), the filterbank, log(x + 1e-6), then each
    mel bin shifted and scaled to zero mean and unit variance over the utterance.
    """
    if audio.numel() < n_fft // 2 + 1:
        audio = torch.nn.functional.pad(audio, (0, n_fft // 2 + 1 - audio.numel()))
    spec = torch.stft(audio, n_fft, hop_length=hop, window=torch.hann_window(n_fft), return_complex=True)
    power = spec.abs().square().T  # [frames, bins]
    feats = torch.log(power @ filterbank + 1e-6)  # [frames, n_mels]
    return (feats - feats.mean(0)) / (feats.std(0, correction=0) + 1e-5)


def sample_text(rng: np.random.Generator, spec: CorpusSpec) -> str:
    if rng.random() < spec.word_fraction:
        return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(1, 3))))
    return " ".join(DIGITS[i] for i in rng.integers(0, len(DIGITS), int(rng.integers(1, spec.max_digits + 1))))


def voices(split: str) -> list[str]:
    """The voices ("accent+variant") of a split: every train accent with every train variant, likewise test."""
    accents, variants = (TRAIN_ACCENTS, TRAIN_VARIANTS) if split == "train" else (TEST_ACCENTS, TEST_VARIANTS)
    return [f"{a}+{v}" for a in accents for v in variants]


@dataclass(frozen=True)
class _Utterance:
    text: str
    voice: str
    rate: int
    pitch: int
    speed: float
    snr_db: float
    seed: int


def _plan(spec: CorpusSpec, split: str) -> list[_Utterance]:
    rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1])
    pool = voices(split)
    size = spec.train_size if split == "train" else spec.test_size
    plan = []
    for i in range(size):
        plan.append(_Utterance(
            text=sample_text(rng, spec), voice=pool[i % len(pool)], rate=int(rng.integers(*spec.rates, endpoint=True)),
            pitch=int(rng.integers(*spec.pitches, endpoint=True)), speed=float(rng.choice(spec.speeds)),
            snr_db=float(rng.uniform(*spec.snr_db)) if split == "train" else spec.test_snr_db,
            seed=int(rng.integers(2**31)),
        ))
    return plan


def _render(u: _Utterance, filterbank: torch.Tensor) -> torch.Tensor:
    audio = synthesize(u.text, u.voice, u.rate, u.pitch)
    audio = add_noise(change_speed(audio, u.speed), u.snr_db, np.random.default_rng(u.seed))
    return log_mel(torch.from_numpy(audio), filterbank)


def _build_split(spec: CorpusSpec, split: str, workers: int) -> SpeechData:
    plan = _plan(spec, split)
    fb = mel_filterbank(spec.n_mels)
    # Threads suffice: the time is in the espeak-ng subprocesses and in torch ops that release the GIL.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        feats = list(pool.map(lambda u: _render(u, fb), plan))
    lengths = torch.tensor([0] + [f.shape[0] for f in feats])
    return SpeechData(torch.cat(feats), torch.cumsum(lengths, 0), [u.text for u in plan], [u.voice for u in plan])


def default_dir() -> Path:
    """$SIGATTN_ASR_DIR, else ~/.cache/sigattn/asr."""
    env = os.environ.get(DEFAULT_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "sigattn" / "asr"


def load_speech(spec: CorpusSpec | str = "tiny", data_dir: str | Path | None = None,
                workers: int | None = None) -> SpeechCorpus:
    """The corpus of spec (a CorpusSpec or a CORPORA name), built on first use and cached under data_dir.

    data_dir: None means default_dir(). The cache file is named by a digest of the spec and the espeak-ng
    version, so a changed spec or synthesiser builds a new corpus. workers: synthesis threads (default: CPUs).
    Raises RuntimeError naming ``apt-get install -y espeak-ng`` when espeak-ng is missing and no cache exists.
    """
    spec = CORPORA[spec] if isinstance(spec, str) else spec
    root = Path(data_dir) if data_dir is not None else default_dir()
    key = json.dumps(asdict(spec), sort_keys=True)
    try:
        version = espeak_version()
    except RuntimeError:
        cached = sorted(root.glob(f"{spec.name}-*.pt")) if root.exists() else []
        match = [p for p in cached if torch.load(p, weights_only=True)["spec"] == key]
        if not match:
            raise
        version = torch.load(match[0], weights_only=True)["espeak"]
    digest = hashlib.sha256(f"{key}\n{version}".encode()).hexdigest()[:12]
    path = root / f"{spec.name}-{digest}.pt"
    if not path.exists():
        workers = workers or min(8, os.cpu_count() or 1)
        train, test = _build_split(spec, "train", workers), _build_split(spec, "test", workers)
        root.mkdir(parents=True, exist_ok=True)
        # float16 on disk (normalised features, |x| < ~10: 3 significant digits) halves the cache.
        state = {"spec": key, "espeak": version,
                 **{f"{name}_{field}": getattr(split, field) for name, split in (("train", train), ("test", test))
                    for field in ("offsets", "texts", "voices")},
                 "train_features": train.features.half(), "test_features": test.features.half()}
        buf = io.BytesIO()
        torch.save(state, buf)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)  # atomic: concurrent builders (DDP ranks, tests) never read a half-written file
    state = torch.load(path, weights_only=True)
    train, test = (SpeechData(state[f"{s}_features"].float(), state[f"{s}_offsets"], state[f"{s}_texts"],
                              state[f"{s}_voices"]) for s in ("train", "test"))
    return SpeechCorpus(spec, train, test, digest, str(path))


def encode_text(text: str) -> torch.Tensor:
    """Transcript -> int64 label ids (1 = space, 2.. = a-z); characters outside ALPHABET are dropped."""
    return torch.tensor([ALPHABET.index(c) + 1 for c in text.lower() if c in ALPHABET], dtype=torch.long)


def decode_ids(ids: list[int]) -> str:
    """Label ids (no blanks) -> text."""
    return "".join(ALPHABET[i - 1] for i in ids if i != BLANK)

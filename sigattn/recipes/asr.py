"""The ASR recipe's model and task: a CTC transformer encoder over log-mels, batches, greedy decoding, CER/WER."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sigattn.nn import make_norm
from sigattn.recipes import asr_data
from sigattn.recipes.models import ModelShape, _blocks, _init_weights
from sigattn.recipes.variants import Variant

if TYPE_CHECKING:  # train imports this module
    from sigattn.recipes.train import Dist, Recipe


def subsampled_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Encoder lengths after ConvSubsampling: two kernel-3 stride-2 convolutions without time padding."""
    for _ in range(2):
        lengths = torch.div(lengths - 3, 2, rounding_mode="floor") + 1
    return lengths.clamp(min=0)


class ConvSubsampling(nn.Module):
    """features (batch, frames, n_mels) -> (batch, ~frames / 4, dim): two 3x3 stride-2 convs with GELU, then linear.

    No padding along time, so output frame t sees input frames 4t .. 4t + 6 only: a padded batch's valid
    outputs equal those of each utterance alone (the padding invariance the tests check).
    """

    def __init__(self, n_mels: int, dim: int, channels: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=2, padding=(0, 1))
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2, padding=(0, 1))
        freq = (n_mels - 1) // 2 + 1
        freq = (freq - 1) // 2 + 1
        self.proj = nn.Linear(channels * freq, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(F.gelu(self.conv1(features[:, None]))))  # [batch, channels, frames', freq']
        return self.proj(x.permute(0, 2, 1, 3).flatten(2))  # [batch, frames', dim]


class CTCEncoder(nn.Module):
    """Bidirectional CTC speech encoder: (features (batch, frames, n_mels), lengths (batch,)) -> (log_probs, lengths).

    ConvSubsampling (x4 in time), `depth` bidirectional TransformerBlocks built from `variant` with
    b = -log(train_seqlen) (train_seqlen: the typical encoder length of the training data) attending under a key
    padding mask, a final norm and a linear head over asr_data.VOCAB_SIZE labels (0 = CTC blank). Returns
    log_probs (batch, frames', vocab) float32 and the encoder lengths (batch,) int64; frames of a sequence past
    its length are padding (their values are not defined by the mask and must be ignored).
    """

    def __init__(self, shape: ModelShape, variant: Variant, *, n_mels: int, train_seqlen: int,
                 vocab_size: int = asr_data.VOCAB_SIZE, backend: str = "auto") -> None:
        super().__init__()
        self.subsample = ConvSubsampling(n_mels, shape.dim)
        self.blocks = _blocks(shape, variant, train_seqlen, causal=False, backend=backend)
        self.norm = make_norm("layer", shape.dim)
        self.head = nn.Linear(shape.dim, vocab_size)
        _init_weights(self)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.subsample(features)  # [batch, seqlen, dim]
        out_lengths = subsampled_lengths(lengths).clamp(max=x.shape[1])
        keep = torch.arange(x.shape[1], device=x.device) < out_lengths[:, None]  # [batch, seqlen]
        mask = keep[:, None, None, :]  # [batch, 1, 1, seqlen]: every query sees its own sequence's keys
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        return F.log_softmax(self.head(self.norm(x)).float(), dim=-1), out_lengths




def ctc_loss(output: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean CTC loss (per target character, averaged over utterances) of (log_probs, lengths) for
    (labels (batch, max_label) padded with 0, label lengths (batch,)). Infeasible alignments count 0."""
    log_probs, lengths = output
    labels, label_lengths = target
    return F.ctc_loss(log_probs.float().transpose(0, 1), labels, lengths, label_lengths, blank=asr_data.BLANK,
                      reduction="mean", zero_infinity=True)


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Best-path CTC decoding: argmax per frame, merge repeats, drop blanks; one string per sequence."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for seq, n in zip(best.tolist(), lengths.tolist()):
        ids = [c for i, c in enumerate(seq[:n]) if c != asr_data.BLANK and (i == 0 or c != seq[i - 1])]
        out.append(asr_data.decode_ids(ids))
    return out


def edit_distance(ref: list[Any] | str, hyp: list[Any] | str) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def error_counts(refs: list[str], hyps: list[str]) -> tuple[int, int, int, int]:
    """(character edits, reference characters, word edits, reference words) summed over the pairs."""
    ce = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    we = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps))
    return ce, sum(len(r) for r in refs), we, sum(len(r.split()) for r in refs)


Pair = tuple[torch.Tensor, torch.Tensor]


def pad_batch(data: asr_data.SpeechData, index: list[int]) -> tuple[Pair, Pair]:
    """Utterances `index` as ((features (b, frames, n_mels) zero-padded, frames (b,)), (labels (b, max_label)
    0-padded, label lengths (b,)))."""
    feats = [data.utterance(i) for i in index]
    labels = [asr_data.encode_text(data.texts[i]) for i in index]
    x = nn.utils.rnn.pad_sequence(feats, batch_first=True)
    y = nn.utils.rnn.pad_sequence(labels, batch_first=True)
    return ((x, torch.tensor([f.shape[0] for f in feats])), (y, torch.tensor([len(t) for t in labels])))


def spec_augment(features: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator, *, freq_masks: int = 2,
                 freq_width: int = 8, time_masks: int = 2, time_width: int = 10) -> torch.Tensor:
    """SpecAugment without warping (Park et al. 2019): zero (the per-utterance mean) `freq_masks` bands of up to
    freq_width mel bins and `time_masks` spans of up to time_width frames inside each utterance; a new tensor."""
    x = features.clone()
    batch, _, n_mels = x.shape
    for i in range(batch):
        n = int(lengths[i])
        for _ in range(freq_masks):
            w = int(torch.randint(0, freq_width + 1, (), generator=generator))
            f0 = int(torch.randint(0, max(1, n_mels - w), (), generator=generator))
            x[i, :n, f0 : f0 + w] = 0
        for _ in range(time_masks):
            w = int(torch.randint(0, min(time_width, n // 5) + 1, (), generator=generator))
            t0 = int(torch.randint(0, max(1, n - w), (), generator=generator))
            x[i, t0 : t0 + w] = 0
    return x


class AsrTask:
    """The ASR side of the training loop (the interface of train._Task): batches, CTC loss, CER/WER evaluation.

    recipe.batch utterances per step, drawn with replacement from the training voices by a generator seeded
    with (seed, step), with SpecAugment (from the same generator) when recipe.augment; evaluation covers every
    test utterance (held-out voices) in recipe.batch-sized batches.
    train_seqlen (the n of b = -log n) is recipe.context when set, else the median training encoder length.
    """

    images = None

    def __init__(self, recipe: Recipe, seed: int, dist: Dist, device: torch.device, data_dir: str | None) -> None:
        self.recipe, self.seed, self.dist, self.device = recipe, seed, dist, device
        if recipe.batch % dist.world:
            raise ValueError(f"batch ({recipe.batch}) must be divisible by the world size ({dist.world})")
        self.corpus = asr_data.load_speech(recipe.corpus or recipe.size, data_dir)
        enc = subsampled_lengths(self.corpus.train.lengths())
        self.train_seqlen = recipe.context or int(enc.median())
        self.n_mels = self.corpus.spec.n_mels
        test = self.corpus.test
        self.eval_set = [pad_batch(test, list(range(i, min(i + recipe.batch, len(test)))))
                         for i in range(0, len(test), recipe.batch)]
        self.items_per_step = recipe.batch

    def build_model(self, shape: ModelShape, variant: Variant, backend: str) -> CTCEncoder:
        return CTCEncoder(shape, variant, n_mels=self.n_mels, train_seqlen=self.train_seqlen, backend=backend)

    def data_info(self) -> dict[str, Any]:
        c = self.corpus
        return {"data": f"espeak-ng-{c.spec.name}", "digest": c.digest, "cache": c.path, "train_utts": len(c.train),
                "test_utts": len(c.test), "train_seqlen": self.train_seqlen,
                "test_voices": sorted(set(c.test.voices))}

    def _shard(self, t: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        per = t[0].shape[0] // self.dist.world
        lo = self.dist.rank * per
        a, n = t[0][lo : lo + per], t[1][lo : lo + per]
        return a[:, : int(n.max())].to(self.device, non_blocking=True), n.to(self.device)

    def batch(self, step: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        index = torch.randint(len(self.corpus.train), (self.recipe.batch,), generator=g).tolist()
        x, y = pad_batch(self.corpus.train, index)
        if self.recipe.augment:
            x = (spec_augment(x[0], x[1], g), x[1])
        return self._shard(x), self._shard(y)

    @staticmethod
    def loss(output: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return ctc_loss(output, target)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast: Any) -> dict[str, float]:
        """CTC loss, character and word error rates (greedy decoding) on the held-out voices."""
        total = torch.zeros(6, dtype=torch.float64)  # [loss sum, utterances, char edits, chars, word edits, words]
        for i, (x, y) in enumerate(self.eval_set):
            if i % self.dist.world != self.dist.rank:
                continue
            x, y = (x[0].to(self.device), x[1].to(self.device)), (y[0].to(self.device), y[1].to(self.device))
            with autocast():
                out = model(*x)
            n = x[1].numel()
            lo = self.recipe.batch * i
            refs = self.corpus.test.texts[lo : lo + n]
            counts = error_counts(refs, greedy_decode(*out))
            total += torch.tensor([float(ctc_loss(out, y)) * n, n, *counts], dtype=torch.float64)
        if self.dist.world > 1:
            total = total.to(self.device)
            torch.distributed.all_reduce(total)
            total = total.cpu()
        return {"val_loss": float(total[0] / total[1]), "val_cer": float(total[2] / total[3]),
                "val_wer": float(total[4] / total[5])}

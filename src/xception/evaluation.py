"""Evaluation: ImageNet top-k accuracy and the JFT multi-label protocol (MAP@100, mAP),
and the loop that scores a model over a loader, across ranks.

Everything here is a pure function of score and target tensors, so the same code serves a
single-process loop, a streaming loop over batches and a distributed run: the accuracy
meter keeps one tensor of sums that ranks can ``all_reduce``, and the per-image average
precisions behind MAP@k are independent of each other, so batches can be scored apart and
averaged at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xception.devices import accumulator_dtype, autocast, model_input
from xception.distributed import all_reduce_sum, gather_cat

__all__ = [
    "ClassificationMeter",
    "ConfusionMatrix",
    "Evaluation",
    "average_precision_at_k",
    "class_frequencies",
    "class_frequency_weights",
    "evaluate",
    "map_at_k",
    "mean_average_precision",
    "per_class",
    "primary_metric",
    "topk_correct",
]


def primary_metric(multi_label: bool) -> str:
    """The metric that ranks models and picks ``best``: class-weighted MAP@100 on
    multi-label data (the paper's JFT protocol), top-1 accuracy otherwise."""
    return "map100" if multi_label else "top1"


def _topk_hits(logits: Tensor, targets: Tensor, ks: Sequence[int]) -> Tensor:
    """Per-k hit counts as a tensor, so callers on an accelerator need no host sync."""
    num_classes = logits.shape[-1]
    clipped = [min(k, num_classes) for k in ks]
    ranked = logits.topk(max(clipped), dim=-1).indices
    correct = ranked == targets.unsqueeze(-1)
    # A target appears at most once among the ranks, so a prefix sum counts top-k hits.
    hits_at_rank = correct.sum(dim=0).cumsum(0)
    return torch.stack([hits_at_rank[k - 1] for k in clipped])  # no host-to-device index copy


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target class index is among the ``k`` highest logits.

    ``logits`` is ``[N, C]`` and ``targets`` holds class indices ``[N]``. ``k`` is clipped to
    ``C`` (top-5 of a 3-class problem is top-3, i.e. always correct). Ties are broken by
    ``torch.topk``.
    """
    hits = _topk_hits(logits, targets, ks).tolist()
    return {k: int(h) for k, h in zip(ks, hits, strict=True)}


class ClassificationMeter:
    """Streaming top-1 / top-5 / mean-loss accumulator for single-label evaluation.

    The whole state is ``sums``: one tensor ``[samples, top1 hits, top5 hits, loss sum]``
    (float64, exact up to 2**53 samples; float32 on MPS, which lacks float64). Under DDP a
    caller does ``dist.all_reduce(meter.state())`` once and then ``compute()``. Updates stay on the
    logits' device and never synchronise with the host.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        dtype = accumulator_dtype(torch.device(device or "cpu"))
        self.sums = torch.zeros(4, dtype=dtype, device=device)

    def update(self, logits: Tensor, targets: Tensor, loss_sum: Tensor | float = 0.0) -> None:
        """Add a batch; ``loss_sum`` is the batch's summed (not averaged) per-sample loss."""
        if self.sums.device != logits.device:
            self.sums = self.sums.to(logits.device, accumulator_dtype(logits.device))
        hits = _topk_hits(logits.detach(), targets, (1, 5)).to(self.sums.dtype)
        self.sums[0] += targets.shape[0]
        self.sums[1:3] += hits
        self.sums[3] += loss_sum.detach() if isinstance(loss_sum, Tensor) else loss_sum

    def state(self) -> Tensor:
        """The sums tensor itself (not a copy), so an in-place all_reduce updates the meter."""
        return self.sums

    def merge(self, other: ClassificationMeter | Tensor) -> None:
        """Add another meter's sums (or a ``state()`` tensor), e.g. gathered from other ranks."""
        sums = other.sums if isinstance(other, ClassificationMeter) else other
        self.sums += sums.to(self.sums.device, self.sums.dtype)

    def reset(self) -> None:
        self.sums.zero_()

    @staticmethod
    def compute_from(sums: Tensor) -> dict[str, float]:
        """``compute`` for a sums tensor, e.g. one all-reduced across ranks."""
        meter = ClassificationMeter()
        meter.sums = sums.cpu().to(torch.float64)
        return meter.compute()

    def compute(self) -> dict[str, float]:
        """Top-1, top-5 accuracy and mean loss per sample; NaN before any sample was seen."""
        count, top1, top5, loss = self.sums.tolist()
        if count == 0:
            return {"top1": math.nan, "top5": math.nan, "loss": math.nan}
        return {"top1": top1 / count, "top5": top5 / count, "loss": loss / count}


def class_frequency_weights(targets: Tensor) -> Tensor:
    """Fraction of images labelled with each class: ``targets.sum(0) / N``, in ``[0, 1]``.

    ``targets`` is a 0/1 ``[N, C]`` label matrix (the training labels, or any sample of
    images representative of the traffic the metric should reflect). Classes never seen
    weigh 0: they earn nothing when predicted and are not expected in a perfect top-k.
    A data set too large for one matrix gives its counts to ``class_frequencies``.
    """
    if targets.ndim != 2 or targets.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, C] label matrix, got {tuple(targets.shape)}")
    return class_frequencies(targets.to(torch.float64).sum(dim=0), targets.shape[0])


def class_frequencies(counts: Sequence[float] | Tensor, images: int) -> Tensor:
    """``class_frequency_weights`` from per-class image counts (as a split or info.json
    keeps them): no ``[N, C]`` matrix at any size."""
    return torch.as_tensor(counts, dtype=torch.float64) / images


def class_prior_score(frequency: Tensor, val_targets: Tensor, multi_label: bool) -> float:
    """The score of a model that ignores the image and answers with the training classes'
    ``frequency`` (``class_frequencies``): what a run reaches by learning nothing.
    Multi-label: frequency-weighted MAP@100 (the training metric); single-label: top-1 of
    always naming the commonest class.
    """
    if multi_label:
        scores = frequency.to(torch.float32).expand(val_targets.shape[0], -1)
        return map_at_k(scores, val_targets, 100, frequency)
    return (val_targets.argmax(dim=1) == frequency.argmax()).to(torch.float64).mean().item()


def average_precision_at_k(
    scores: Tensor, targets: Tensor, k: int = 100, class_weights: Tensor | None = None
) -> Tensor:
    """Per-image (class-weighted) AP@k as a float64 ``[N]`` tensor, NaN where undefined.

    This is the per-image term of ``map_at_k`` (see there for the definition). An image is
    undefined (NaN) when it has no positive class of positive weight; ``map_at_k`` leaves
    such images out, and a streaming caller should sum ``nan_to_num`` values and count the
    finite ones. Ranks are a stable descending sort, so tied scores go to the lower class
    index and results are reproducible.
    """
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)}")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    num_classes = scores.shape[1]
    k = min(k, num_classes)
    relevant = targets.to(torch.float64)
    if class_weights is None:
        weights = torch.ones(num_classes, dtype=torch.float64, device=scores.device)
    else:
        weights = class_weights.to(scores.device, torch.float64)
    if weights.shape != (num_classes,) or bool((weights < 0).any()):
        raise ValueError("class_weights must be a non-negative [C] tensor")

    ranked = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    hits = relevant.gather(1, ranked)
    ranks = torch.arange(1, k + 1, dtype=torch.float64, device=scores.device)
    precision = hits.cumsum(dim=1) / ranks
    gain = (weights[ranked] * hits * precision).sum(dim=1)
    # Best achievable gain: the k heaviest positives ranked first, where every P@j is 1.
    ideal = (relevant * weights).topk(k, dim=1).values.sum(dim=1)
    return torch.where(ideal > 0, gain / ideal, torch.nan)


def map_at_k(
    scores: Tensor, targets: Tensor, k: int = 100, class_weights: Tensor | None = None
) -> float:
    """MAP@k of a multi-label ranking, optionally class-weighted (the JFT FastEval14k metric).

    For image ``i`` let ``c_1..c_k`` be its ``k`` highest-scoring classes, ``rel_j`` whether
    ``c_j`` is one of its labels, ``P@j = (rel_1 + ... + rel_j) / j`` and ``w(c)`` the weight of
    class ``c`` (ones by default). Then::

        AP_i@k = sum_j w(c_j) * rel_j * P@j  /  Z_i
        Z_i    = sum of the min(k, n_i) largest w(c) over the image's n_i positive classes

    and MAP@k is the mean of ``AP_i@k`` over images with ``Z_i > 0``. ``Z_i`` is the numerator
    of the best possible ranking, so a perfect ranking scores 1.0; with unit weights ``Z_i =
    min(k, n_i)`` and this is the standard AP@k of information retrieval (e.g. the ``apk``
    of Kaggle's ``ml_metrics``, the same normaliser as Kaggle's MAP@k competition metrics).

    Source of the weighting: the Xception paper (JFT section) only says that each class's
    contribution to MAP@100 is weighted by a score estimating how common the class is among
    social-media images. FastEval14k, JFT and Google's evaluation code are not public, and no
    public reference implementation was found, so this is a reconstruction: each hit
    contributes the weight of its class, normalised so that a perfect ranking scores 1.0
    and unit weights give plain MAP@k. ``class_frequency_weights`` gives frequency weights
    from a label matrix; the paper's social-media scores are not available. The paper's
    values (6.36 to 6.78) are on an unstated scale: do not compare them with these numbers.
    """
    per_image = average_precision_at_k(scores, targets, k, class_weights)
    defined = per_image[~per_image.isnan()]
    if defined.numel() == 0:
        raise ValueError("no image has a positive label of positive weight")
    return defined.mean().item()


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Mean over classes of average precision, scikit-learn's ``average_precision_score``.

    Per class, images are ranked by score and ``AP = sum_n (R_n - R_{n-1}) * P_n`` over the
    distinct score thresholds (no interpolation); tied scores form one threshold, as in
    sklearn. Classes without a positive image have no defined AP and are skipped (sklearn
    would warn and score them 0). Equivalent to ``average_precision_score(targets, scores,
    average="macro")`` on the remaining classes.
    """
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)}")
    relevant = targets.to(torch.float64)
    has_positive = relevant.sum(dim=0) > 0
    if not bool(has_positive.any()):
        raise ValueError("no class has a positive image")
    scores, relevant = scores[:, has_positive], relevant[:, has_positive]

    sorted_scores, order = scores.sort(dim=0, descending=True)
    hits = relevant.gather(0, order)
    num = scores.shape[0]
    ranks = torch.arange(1, num + 1, dtype=torch.float64, device=scores.device).unsqueeze(1)
    precision = hits.cumsum(dim=0) / ranks
    # Every image in a tie group takes the precision at the group's last row.
    group_end = torch.ones_like(hits, dtype=torch.bool)
    group_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    row = torch.arange(num, device=scores.device).unsqueeze(1).expand_as(hits)
    end_row = torch.where(group_end, row, num).flip(0).cummin(dim=0).values.flip(0)
    precision = precision.gather(0, end_row)
    per_class = (hits * precision).sum(dim=0) / hits.sum(dim=0)
    return per_class.mean().item()


@dataclass
class Evaluation:
    """What ``evaluate`` found: the metrics, the unreadable files it skipped and, for
    single-label data, the confusion matrix (rows: true class, columns: predicted)."""

    metrics: dict[str, float]
    skipped: list[str]
    confusion: Tensor | None = None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    pre,
    world,
    multi_label: bool,
    class_weights: Tensor | None = None,
    channels_last: bool = False,
    amp: str = "none",
    num_classes: int | None = None,
) -> Evaluation:
    """Score ``model`` over ``loader`` (each rank its share, every sample once).

    Single-label: ``top1``, ``top5``, ``loss``, and the confusion matrix when
    ``num_classes`` is given. Multi-label: ``map100`` (class-frequency weighted when
    ``class_weights`` is given), ``map100_unweighted``, ``map``, ``loss``.
    """
    was_training = model.training
    model.eval()
    meter = ClassificationMeter(device)
    confusion = ConfusionMatrix(num_classes, device) if num_classes and not multi_label else None
    scores, targets, skipped = [], [], []
    dtype = accumulator_dtype(device)
    # multi-label: per-image AP@100 sums and counts (class-weighted, then unweighted), the
    # loss sum and the images; MAP@100 streams, and one all-reduce settles all of it
    sums = torch.zeros(6, dtype=dtype, device=device)
    for batch in loader:
        skipped += batch.skipped
        if batch.images.shape[0] == 0:
            continue
        x = model_input(batch.images, pre, device, channels_last)
        y = batch.targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x).float()
        if multi_label:
            sums[4] += F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / y.shape[1]
            sums[5] += y.shape[0]
            probabilities = torch.sigmoid(logits)
            for j, weights in enumerate((class_weights, None)):
                ap = average_precision_at_k(probabilities, y, 100, weights)
                sums[2 * j] += ap.nan_to_num().sum().to(dtype)
                sums[2 * j + 1] += (~ap.isnan()).sum().to(dtype)
            scores.append(probabilities)
            targets.append(y)
        else:
            meter.update(logits, y, F.cross_entropy(logits, y, reduction="sum"))
            if confusion is not None:
                confusion.update(logits, y)
    model.train(was_training)
    if not multi_label:
        metrics = ClassificationMeter.compute_from(all_reduce_sum(meter.state(), world))
        counts = all_reduce_sum(confusion.counts, world).cpu() if confusion is not None else None
        return Evaluation(metrics, skipped, counts)
    weighted, defined, plain, images, loss, total = all_reduce_sum(sums, world).tolist()
    if not defined or not images:
        raise ValueError("no image has a positive label of positive weight")
    # mAP ranks every image per class: rank 0 alone gathers the scores, and shares the value
    gathered = [gather_cat(torch.cat(parts), world) for parts in (scores, targets)]
    value = torch.zeros((), dtype=dtype, device=device)
    if world.is_main:
        value += mean_average_precision(gathered[0].cpu(), gathered[1].cpu())
    metrics = {
        "map100": weighted / defined,
        "map100_unweighted": plain / images,
        "map": all_reduce_sum(value, world).item(),
        "loss": loss / total,
    }
    return Evaluation(metrics, skipped)


class ConfusionMatrix:
    """Counts of (true class, predicted class) pairs, on the logits' device (no sync)."""

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, logits: Tensor, targets: Tensor) -> None:
        pairs = targets * self.num_classes + logits.argmax(dim=1)
        self.counts += torch.bincount(pairs, minlength=self.num_classes**2).view_as(self.counts)


def per_class(confusion: Tensor, classes: Sequence[str]) -> list[dict[str, Any]]:
    """Per class: images, precision, recall (the class's accuracy: the share of its images
    named right) and F1, from a confusion matrix (rows true, columns predicted). A class
    never predicted has precision 0; one without images has no recall (None)."""
    counts = confusion.to(torch.float64)
    hits, actual, predicted = counts.diagonal(), counts.sum(1), counts.sum(0)
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), 0.0)
    recall = torch.where(actual > 0, hits / actual.clamp(min=1), torch.nan)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return [
        {
            "class": name,
            "images": int(actual[i]),
            "precision": precision[i].item(),
            "recall": None if actual[i] == 0 else recall[i].item(),
            "f1": f1[i].item(),
        }
        for i, name in enumerate(classes)
    ]

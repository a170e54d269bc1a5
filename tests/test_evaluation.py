"""Metrics against hand-computed examples and ranking invariants."""

import math

import pytest
import torch

from xception.evaluation import (
    ClassificationMeter,
    average_precision_at_k,
    class_frequencies,
    class_frequency_weights,
    class_prior_score,
    map_at_k,
    mean_average_precision,
    topk_correct,
)

# Six classes, three samples; ranking of the classes per row in the comments.
LOGITS = torch.tensor(
    [
        [0.1, 0.9, 0.3, 0.2, 0.5, 0.0],  # ranks 1,4,2,3,0,5; target 1 at rank 1
        [0.8, 0.1, 0.2, 0.3, 0.4, 0.5],  # ranks 0,5,4,3,2,1; target 2 at rank 5
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # ranks 0,1,2,3,4,5; target 5 at rank 6
    ]
)
LABELS = torch.tensor([1, 2, 5])

# Three images, five classes (the multi-label example).
SCORES = torch.tensor(
    [
        [0.9, 0.8, 0.7, 0.6, 0.5],  # ranking 0,1,2,3,4
        [0.1, 0.2, 0.3, 0.4, 0.5],  # ranking 4,3,2,1,0
        [0.5, 0.1, 0.9, 0.3, 0.7],  # ranking 2,4,0,3,1
    ]
)
TARGETS = torch.tensor(
    [
        [1, 0, 1, 0, 0],  # positives 0, 2
        [0, 1, 0, 0, 1],  # positives 1, 4
        [0, 0, 0, 1, 0],  # positive 3
    ]
)
WEIGHTS = torch.tensor([0.5, 1.0, 2.0, 4.0, 0.25])


def test_topk_correct_hand_example():
    # top-1: only row 0; top-5: rows 0 and 1; top-10 clips to top-6: every row.
    assert topk_correct(LOGITS, LABELS) == {1: 1, 5: 2}
    assert topk_correct(LOGITS, LABELS, ks=(1, 5, 10)) == {1: 1, 5: 2, 10: 3}


def test_meter_streams_and_merges_like_one_pass():
    meter = ClassificationMeter()
    assert all(math.isnan(v) for v in meter.compute().values())
    meter.update(LOGITS[:2], LABELS[:2], loss_sum=torch.tensor(3.0))
    meter.update(LOGITS[2:], LABELS[2:], loss_sum=1.5)
    assert meter.compute() == pytest.approx({"top1": 1 / 3, "top5": 2 / 3, "loss": 4.5 / 3})

    # Two "ranks" each see a shard; summing their state tensors is what all_reduce does.
    rank0, rank1 = ClassificationMeter(), ClassificationMeter()
    rank0.update(LOGITS[:1], LABELS[:1], 1.0)
    rank1.update(LOGITS[1:], LABELS[1:], 3.5)
    rank0.state().add_(rank1.state())
    assert rank0.compute() == pytest.approx(meter.compute())
    rank1.merge(ClassificationMeter())
    rank1.merge(torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    assert rank1.compute() == pytest.approx(meter.compute())

    meter.reset()
    assert math.isnan(meter.compute()["top1"])


def test_map_at_k_unweighted_hand_example():
    # k=3.  image 0: top 0,1,2 -> rel 1,0,1: (P@1 + P@3) / min(3, 2) = (1 + 2/3) / 2 = 5/6
    #       image 1: top 4,3,2 -> rel 1,0,0: 1 / 2 = 1/2
    #       image 2: top 2,4,0 -> rel 0,0,0: 0
    # MAP@3 = (5/6 + 1/2 + 0) / 3 = 4/9
    assert map_at_k(SCORES, TARGETS, k=3) == pytest.approx(4 / 9)
    # k=5 (uncut). image 0: 5/6 as above
    #       image 1: 4,3,2,1,0 -> hits at 1 and 4: (1 + 2/4) / 2 = 3/4
    #       image 2: 2,4,0,3,1 -> hit at 4: (1/4) / 1 = 1/4
    # MAP@5 = (5/6 + 3/4 + 1/4) / 3 = 11/18
    assert map_at_k(SCORES, TARGETS, k=5) == pytest.approx(11 / 18)
    per_image = average_precision_at_k(SCORES, TARGETS, k=5)
    torch.testing.assert_close(per_image, torch.tensor([5 / 6, 3 / 4, 1 / 4], dtype=torch.float64))


def test_map_at_k_weighted_hand_example():
    # w = [0.5, 1, 2, 4, 0.25]; k=3.
    # image 0: hits class 0 at 1 (P=1), class 2 at 3 (P=2/3): 0.5*1 + 2*2/3 = 11/6;
    #          Z = w0 + w2 = 5/2 -> 11/15
    # image 1: hit class 4 at 1: 0.25; Z = w1 + w4 = 1.25 -> 1/5
    # image 2: no hit in the top 3 -> 0
    # MAP = (11/15 + 3/15 + 0) / 3 = 14/45
    assert map_at_k(SCORES, TARGETS, k=3, class_weights=WEIGHTS) == pytest.approx(14 / 45)
    # k=1: only the heaviest positive fits in a perfect top-1, so Z is that weight.
    # image 0: hit class 0 (0.5) / max(w0, w2) = 0.5 / 2 = 1/4
    # image 1: hit class 4 (0.25) / max(w1, w4) = 0.25 / 1 = 1/4
    # image 2: miss -> 0.  MAP@1 = (1/4 + 1/4 + 0) / 3 = 1/6
    assert map_at_k(SCORES, TARGETS, k=1, class_weights=WEIGHTS) == pytest.approx(1 / 6)


def test_map_at_k_skips_undefined_images():
    # Image 1 has no positive of positive weight once class 1 and 4 weigh 0, so it is left
    # out: MAP@3 = (AP_0 + AP_2) / 2, AP_0 = (0.5 + 2 * 2/3) / 2.5 = 11/15, AP_2 = 0.
    weights = torch.tensor([0.5, 0.0, 2.0, 4.0, 0.0])
    per_image = average_precision_at_k(SCORES, TARGETS, k=3, class_weights=weights)
    assert per_image[1].isnan()
    assert map_at_k(SCORES, TARGETS, k=3, class_weights=weights) == pytest.approx(11 / 30)
    with pytest.raises(ValueError):
        map_at_k(SCORES, torch.zeros_like(TARGETS))


def test_mean_average_precision_hand_example():
    # Per class (images ranked by that class's column):
    # class 0: 0.9(i0+), 0.5, 0.1         -> AP 1
    # class 1: 0.8, 0.2(i1+), 0.1         -> AP 1/2
    # class 2: 0.9, 0.7(i0+), 0.3         -> AP 1/2
    # class 3: 0.6, 0.4, 0.3(i2+)         -> AP 1/3
    # class 4: 0.7, {0.5, 0.5(i1+)} tied  -> one threshold: P = 1/3, R = 1 -> AP 1/3
    # mAP = (1 + 1/2 + 1/2 + 1/3 + 1/3) / 5 = 8/15
    assert mean_average_precision(SCORES, TARGETS) == pytest.approx(8 / 15)


@pytest.mark.parametrize("column", [[1, 0, 1], [0, 1, 1]])
def test_mean_average_precision_ties_follow_sklearn(column):
    # Scores 0.5, 0.5, 0.2: thresholds 0.5 (tp 1, fp 1: P 1/2, R 1/2) and 0.2 (P 2/3, R 1).
    # AP = 1/2 * 1/2 + 1/2 * 2/3 = 7/12 whichever tied image is the positive.
    scores = torch.tensor([[0.5], [0.5], [0.2]])
    targets = torch.tensor(column).unsqueeze(1)
    assert mean_average_precision(scores, targets) == pytest.approx(7 / 12)


def test_mean_average_precision_skips_classes_without_positives():
    targets = TARGETS.clone()
    targets[:, 3] = 0  # class 3 (AP 1/3) drops out: (1 + 1/2 + 1/2 + 1/3) / 4 = 7/12
    assert mean_average_precision(SCORES, targets) == pytest.approx(7 / 12)


def test_class_frequency_weights():
    # Class counts 1, 1, 1, 1, 1 over 3 images; make class 0 twice as common.
    targets = torch.cat([TARGETS, torch.tensor([[1, 0, 0, 0, 0]])])
    expected = torch.tensor([2, 1, 1, 1, 1], dtype=torch.float64) / 4
    torch.testing.assert_close(class_frequency_weights(targets), expected)


def _random_problem(seed: int = 0, n: int = 24, c: int = 12):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, c, generator=gen)
    targets = (torch.rand(n, c, generator=gen) < 0.3).long()
    targets[torch.arange(n), torch.randint(c, (n,), generator=gen)] = 1  # >= 1 positive each
    weights = torch.rand(c, generator=gen) + 0.1
    return scores, targets, weights


def _uncut_ap(scores_row: torch.Tensor, targets_row: torch.Tensor) -> float:
    ranked = targets_row[scores_row.argsort(descending=True)].tolist()
    hits, total = 0, 0.0
    for rank, rel in enumerate(ranked, start=1):
        if rel:
            hits += 1
            total += hits / rank
    return total / hits


@pytest.mark.parametrize("k", [1, 3, 100])
def test_map_at_k_invariants(k):
    scores, targets, weights = _random_problem()
    # Perfect ranking (positives first, heaviest first) scores 1; reversing it scores less.
    perfect = targets * (1 + weights)
    assert map_at_k(perfect, targets, k, weights) == pytest.approx(1.0)
    assert map_at_k(perfect, targets, k) == pytest.approx(1.0)
    assert map_at_k(-perfect, targets, k, weights) < 1.0
    # Permuting images, or scaling all weights, changes nothing.
    perm = torch.randperm(scores.shape[0], generator=torch.Generator().manual_seed(1))
    value = map_at_k(scores, targets, k, weights)
    assert map_at_k(scores[perm], targets[perm], k, weights) == pytest.approx(value)
    assert map_at_k(scores, targets, k, 7.0 * weights) == pytest.approx(value)
    # Unit weights are the same as no weights.
    ones = torch.ones_like(weights)
    assert map_at_k(scores, targets, k, ones) == pytest.approx(map_at_k(scores, targets, k))


def test_map_at_k_uncut_is_per_image_ap():
    scores, targets, _ = _random_problem(seed=2)
    expected = sum(map(_uncut_ap, scores, targets)) / scores.shape[0]
    assert map_at_k(scores, targets, k=scores.shape[1]) == pytest.approx(expected)
    assert map_at_k(scores, targets, k=1000) == pytest.approx(expected)
    # Per-image AP is per-class AP of the transposed problem (no ties in random scores).
    assert mean_average_precision(scores.T, targets.T) == pytest.approx(expected)


def test_mean_average_precision_invariants():
    scores, targets, _ = _random_problem(seed=3)
    assert mean_average_precision(targets.float(), targets) == pytest.approx(1.0)
    value = mean_average_precision(scores, targets)
    assert mean_average_precision(-targets.float(), targets) < value < 1.0
    perm = torch.randperm(scores.shape[0], generator=torch.Generator().manual_seed(4))
    assert mean_average_precision(scores[perm], targets[perm]) == pytest.approx(value)


def test_class_prior_score_is_the_score_of_answering_with_training_frequencies():
    # Training labels: class 0 in 3 of 4 images, class 1 in 2, class 2 in 1 -> w = [3, 2, 1]/4.
    train = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    # Every image ranks 0, 1, 2.  Image a {1}: hit at rank 2, P=1/2 -> w1/2 / w1 = 1/2.
    # Image b {0, 2}: hit 0 at 1 (P=1), 2 at 3 (P=2/3): (3 + 1*2/3)/(3 + 1) = 11/12.
    val = torch.tensor([[0, 1, 0], [1, 0, 1]])
    assert class_prior_score(
        class_frequency_weights(train), val, multi_label=True
    ) == pytest.approx((1 / 2 + 11 / 12) / 2)
    # Single-label: always naming the commonest training class (0) is right for 1 of 3.
    one_hot = torch.eye(3)
    prior = class_frequencies([2, 1, 0], 3)  # the counts of one_hot[[0, 0, 1]]
    assert class_prior_score(prior, one_hot[[0, 1, 2]], False) == pytest.approx(1 / 3)


def test_confusion_and_per_class_results_against_counts_by_hand():
    from xception.evaluation import ConfusionMatrix, per_class

    meter = ConfusionMatrix(3)
    logits = torch.eye(3)[[0, 0, 1, 2, 2, 2]]  # predicted 0, 0, 1, 2, 2, 2
    meter.update(logits, torch.tensor([0, 1, 1, 2, 2, 0]))
    assert meter.counts.tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    rows = per_class(meter.counts, ["a", "b", "c"])
    assert [r["images"] for r in rows] == [2, 2, 2]
    assert [r["precision"] for r in rows] == pytest.approx([1 / 2, 1.0, 2 / 3])
    assert [r["recall"] for r in rows] == pytest.approx([1 / 2, 1 / 2, 1.0])
    assert rows[2]["f1"] == pytest.approx(0.8)
    empty = per_class(torch.tensor([[2, 0], [0, 0]]), ["x", "y"])
    assert empty[1]["precision"] == 0 and empty[1]["recall"] is None


def test_multi_label_evaluation_streams_map_at_100_as_the_whole_set_scores():
    """`evaluate` sums per-image AP@100 batch by batch (what ranks all-reduce) and gathers
    scores only for mAP: its figures equal the metrics of all scores at once."""
    import torch.nn.functional as F
    from torch import nn

    from xception.data.loaders import Batch
    from xception.data.transforms import Preprocessing
    from xception.distributed import World
    from xception.evaluation import evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    targets = (torch.rand(10, 5) < 0.4).float()
    targets[3] = 0  # an image without labels: undefined, left out of MAP@100
    batches = [Batch(images[i : i + 4], targets[i : i + 4], []) for i in range(0, 10, 4)]
    pre = Preprocessing(image_size=4)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2], dtype=torch.float64)
    found = evaluate(model, batches, torch.device("cpu"), pre, World(), True, weights).metrics
    with torch.no_grad():
        logits = model((images.float() / 127.5 - 1).contiguous())
    scores = torch.sigmoid(logits)
    assert found["map100"] == pytest.approx(map_at_k(scores, targets, 100, weights))
    assert found["map100_unweighted"] == pytest.approx(map_at_k(scores, targets, 100))
    assert found["map"] == pytest.approx(mean_average_precision(scores, targets))
    loss = F.binary_cross_entropy_with_logits(logits, targets)
    assert found["loss"] == pytest.approx(loss.item(), rel=1e-5)

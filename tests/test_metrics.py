import numpy as np
import pytest

from fdseg.metrics import ConfusionMatrix, benchmark_mean, dataset_scores, episode_counts


def test_episode_counts_by_hand():
    gt = np.array([[1, 1, 0], [0, 0, 0]], bool)
    pred = np.array([[1, 0, 1], [1, 0, 0]], bool)
    assert episode_counts(gt, pred) == (1, 2, 1, 2)


def test_confusion_matrix_by_hand():
    # 3 labels: background, class 1, class 2
    gt = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pr = np.array([0, 1, 0, 1, 0, 2, 2, 0])
    cm = ConfusionMatrix(3)
    cm.update(gt, pr)
    assert cm.cm.tolist() == [[2, 1, 0], [1, 1, 0], [1, 0, 2]]
    # IoU: bg 2/(3+4-2)=2/5, c1 1/(2+2-1)=1/3, c2 2/(3+2-2)=2/3
    np.testing.assert_allclose(cm.iou(), [2 / 5, 1 / 3, 2 / 3])
    assert cm.miou() == pytest.approx(0.5)
    assert cm.fbiou() == pytest.approx((0.5 + 2 / 5) / 2)
    np.testing.assert_allclose(cm.precision(), [2 / 4, 1 / 2, 2 / 2])
    np.testing.assert_allclose(cm.recall(), [2 / 3, 1 / 2, 2 / 3])


def test_episode_accumulation_equals_label_maps():
    rng = np.random.default_rng(0)
    cm_maps, eps = ConfusionMatrix(3), []
    for i in range(6):
        cls = 1 + i % 2
        gt = rng.random((8, 8)) < 0.3
        pred = rng.random((8, 8)) < 0.3
        cm_maps.update(gt * cls, pred * cls)
        tp, fp, fn, tn = episode_counts(gt, pred)
        eps.append({"cls": ["a", "b"][cls - 1], "tp": tp, "fp": fp, "fn": fn, "tn": tn})
    s = dataset_scores("ds", ["a", "b"], eps)
    assert s.miou == pytest.approx(cm_maps.miou())
    assert s.fbiou == pytest.approx(cm_maps.fbiou())
    assert s.class_iou["b"] == pytest.approx(cm_maps.iou()[2])


def test_defect_free_queries_only_feed_fp_rate():
    eps = [{"cls": "a", "tp": 5, "fp": 5, "fn": 0, "tn": 90},
           {"cls": "a", "tp": 0, "fp": 10, "fn": 0, "tn": 90, "defect_free": True}]
    s = dataset_scores("ds", ["a"], eps)
    assert s.class_iou["a"] == pytest.approx(0.5)
    assert s.fp_rate == pytest.approx(0.1)
    assert s.episodes == 1 and s.defect_free == 1


def test_benchmark_mean_is_over_classes_not_datasets():
    a = dataset_scores("A", ["x"], [{"cls": "x", "tp": 1, "fp": 0, "fn": 0, "tn": 1}])
    b = dataset_scores("B", ["y", "z"], [{"cls": "y", "tp": 0, "fp": 1, "fn": 0, "tn": 1},
                                         {"cls": "z", "tp": 0, "fp": 1, "fn": 0, "tn": 1}])
    m = benchmark_mean([a, b])
    assert m["class_mean_miou"] == pytest.approx(1 / 3)
    assert m["dataset_mean_miou"] == pytest.approx(0.5)

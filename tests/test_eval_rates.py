"""ROC and TPR@FPR on score sets whose curve is known by construction, and against a brute-force reference."""

import math

import numpy as np
import pytest

from facescale.eval.rates import FPR_TARGETS, compute_roc, format_fpr, pair_scores, tpr_at_fpr


def known_scores():
    """1e6 impostor scores on a grid and 1000 genuine scores placed between grid points.

    With negatives at (j + 0.5) / N, the K-th highest negative is s_K = 1 - (K - 0.5) / N and FPR = K / N is first
    reached at threshold s_K. Genuine groups sit just above s_K for K = 1, 10, ..., 1e5, so TPR at FPR 1e-6 ... 1e-1
    is 50 %, 60 %, 70 %, 80 %, 90 %, 95 %. Five genuine scores of each later group sit just *below* the previous
    target's s_K: they form the vertical segment at that FPR, which the IJB convention (first point at the closest
    FPR) must not count there.
    """
    n = 1_000_000
    neg = (np.arange(n) + 0.5) / n
    pos = [np.full(500, 1.0)]  # above every impostor: TPR 50 % at FPR 1e-6 (K = 1)
    expected = {1e-6: 0.5}
    for k, share in zip((10, 100, 1000, 10_000, 100_000), (0.6, 0.7, 0.8, 0.9, 0.95)):
        s_k = 1 - (k - 0.5) / n
        s_prev = 1 - (k / 10 - 0.5) / n
        count = int(round(1000 * (share - sum(len(p) for p in pos) / 1000)))
        pos.append(np.linspace(s_k + 0.1 / n, s_prev - 0.1 / n, count - 5))  # above s_K: counted at FPR = K/N
        pos.append(np.full(5, s_prev - 0.1 / n))  # counted at the previous target already
        expected[k / n] = share
    pos.append(np.full(1000 - sum(len(p) for p in pos), 0.0))  # below every impostor
    genuine = np.concatenate(pos)
    assert len(genuine) == 1000
    return np.r_[genuine, neg], np.r_[np.ones(len(genuine), bool), np.zeros(n, bool)], expected


def test_tpr_at_fpr_known_by_construction():
    scores, labels, expected = known_scores()
    roc = compute_roc(scores, labels)
    assert (roc.num_pos, roc.num_neg) == (1000, 1_000_000)
    got = tpr_at_fpr(roc, FPR_TARGETS)
    for target, tpr in expected.items():
        assert got[target]["fpr"] == pytest.approx(target, rel=1e-9)
        assert got[target]["tpr"] == pytest.approx(tpr, abs=1e-12), format_fpr(target)


def test_vertical_segment_reports_its_first_point():
    # Negatives 0.1..0.9; genuine 0.95, and 0.55 just below the 0.6 impostor: FPR = 4/9 is reached at 0.6 with
    # TPR 1/3, and stays 4/9 down to 0.55 where TPR is 2/3. The IJB convention reports the first: 1/3.
    scores = np.array([0.95, 0.55, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], bool)
    res = tpr_at_fpr(compute_roc(scores, labels), [4 / 9])
    assert res[4 / 9]["tpr"] == pytest.approx(1 / 3)
    assert res[4 / 9]["threshold"] == pytest.approx(0.6)


def brute_force_tpr_at_fpr(scores, labels, target):
    """Independent reference: every distinct threshold from high to low, counted directly, closest FPR first."""
    best = None
    for t in [math.inf, *sorted(set(scores.tolist()), reverse=True)]:
        fpr = sum(1 for s, y in zip(scores, labels) if s >= t and not y) / sum(1 for y in labels if not y)
        tpr = sum(1 for s, y in zip(scores, labels) if s >= t and y) / sum(1 for y in labels if y)
        if best is None or abs(fpr - target) < best[0]:
            best = (abs(fpr - target), tpr)
    return best[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(np.where(labels, rng.normal(0.6, 0.2, 300), rng.normal(0.2, 0.2, 300)), 2)  # many ties
    got = tpr_at_fpr(compute_roc(scores, labels), [0.01, 0.05, 0.1, 0.3])
    for target in (0.01, 0.05, 0.1, 0.3):
        assert got[target]["tpr"] == pytest.approx(brute_force_tpr_at_fpr(scores, labels, target), abs=1e-12)


def brute_force_roc(scores, labels):
    """Independent reference curve: at +inf and at every distinct score from high to low, counted directly."""
    thresholds = [math.inf, *sorted(set(scores.tolist()), reverse=True)]
    neg, pos = int((~labels).sum()), int(labels.sum())
    fpr = [sum(1 for s, y in zip(scores, labels) if s >= t and not y) / neg for t in thresholds]
    tpr = [sum(1 for s, y in zip(scores, labels) if s >= t and y) / pos for t in thresholds]
    return np.array(fpr), np.array(tpr), np.array(thresholds)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_roc_points_equal_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(400) < 0.25
    scores = np.round(np.where(labels, rng.normal(0.5, 0.3, 400), rng.normal(0.1, 0.3, 400)), 1)  # heavy ties
    scores[:4] = [0.0, -0.0, 0.0, -0.0]  # -0.0 == 0.0: one threshold, not two
    roc = compute_roc(scores, labels)
    fpr, tpr, thresholds = brute_force_roc(scores, labels)
    assert len(roc.thresholds) == len(set(scores.tolist())) + 1
    np.testing.assert_array_equal(roc.fpr, fpr)  # exact: the same integer counts over the same totals
    np.testing.assert_array_equal(roc.tpr, tpr)
    np.testing.assert_array_equal(roc.thresholds, thresholds)


def test_roc_shape_and_unmeasurable_targets():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(50, bool), np.zeros(500, bool)]
    roc = compute_roc(rng.normal(size=550), labels)
    assert roc.fpr[0] == 0 and roc.tpr[0] == 0 and roc.fpr[-1] == 1 and roc.tpr[-1] == 1
    assert np.all(np.diff(roc.fpr) >= 0) and np.all(np.diff(roc.tpr) >= 0)
    res = tpr_at_fpr(roc, [1e-3, 1e-2])  # 500 impostors cannot measure FPR 1e-3
    assert math.isnan(res[1e-3]["tpr"]) and not math.isnan(res[1e-2]["tpr"])


def test_bad_scores():
    with pytest.raises(ValueError, match="positive and negative"):
        compute_roc(np.array([0.1, 0.2]), np.array([True, True]))
    with pytest.raises(ValueError, match="not finite"):
        compute_roc(np.array([0.1, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        compute_roc(np.zeros(3), np.array([True, False]))


def test_pair_scores_are_cosines_in_chunks():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(70, 8)), rng.normal(size=(70, 8))
    expected = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(pair_scores(a, b, chunk=16), expected, atol=1e-12)


def test_format_fpr():
    assert [format_fpr(t) for t in FPR_TARGETS] == ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]

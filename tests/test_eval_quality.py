"""Embedding norm as quality: rejecting low-norm pairs removes exactly the planted errors."""

import math

import numpy as np
import pytest
import torch

from facescale.eval.quality import accuracy_vs_rejection, pair_quality
from facescale.eval.verification import compute_embeddings, evaluate


def test_rejecting_low_quality_pairs_removes_planted_errors():
    rng = np.random.default_rng(0)
    n = 400
    issame = np.arange(n) % 2 == 0
    a = rng.normal(size=(n, 64))
    b = np.where(issame[:, None], a + 0.05 * rng.normal(size=(n, 64)), rng.normal(size=(n, 64)))
    wrong = rng.choice(n, 40, replace=False)  # 10 % of pairs swapped to the wrong side...
    b[wrong] = np.where(issame[wrong, None], rng.normal(size=(40, 64)), a[wrong])
    norms = np.full(2 * n, 10.0)
    norms[2 * wrong + 1] = 1.0  # ...and their second image has a low norm (low quality)
    emb = np.empty((2 * n, 64))
    emb[0::2], emb[1::2] = a, b
    rows = accuracy_vs_rejection(emb, issame, norms, fractions=(0.0, 0.05, 0.1, 0.2))
    assert [r["num_pairs"] for r in rows] == [400, 380, 360, 320]
    assert rows[0]["accuracy_mean"] == pytest.approx(evaluate(emb, issame)["accuracy_mean"])  # 0 % = the table
    assert rows[0]["accuracy_mean"] == pytest.approx(0.9, abs=0.01)
    assert rows[1]["accuracy_mean"] > rows[0]["accuracy_mean"]
    assert rows[2]["accuracy_mean"] == pytest.approx(1.0) and rows[3]["accuracy_mean"] == pytest.approx(1.0)


def test_pair_quality_is_the_lower_norm_and_small_sets_are_nan():
    assert pair_quality(np.array([3.0, 1.0, 2.0, 5.0])).tolist() == [1.0, 2.0]
    emb = np.eye(4)[[0, 0, 1, 2] * 3]
    rows = accuracy_vs_rejection(emb, np.array([True, False] * 3), np.ones(12), fractions=(0.0,))
    assert rows[0]["num_pairs"] == 6 and math.isnan(rows[0]["accuracy_mean"])  # 6 pairs cannot make 10 folds
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        accuracy_vs_rejection(np.eye(4)[[0, 0] * 10], np.array([True, False] * 5), np.ones(20), fractions=(1.0,))


def test_compute_embeddings_returns_raw_norms():
    def model(x):  # norm of the output = 2 * mean of the red channel + 1 (the flip does not change it)
        return torch.stack([x[:, 0].mean((1, 2)) + 0.5, torch.full((len(x),), 0.0)], 1) * 2 + torch.tensor([0, 1.0])

    imgs = np.zeros((2, 112, 112, 3), np.uint8)
    imgs[1, ..., 0] = 255
    emb, norms = compute_embeddings(model, imgs, batch_size=1, return_norms=True)
    x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    expected = model(x).norm(dim=1).numpy()
    np.testing.assert_allclose(norms, expected, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)

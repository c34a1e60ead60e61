"""1:N identification on synthetic identities: rank-1 vs distractors and TPIR@FPIR against brute force."""

import math

import numpy as np
import pytest
import torch

import facescale.eval.identification as ident
from facescale.eval.identification import GaussianDistractors, array_chunks, distractor_maxima, identify


def identities(num_ids, dim, noise, seed):
    """Identity centres on the unit sphere and a function drawing noisy unit samples of them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def sample(ids):
        x = centres[ids] + noise * rng.normal(size=(len(ids), dim)) / np.sqrt(dim)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return sample


def synthetic_set(seed=0, dim=32, enrolled=40, non_mated=30, distractors=500, noise=1.2):
    sample = identities(enrolled + non_mated + distractors, dim, noise, seed)
    g_labels = np.arange(enrolled)
    p_labels = np.r_[np.arange(enrolled), np.arange(enrolled), np.arange(enrolled, enrolled + non_mated)]
    d_ids = np.arange(enrolled + non_mated, enrolled + non_mated + distractors)
    return sample(g_labels), g_labels, sample(p_labels), p_labels, sample(d_ids)


def brute_force(gallery, g_labels, probes, p_labels, distractors, n, fpir):
    """Loops over probes; full similarity rows; direct counting for every candidate threshold."""
    hits, tops_mated, tops_non = [], [], []
    for p, label in zip(probes, p_labels):
        g_scores = [float(np.dot(p, g)) for g in gallery]
        d_scores = [float(np.dot(p, d)) for d in distractors[:n]]
        others = [s for s, gl in zip(g_scores, g_labels) if gl != label] + d_scores
        if label in g_labels:
            mate = max(s for s, gl in zip(g_scores, g_labels) if gl == label)
            hits.append(mate > max(others, default=-math.inf))
            tops_mated.append(mate)
        else:
            tops_non.append(max(others))
    rank1 = float(np.mean(hits))
    best = None
    for t in sorted(set(tops_non + tops_mated + [math.inf])):
        if np.mean([s >= t for s in tops_non]) <= fpir:
            best = t
            break
    tpir = float(np.mean([h and m >= best for h, m in zip(hits, tops_mated)]))
    return rank1, tpir


def test_matches_brute_force_across_chunk_boundaries(monkeypatch):
    gallery, g_labels, probes, p_labels, distractors = synthetic_set()
    monkeypatch.setattr(ident, "_BLOCK_ELEMENTS", 110 * 7)  # 7 distractors per block, gallery in small slices
    res = identify(gallery, g_labels, probes, p_labels, array_chunks(distractors, chunk=33),
                   counts=(10, 100, 500), fpir_targets=(0.1, 0.2), progress=False)
    assert res.distractor_counts == [0, 10, 100, 500]
    assert (res.num_gallery, res.num_mated, res.num_non_mated) == (40, 80, 30)
    for n, rate in zip(res.distractor_counts, res.rank1):
        expected, _ = brute_force(gallery, g_labels, probes, p_labels, distractors, n, 0.1)
        assert rate == pytest.approx(expected, abs=1e-12), n
    for target in (0.1, 0.2):
        _, expected = brute_force(gallery, g_labels, probes, p_labels, distractors, 500, target)
        assert res.tpir[target] == pytest.approx(expected, abs=1e-12), target
    assert 0 < res.rank1[-1] < res.rank1[0]  # distractors make it harder, but not impossible


def test_rank1_falls_as_distractors_grow_and_stream_end_is_a_count():
    gallery, g_labels, probes, p_labels, distractors = synthetic_set(seed=1, distractors=2000, noise=1.0)
    res = identify(gallery, g_labels, probes, p_labels, array_chunks(distractors, chunk=256),
                   counts=(10, 100, 1000, 10_000), progress=False)
    assert res.distractor_counts == [0, 10, 100, 1000, 2000]  # 10_000 unreachable: the stream's end is reported
    assert all(a >= b for a, b in zip(res.rank1, res.rank1[1:]))
    assert res.rank1[0] > 0.7 and res.rank1[-1] < res.rank1[0] / 1.5


def test_perfect_probes_and_unmeasurable_fpir():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(5, 16))
    res = identify(gallery, np.arange(5), gallery.copy(), np.arange(5), array_chunks(rng.normal(size=(50, 16))),
                   counts=(50,), fpir_targets=(0.1,), progress=False)
    assert res.rank1 == [1.0, 1.0]  # a probe equal to its mate beats any other vector
    assert math.isnan(res.tpir[0.1])  # no non-mated probes: FPIR cannot be measured


def test_distractor_maxima_are_prefix_maxima():
    rng = np.random.default_rng(0)
    probes = rng.normal(size=(3, 8)).astype(np.float32)
    d = rng.normal(size=(37, 8)).astype(np.float32)
    counts, maxima = distractor_maxima(probes, array_chunks(d, chunk=5), [1, 12, 37], progress=False)
    assert counts == [1, 12, 37]
    unit = d / np.linalg.norm(d, axis=1, keepdims=True)  # distractors are normalised, probes taken as given
    for c, m in zip(counts, maxima):
        np.testing.assert_allclose(m, (probes @ unit[:c].T).max(axis=1), rtol=1e-5)


def test_no_mated_probe_is_an_error():
    with pytest.raises(ValueError, match="no probe has an identity in the gallery"):
        identify(np.eye(3), [0, 1, 2], np.eye(3), [5, 6, 7], progress=False)


def test_gaussian_distractors_follow_the_fitted_cone():
    rng = np.random.default_rng(0)
    direction = np.r_[1.0, np.zeros(31)]
    emb = direction + 0.3 * rng.normal(size=(400, 32))  # a cone around the first axis
    fitted = GaussianDistractors.fit(emb, seed=3)
    chunks = list(fitted.chunks(2500, chunk=1000))
    assert [len(c) for c in chunks] == [1000, 1000, 500]
    x = np.concatenate(chunks)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert x[:, 0].mean() == pytest.approx((emb[:, 0] / np.linalg.norm(emb, axis=1)).mean(), abs=0.03)
    np.testing.assert_array_equal(np.concatenate(list(fitted.chunks(2500, chunk=1000))), x)  # seeded per chunk
    iso = np.concatenate(list(GaussianDistractors(dim=32).chunks(2000)))
    assert abs(iso[:, 0].mean()) < 0.05  # uniform on the sphere: no preferred direction


def test_synthetic_mode_renders_and_embeds():
    from facescale.eval.synthetic import synthetic_identification

    torch.manual_seed(0)
    # A fixed random projection of downsampled pixels: no training needed, identities still differ.
    proj = torch.randn(3 * 28 * 28, 64)

    def model(x):
        return torch.nn.functional.avg_pool2d(x, 4).flatten(1) @ proj

    run = synthetic_identification(model, num_enrolled=8, num_non_mated=4, num_rendered_distractors=20,
                                   max_distractors=5000, difficulty=0.2, counts=(10, 1000, 5000),
                                   fpir_targets=(0.25,), progress=False)
    res = run.result
    assert res.distractor_counts == [0, 10, 1000, 5000]
    assert (res.num_gallery, res.num_mated, res.num_non_mated) == (8, 8, 4)
    assert (run.num_rendered_distractors, run.num_gaussian_distractors) == (20, 4980)
    assert all(a >= b for a, b in zip(res.rank1, res.rank1[1:]))
    assert res.rank1[0] > 0


def test_identification_folder_matches_identify_on_the_same_embeddings(tmp_path):
    import simplejpeg

    from facescale.eval.images import ImageFolderError, read_aligned_image
    from facescale.eval.suite import run_identification_folder
    from facescale.eval.synthetic import render_faces
    from facescale.eval.verification import compute_embeddings

    faces = render_faces(list(range(9)) + list(range(5)), [0] * 9 + [1] * 5, seed=2, difficulty=0.2,
                         total_identities=9)
    layout = [("gallery/id0", 0), ("gallery/id1", 1), ("gallery/id2", 2), ("probes/id0", 9), ("probes/id1", 10),
              ("probes/id2", 11), ("probes/stranger", 12), ("distractors", 3), ("distractors/more", 4),
              ("distractors", 5), ("distractors", 6)]
    for k, (folder, i) in enumerate(layout):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / f"{k}.jpg").write_bytes(simplejpeg.encode_jpeg(faces[i], quality=95))
    torch.manual_seed(0)
    proj = torch.randn(3 * 28 * 28, 32)

    def model(x):
        return torch.nn.functional.avg_pool2d(x, 4).flatten(1) @ proj

    rep = run_identification_folder(model, tmp_path, counts=(2, 10))
    assert rep.composition == {"gallery_images": 3, "gallery_identities": 3, "probe_images": 4,
                               "distractor_images": 4}
    assert rep.result.distractor_counts == [0, 2, 4] and (rep.result.num_mated, rep.result.num_non_mated) == (3, 1)

    def embed(paths):
        return compute_embeddings(model, np.stack([read_aligned_image(tmp_path / p) for p in paths]))

    gallery = embed(["gallery/id0/0.jpg", "gallery/id1/1.jpg", "gallery/id2/2.jpg"])
    probes = embed(["probes/id0/3.jpg", "probes/id1/4.jpg", "probes/id2/5.jpg", "probes/stranger/6.jpg"])
    distractors = embed(["distractors/10.jpg", "distractors/7.jpg", "distractors/9.jpg", "distractors/more/8.jpg"])
    direct = identify(gallery, [0, 1, 2], probes, [0, 1, 2, -1], array_chunks(distractors), counts=(2, 10),
                      progress=False)
    assert rep.result.rank1 == direct.rank1

    (tmp_path / "probes" / "stranger" / "6.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageFolderError, match="cannot decode image .*6.jpg"):
        run_identification_folder(model, tmp_path)

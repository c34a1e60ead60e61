"""IJB-style template pooling and meta files: brute-force pooling, bad lines named by file and line."""

import numpy as np
import pytest

from facescale.eval.ijb import (
    MetaFileError,
    pool_templates,
    read_template_media,
    read_template_pairs,
    template_pair_scores,
)


def brute_force_templates(emb, templates, media):
    """Loops: mean per (template, media), sum per template, normalise."""
    out = {}
    for t in sorted(set(templates.tolist())):
        total = np.zeros(emb.shape[1])
        for m in sorted(set(media[templates == t].tolist())):
            rows = [i for i in range(len(emb)) if templates[i] == t and media[i] == m]
            total += np.mean([emb[i] for i in rows], axis=0)
        out[t] = total / np.linalg.norm(total)
    return out


def test_pooling_matches_brute_force():
    rng = np.random.default_rng(0)
    n = 200
    templates = rng.integers(100, 120, n)
    media = rng.integers(0, 6, n)  # media ids repeat across templates: pooled per (template, media)
    emb = rng.normal(size=(n, 16))
    ids, feats = pool_templates(emb, templates, media)
    expected = brute_force_templates(emb, templates, media)
    assert ids.tolist() == sorted(expected)
    for t, f in zip(ids, feats):
        np.testing.assert_allclose(f, expected[t], atol=1e-6)


def test_media_mean_before_template_sum():
    # Template 1: one media with 3 frames along x, one still along y -> equal weight per media, not per image.
    emb = np.array([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    ids, feats = pool_templates(emb, np.array([1, 1, 1, 1]), np.array([7, 7, 7, 8]))
    np.testing.assert_allclose(feats[0], [np.sqrt(0.5), np.sqrt(0.5), 0], atol=1e-6)


def write(path, text):
    path.write_text(text)
    return path


def test_meta_files_and_scores(tmp_path):
    meta = read_template_media(write(tmp_path / "tid_mid.txt", "# image template media\na.jpg 1 10\n"
                                     "b.jpg 1 11\n\nc.jpg 2 12\nd.jpg 3 13\n"))
    assert meta.images == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    pairs = read_template_pairs(write(tmp_path / "pairs.txt", "1 2 1\n1 3 0\n"), meta)
    assert pairs.labels.tolist() == [True, False]
    emb = np.array([[1.0, 0], [1.0, 0], [1.0, 0], [0, 1.0]])
    ids, feats = pool_templates(emb, meta.templates, meta.media)
    np.testing.assert_allclose(template_pair_scores(ids, feats, pairs), [1.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("name, text, match", [
    ("tid_mid.txt", "a.jpg 1 10\nb.jpg 1\n", r"tid_mid.txt:2: expected 'image template media'"),
    ("tid_mid.txt", "a.jpg 1 10\nb.jpg one 10\n", r"tid_mid.txt:2: template 'one' is not an integer"),
    ("tid_mid.txt", "# only a comment\n", r"tid_mid.txt: no entries"),
])
def test_bad_image_list(tmp_path, name, text, match):
    with pytest.raises(MetaFileError, match=match):
        read_template_media(write(tmp_path / name, text))


@pytest.mark.parametrize("text, match", [
    ("1 2 1\n1 9 0\n", r"pairs.txt:2: template 9 is not in .*tid_mid.txt"),
    ("1 2 1\n\n1 2 2\n", r"pairs.txt:3: label must be 0 or 1"),
    ("1 2\n", r"pairs.txt:1: expected 'template1 template2 label'"),
])
def test_bad_pairs_name_file_and_line(tmp_path, text, match):
    meta = read_template_media(write(tmp_path / "tid_mid.txt", "a.jpg 1 10\nb.jpg 2 11\n"))
    with pytest.raises(MetaFileError, match=match):
        read_template_pairs(write(tmp_path / "pairs.txt", text), meta)


def test_missing_meta_file(tmp_path):
    with pytest.raises(MetaFileError, match="meta file not found: .*nope.txt"):
        read_template_media(tmp_path / "nope.txt")

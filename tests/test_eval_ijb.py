"""IJB-style template pooling and meta files: brute-force pooling, bad lines named by file and line; the four
weightings (none / norm / detector / both) on a hand-built layout, end to end through run_ijb and `facescale eval`."""

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from facescale.checkpoint.format import TrainCheckpoint, TrainProgress
from facescale.cli import main
from facescale.eval.ijb import (
    MetaFileError,
    pool_templates,
    read_detector_scores,
    read_template_media,
    read_template_pairs,
    scores_for_images,
    template_pair_scores,
    weight_features,
)
from facescale.eval.report import format_report, report_dict
from facescale.eval.suite import run_ijb
from facescale.models import build_backbone


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


# A hand-built IJB layout. Image features f (3-d), detector scores s; template 1 has two media (A, B).
#   A  template 1, media 10   f = (100, 0, 0)  s = 0.1
#   B  template 1, media 11   f = (0, 10, 0)   s = 0.9
#   C  template 2, media 12   f = (0, 50, 0)   s = 1.0
#   D  template 3, media 13   f = (50, 0, 0)   s = 0.5
# Pairs: (1, 2) genuine, (1, 3) and (2, 3) impostor. T2 and T3 are unit x/y whatever the weighting, so the scores
# of template 1 against them are its normalised y and x components:
#   none      A -> (1,0,0),    B -> (0,1,0)      T1 ~ (1, 1)    scores 1/sqrt2,  1/sqrt2
#   norm      A -> (100,0,0),  B -> (0,10,0)     T1 ~ (10, 1)   scores 1/sqrt101, 10/sqrt101
#   detector  A -> (0.1,0,0),  B -> (0,0.9,0)    T1 ~ (1, 9)    scores 9/sqrt82,  1/sqrt82
#   both      A -> (10,0,0),   B -> (0,9,0)      T1 ~ (10, 9)   scores 9/sqrt181, 10/sqrt181
# (T2, T3) scores 0 in every weighting.
FEATURES = np.array([[100.0, 0, 0], [0, 10, 0], [0, 50, 0], [50, 0, 0]])
DETECTOR = np.array([0.1, 0.9, 1.0, 0.5])
EXPECTED = {  # pair scores (1,2), (1,3), (2,3)
    "none": [1 / np.sqrt(2), 1 / np.sqrt(2), 0.0],
    "norm": [1 / np.sqrt(101), 10 / np.sqrt(101), 0.0],
    "detector": [9 / np.sqrt(82), 1 / np.sqrt(82), 0.0],
    "both": [9 / np.sqrt(181), 10 / np.sqrt(181), 0.0],
}
EXPECTED_T1 = {"none": [1, 1], "norm": [10, 1], "detector": [1, 9], "both": [10, 9]}


def ijb_layout(root):
    """The layout above on disk: uniform PNG crops whose pixel value is f + 100, meta, pairs and a 5pts file."""
    images = root / "images"
    images.mkdir()
    names = ["A.png", "B.png", "C.png", "D.png"]
    for name, f in zip(names, FEATURES):
        Image.fromarray(np.full((112, 112, 3), f + 100, np.uint8)).save(images / name)
    meta = write(root / "ijbc_face_tid_mid.txt", "A.png 1 10\nB.png 1 11\nC.png 2 12\nD.png 3 13\n")
    pairs = write(root / "ijbc_template_pair_label.txt", "1 2 1\n1 3 0\n2 3 0\n")
    lmk = "38.3 51.7 73.5 51.5 56.0 71.7 41.5 92.4 70.7 92.2"  # 5 landmarks: read past, not used
    # InsightFace's order is the image list's; here it is shuffled: scores are matched by name.
    scores = write(root / "ijbc_name_5pts_score.txt",
                   "".join(f"{names[i]} {lmk} {DETECTOR[i]}\n" for i in (2, 0, 3, 1)))
    return meta, pairs, images, scores


class CornerPixel(torch.nn.Module):
    """A stand-in backbone with a known output: the top-left pixel minus 100 (normalised input undone)."""

    def forward(self, x):
        return x[:, :, 0, 0] * 127.5 + 127.5 - 100.0


def test_four_weightings_hand_computed():
    templates, media = np.array([1, 1, 2, 3]), np.array([10, 11, 12, 13])
    pairs_t1, pairs_t2 = np.array([1, 1, 2]), np.array([2, 3, 3])
    for weighting, expected in EXPECTED.items():
        weighted = weight_features(2 * FEATURES, weighting, DETECTOR)  # a flip sum doubles a symmetric image
        ids, feats = pool_templates(weighted, templates, media)
        t1 = np.array(EXPECTED_T1[weighting] + [0.0])
        np.testing.assert_allclose(feats[0], t1 / np.linalg.norm(t1), atol=1e-6, err_msg=weighting)
        scores = np.sum(feats[np.searchsorted(ids, pairs_t1)] * feats[np.searchsorted(ids, pairs_t2)], axis=1)
        np.testing.assert_allclose(scores, expected, atol=1e-6, err_msg=weighting)
    with pytest.raises(ValueError, match="needs detector scores"):
        weight_features(FEATURES, "both")


def test_run_ijb_each_weighting_and_the_report_names_it(tmp_path):
    meta, pairs, images, scores = ijb_layout(tmp_path)
    seen = set()
    for weighting, expected in EXPECTED.items():
        rep = run_ijb(CornerPixel(), meta, pairs, images, weighting=weighting, scores_path=scores)
        # The ROC's thresholds are the distinct pair scores: the hand-computed ones, and nothing else.
        np.testing.assert_allclose(np.sort(rep.roc.thresholds[1:]), np.unique(np.round(expected, 12)), atol=1e-5)
        assert rep.weighting == weighting and rep.num_templates == 3
        text = format_report(rep)
        assert f"IJB weighting: {weighting} (" in text
        assert (str(scores) in text) == (weighting in ("detector", "both"))
        assert report_dict(rep)["weighting"] == weighting
        seen.add(tuple(np.round(np.sort(rep.roc.thresholds[1:]), 6)))
    assert len(seen) == 4, "the four weightings give four different sets of scores"
    with pytest.raises(MetaFileError, match=r"IJB weighting .both. multiplies .*\(--ijb-scores"):
        run_ijb(CornerPixel(), meta, pairs, images)  # default: both, which needs the scores


def test_detector_scores_file(tmp_path):
    meta = read_template_media(write(tmp_path / "tid_mid.txt", "a.jpg 1 10\nb.jpg 1 11\n\nc.jpg 2 12\n"))
    scores = read_detector_scores(write(tmp_path / "s.txt", "b.jpg 0.25\n# comment\n" + "c.jpg " + "1 " * 10
                                        + "0.5\na.jpg 0.75\nextra.jpg 0.1\n"))
    np.testing.assert_allclose(scores_for_images(scores, meta), [0.75, 0.25, 0.5])
    short = read_detector_scores(write(tmp_path / "short.txt", "a.jpg 1\nc.jpg 1\n"))
    with pytest.raises(MetaFileError, match=r"tid_mid.txt:2: image 'b.jpg' has no detector score in .*short.txt"):
        scores_for_images(short, meta)


@pytest.mark.parametrize("text, match", [
    ("a.jpg 0.9\n" + "b.jpg" + " 1" * 10 + "\n", r"s.txt:2: the detector score column is missing: 11 fields"),
    ("a.jpg\n", r"s.txt:1: the detector score column is missing: 1 fields"),
    ("a.jpg 1 2 3\n", r"s.txt:1: expected 'image x1 y1 ... x5 y5 score' \(12 fields\) or 'image score', got 4"),
    ("a.jpg 0.9\n\nb.jpg high\n", r"s.txt:3: detector score 'high' is not a number"),
    ("a.jpg -0.5\n", r"s.txt:1: detector score '-0.5' must be a finite number >= 0"),
    ("a.jpg nan\n", r"s.txt:1: detector score 'nan' must be a finite number >= 0"),
    ("a.jpg 0.9\na.jpg 0.8\n", r"s.txt:2: image 'a.jpg' already has a score on line 1"),
])
def test_bad_detector_scores_name_file_and_line(tmp_path, text, match):
    with pytest.raises(MetaFileError, match=match):
        read_detector_scores(write(tmp_path / "s.txt", text))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    arch = {"backbone": "iresnet_tiny", "embedding_size": 64}
    torch.manual_seed(0)
    model = build_backbone(arch["backbone"], arch["embedding_size"]).eval()
    path = tmp_path_factory.mktemp("ijb_ckpt") / "ckpt"
    TrainCheckpoint(model, torch.nn.Linear(64, 2), {}, TrainProgress(), arch=arch).save(path, rank=0)
    return path


def test_eval_cli_names_the_weighting_in_report_and_mlflow(tmp_path, checkpoint, capsys):
    meta, pairs, images, scores = ijb_layout(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    rc = main(["eval", "--model", str(checkpoint), "--ijb-meta", str(meta), "--ijb-pairs", str(pairs),
               "--ijb-images", str(images), "--ijb-scores", str(scores), "--ijb-weighting", "detector",
               "--out", str(tmp_path / "out"), "--tracking-uri", uri, "--artifact-root", str(tmp_path / "art")])
    printed = capsys.readouterr().out
    assert rc == 0 and "IJB weighting: detector (unit-norm image features weighted by the detector score" in printed
    (ijb,) = json.loads((tmp_path / "out" / "report.json").read_text())["sets"]
    assert ijb["weighting"] == "detector" and ijb["detector_scores"] == str(scores)
    assert "IJB weighting: detector" in (tmp_path / "out" / "report.txt").read_text()
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("facescale-eval").experiment_id])
    assert run.data.params["ijb_weighting"] == "detector" and run.data.params["ijb_scores"] == str(scores)
    assert run.data.tags["facescale.ijb_weighting"] == "detector"


def test_eval_cli_weighting_errors_exit_2_before_the_model(tmp_path, checkpoint, capsys):
    meta, pairs, images, scores = ijb_layout(tmp_path)
    base = ["eval", "--model", str(checkpoint), "--no-mlflow", "--out", str(tmp_path / "o"), "--ijb-meta", str(meta),
            "--ijb-pairs", str(pairs), "--ijb-images", str(images)]
    assert main(base) == 2 and "--ijb-scores" in capsys.readouterr().err  # default both needs the scores
    bad = write(tmp_path / "bad_scores.txt", "A.png 0.5\nB.png" + " 1" * 10 + "\n")
    assert main([*base, "--ijb-scores", str(bad)]) == 2
    assert "bad_scores.txt:2: the detector score column is missing" in capsys.readouterr().err
    assert main([*base, "--ijb-scores", str(bad), "--ijb-weighting", "norm"]) == 0  # norm reads no scores

"""PFE evaluation: MLS and template fusion against hand computations, MLS verification on a planted set where
uncertainty matters, IJB fusion, and `facescale eval --pfe` end to end (planted model and the real PFEModel)."""

import json
import pickle

import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn
from torch.nn import functional as F

from facescale.checkpoint.format import TrainCheckpoint, TrainProgress
from facescale.cli import main
from facescale.data.synth import synthesize
from facescale.eval import suite
from facescale.eval.pfe import (
    PfeModelError,
    evaluate_scores,
    fuse_template,
    fuse_templates,
    mls_score,
    pfe_features,
    run_bin_pfe,
    run_ijb_pfe,
    uncertainty,
)
from facescale.eval.verification import evaluate, load_bin
from facescale.models import build_backbone

DIM, ID_DIMS = 12, 8  # planted embeddings: dims 0-7 carry the identity, 8-11 are clean or, on corrupted faces, noise


# ---------------------------------------------------------------------------------------------------- the math


def test_mls_score_matches_hand_computation_numpy_and_torch():
    mu1 = np.array([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0]])
    mu2 = np.array([[0.0, 0.6, 0.8], [1.0, 0.0, 0.0]])
    s1 = np.array([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    s2 = np.array([[0.3, 0.2, 0.1], [0.5, 1.5, 0.5]])
    # pair 0: var = (0.4, 0.4, 0.4); diff^2 = (0.36, 0.04, 0.64) -> -(1.04 / 0.4 + 3 log 0.4)
    # pair 1: var = (1, 2, 1), diff 0 -> -(log 1 + log 2 + log 1) = -log 2
    expected = np.array([-(1.04 / 0.4 + 3 * np.log(0.4)), -np.log(2.0)])
    got = mls_score(mu1, s1, mu2, s2)
    assert isinstance(got, np.ndarray) and got.shape == (2,)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    t = mls_score(*(torch.tensor(a) for a in (mu1, s1, mu2, s2)))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    np.testing.assert_allclose(t.numpy(), expected, rtol=1e-12)
    # symmetric in its two faces
    np.testing.assert_allclose(mls_score(mu2, s2, mu1, s1), expected, rtol=1e-12)


def test_mls_score_rejects_bad_shapes_and_mixed_inputs():
    a = np.ones((3, 4))
    with pytest.raises(ValueError, match=r"\[N, D\].*\(3, 4\), \(3, 4\), \(3, 5\), \(3, 4\)"):
        mls_score(a, a, np.ones((3, 5)), a)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        mls_score(np.ones(4), np.ones(4), np.ones(4), np.ones(4))
    with pytest.raises(TypeError, match="all torch tensors or all numpy arrays"):
        mls_score(torch.ones(3, 4), a, a, a)


def test_mls_score_gradient_gradcheck_and_closed_form():
    gen = torch.Generator().manual_seed(0)
    mu1, mu2 = (torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    s1, s2 = (torch.rand(5, 6, generator=gen, dtype=torch.float64).add(0.2).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(mls_score, (mu1, s1, mu2, s2))
    mls_score(mu1, s1, mu2, s2).sum().backward()
    var, diff = (s1 + s2).detach(), (mu1 - mu2).detach()
    # d/dmu1 = -2 (mu1 - mu2) / var ; d/ds1 = (mu1 - mu2)^2 / var^2 - 1 / var  (and the same for s2)
    torch.testing.assert_close(mu1.grad, -2 * diff / var)
    torch.testing.assert_close(mu2.grad, 2 * diff / var)
    torch.testing.assert_close(s1.grad, diff**2 / var**2 - 1 / var)
    torch.testing.assert_close(s2.grad, s1.grad)


def test_fuse_template_matches_hand_computation():
    mu = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    s = np.array([[1.0, 4.0], [1.0, 1.0], [2.0, 4.0]])
    # dim 0: precisions (1, 1, 0.5) / 2.5 -> (0.4, 0.4, 0.2): 0.4 + 0 + 0.12 = 0.52
    # dim 1: precisions (0.25, 1, 0.25) / 1.5 -> (1/6, 2/3, 1/6): 0 + 2/3 + 0.8/6 = 0.8
    raw = np.array([0.52, 0.8])
    mu_f, s_f = fuse_template(mu, s)
    np.testing.assert_allclose(mu_f, raw / np.linalg.norm(raw), rtol=1e-12)
    np.testing.assert_allclose(s_f, [1.0, 1.0])
    tm, ts = fuse_template(torch.tensor(mu), torch.tensor(s))
    np.testing.assert_allclose(tm.numpy(), mu_f, rtol=1e-12)
    np.testing.assert_allclose(ts.numpy(), s_f)
    # one face: its own (normalised) mean and variance
    one_mu, one_s = fuse_template(np.array([[3.0, 4.0]]), np.array([[0.5, 0.7]]))
    np.testing.assert_allclose(one_mu, [0.6, 0.8])
    np.testing.assert_allclose(one_s, [0.5, 0.7])
    # a very uncertain face hardly moves the fused mean
    m2, _ = fuse_template(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1e-3, 1e-3], [1e3, 1e3]]))
    assert m2[0] > 0.999999
    # differentiable in torch
    tmu = torch.tensor(mu, requires_grad=True)
    fuse_template(tmu, torch.tensor(s))[0].sum().backward()
    assert tmu.grad is not None and torch.isfinite(tmu.grad).all()
    with pytest.raises(ValueError, match=r"\[K, D\] with K >= 1, got \(3, 2\) and \(3, 3\)"):
        fuse_template(mu, np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"got \(0, 2\)"):
        fuse_template(np.ones((0, 2)), np.ones((0, 2)))


def test_uncertainty_is_the_harmonic_mean():
    np.testing.assert_allclose(uncertainty(np.array([[1.0, 4.0, 4.0], [2.0, 2.0, 2.0]])), [2.0, 2.0])


def _brute_force_fold_accuracies(scores, labels, nfolds=10):
    """Every cut between distinct training scores (and above/below all), best on the other folds, highest on ties."""
    accs = []
    for test in np.array_split(np.arange(len(labels)), nfolds):
        train = np.setdiff1d(np.arange(len(labels)), test)
        u = np.unique(scores[train])
        cuts = np.concatenate([[np.inf], (u[1:] + u[:-1])[::-1] / 2, [-np.inf]])  # highest cut first
        train_acc = [np.mean((scores[train] > c) == labels[train]) for c in cuts]
        best = cuts[int(np.argmax(train_acc))]
        accs.append(np.mean((scores[test] > best) == labels[test]))
    return accs


def test_evaluate_scores_equals_brute_force():
    rng = np.random.default_rng(3)
    labels = rng.random(203) < 0.5
    scores = np.round(rng.normal(size=203) + 1.2 * labels, 1)  # rounded: many ties between scores
    res = evaluate_scores(scores, labels)
    np.testing.assert_allclose(res["fold_accuracies"], _brute_force_fold_accuracies(scores, labels))
    assert res["num_pairs"] == 203 and 0.6 < res["accuracy_mean"] < 0.9
    # invariant to an increasing map of the scores (e.g. the paper's 1/2 factor and constant)
    np.testing.assert_allclose(evaluate_scores(0.5 * scores - 7, labels)["fold_accuracies"], res["fold_accuracies"])
    with pytest.raises(ValueError, match="not finite"):
        evaluate_scores(np.array([np.nan] * 20), labels[:20])


# ------------------------------------------------------------------------------------- a planted PFE "model"


class PixelPFE(nn.Module):
    """Reads a planted Gaussian embedding from pixels: row d of channel 0 is raw embedding dimension d, row d of
    channel 1 is log sigma^2 / 6. The left half of channel 2 adds a little of both, so flipping matters on
    images where channel 2 is not constant (the planted faces keep it constant: flip-invariant)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * (x[:, 0, :DIM, :].mean(2) + 0.1 * x[:, 2, :DIM, :56].mean(2))

    def forward_pfe(self, x):
        log_sigma_sq = 6 * x[:, 1, :DIM, :].mean(2) + 0.5 * x[:, 2, :DIM, :56].mean(2)
        return F.normalize(self(x), dim=1), log_sigma_sq.exp()


def _pixels(values):
    return np.clip(np.round(127.5 + 127.5 * np.asarray(values)), 0, 255).astype(np.uint8)


def planted_faces(num_pairs=120, seed=0, corrupt_p=0.25):
    """Pairs of faces: identity codes in dims 0-7; a corrupted face has strong noise in dims 8-11 and says so with
    sigma^2 = 1 there (clean dimensions: sigma^2 = e^-4.8). Cosine is misled by the noise, MLS discounts it."""
    rng = np.random.default_rng(seed)
    noisy = DIM - ID_DIMS
    codes = rng.normal(size=(2 * num_pairs, ID_DIMS))
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    issame = np.arange(num_pairs) % 2 == 0
    images, corrupted = [], []
    for p in range(num_pairs):
        for side in range(2):
            code = codes[2 * p] if (side == 0 or issame[p]) else codes[2 * p + 1]
            bad = rng.random() < corrupt_p
            noise = rng.normal(0, 0.6 if bad else 0.03, noisy)
            raw = np.concatenate([0.5 * code + rng.normal(0, 0.03, ID_DIMS), noise])
            log_s = np.where(np.arange(DIM) >= ID_DIMS, 0.0 if bad else -0.8, -0.8)  # log sigma^2 = 6 * value
            img = np.full((112, 112, 3), 128, np.uint8)
            img[:DIM, :, 0] = _pixels(raw)[:, None]
            img[:DIM, :, 1] = _pixels(log_s)[:, None]
            images.append(img)
            corrupted.append(bad)
    return np.stack(images), issame, np.array(corrupted)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("pfe")
    images, issame, corrupted = planted_faces()
    with open(root / "planted.bin", "wb") as f:
        pickle.dump((list(images), list(issame)), f)  # decoded uint8 arrays: no JPEG loss on the planted pixels
    return {"root": root, "bin": root / "planted.bin", "images": images, "issame": issame, "corrupted": corrupted,
            "report": run_bin_pfe(PixelPFE(), root / "planted.bin", batch_size=64)}


def save_mlflow_model(model, path):
    """A local MLflow model directory, as `facescale pfe` logs one (explicit requirements: no slow inference)."""
    mlflow.pytorch.save_model(model, str(path), serialization_format="pickle", pip_requirements=["torch"])
    return path


def test_flip_views_are_fused_as_a_template():
    model = PixelPFE().eval()
    images = np.random.default_rng(1).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    f = pfe_features(model, images, batch_size=2)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    with torch.no_grad():
        (mu_a, s_a), (mu_b, s_b) = model.forward_pfe(x), model.forward_pfe(torch.flip(x, dims=[3]))
    assert not torch.allclose(s_a, s_b)  # the flip does change this model's output
    for i in range(5):
        m, s = fuse_template(torch.stack([mu_a[i], mu_b[i]]).double(), torch.stack([s_a[i], s_b[i]]).double())
        np.testing.assert_allclose(f.mu[i], m.numpy(), atol=1e-6)
        np.testing.assert_allclose(f.sigma_sq[i], s.numpy(), rtol=1e-6)
    with torch.no_grad():
        emb = model(x) + model(torch.flip(x, dims=[3]))
    np.testing.assert_allclose(f.embeddings, F.normalize(emb).numpy(), atol=1e-6)


class _TwoCalls(nn.Module):
    """The same PFEModel behind only ``forward`` and ``forward_pfe``: the fallback path, two backbone runs per view."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)

    def forward_pfe(self, x):
        return self.model.forward_pfe(x)


def test_pfe_model_runs_its_backbone_once_per_view_with_the_same_numbers():
    from facescale.data.transforms import normalize_images
    from facescale.pfe.model import PFEModel, UncertaintyHead, backbone_shapes

    torch.manual_seed(0)
    backbone = build_backbone("iresnet_tiny", 32).eval()
    model = PFEModel(backbone, UncertaintyHead(*backbone_shapes(backbone))).eval()
    with torch.no_grad():
        model.head.scale.fill_(1.0)  # sigma^2 that varies between faces (the init scale 1e-4 makes it ~constant)
    images = np.random.default_rng(4).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    calls = []
    hook = model.backbone.register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))
    try:
        f = pfe_features(model, images, batch_size=3)
        assert calls == [3, 3, 2, 2]  # each batch and its flip: the backbone runs twice per image
        calls.clear()
        two = pfe_features(_TwoCalls(model), images, batch_size=3)
        assert calls == [3, 3, 3, 3, 2, 2, 2, 2]  # forward and forward_pfe on each view: four times
    finally:
        hook.remove()
    for name in ("flip_sums", "norms", "mu", "sigma_sq"):
        np.testing.assert_array_equal(getattr(f, name), getattr(two, name), err_msg=name)
    # And against the model's own methods, batch by batch (forward's raw embeddings; forward_pfe's Gaussians).
    for start in (0, 3):
        x = normalize_images(torch.from_numpy(images[start:start + 3]).permute(0, 3, 1, 2).contiguous(), "cpu")
        with torch.no_grad():
            (emb, mu, s), (emb_f, mu_f, s_f) = (model.forward_with_pfe(v) for v in (x, torch.flip(x, dims=[3])))
            assert torch.equal(emb, model(x)) and torch.equal(emb_f, model(torch.flip(x, dims=[3])))
            pair = model.forward_pfe(x)
            assert torch.equal(mu, pair[0]) and torch.equal(s, pair[1])
        assert not torch.allclose(s, s_f)  # the flip changes sigma^2: the fusion below is not trivial
        rows = slice(start, start + len(x))
        np.testing.assert_array_equal(f.flip_sums[rows], (emb + emb_f).numpy())


def test_mls_beats_cosine_and_uncertainty_beats_norm_on_planted_set(planted):
    rep = planted["report"]
    plain = suite.run_bin(PixelPFE(), planted["bin"], batch_size=64)
    # the existing numbers are those of run_bin, unchanged
    assert rep.verification["fold_accuracies"] == plain.verification["fold_accuracies"]
    assert rep.quality == plain.quality and rep.norm_mean == pytest.approx(plain.norm_mean)
    cos, mls = rep.verification["accuracy_mean"], rep.mls["accuracy_mean"]
    assert mls >= 0.95 and mls > cos + 0.05, (mls, cos)  # measured: 0.983 vs 0.908
    assert rep.mls_tpr_at_fpr[1e-1]["tpr"] > rep.tpr_at_fpr[1e-1]["tpr"] + 0.1  # measured: 1.00 vs 0.63
    # corrupted faces are the uncertain ones; their noise gives them *larger* norms, so norm rejection keeps them
    per_pair_bad = planted["corrupted"][0::2] | planted["corrupted"][1::2]
    row = {q["reject_fraction"]: q for q in rep.uncertainty_quality}[0.5]
    by_norm = {q["reject_fraction"]: q for q in rep.quality}[0.5]
    assert per_pair_bad.mean() > 0.3  # measured: 0.425 of the pairs have a corrupted face
    assert row["accuracy_mean"] > by_norm["accuracy_mean"] + 0.05, (row, by_norm)  # measured: 1.000 vs 0.900
    assert rep.uncertainty_quality[0]["accuracy_mean"] == pytest.approx(cos)  # 0 % rejected: the set's accuracy


def ijb_files(root, images, per_template=4):
    """An IJB-style set from planted images (PNG, lossless): consecutive images form templates of 2 media."""
    img_dir = root / "ijb_images"
    img_dir.mkdir(exist_ok=True)
    lines = []
    for i, img in enumerate(images):
        Image.fromarray(img).save(img_dir / f"{i}.png")
        lines.append(f"{i}.png {i // per_template} {i // 2}")
    (root / "tid_mid.txt").write_text("\n".join(lines) + "\n")
    n = len(images) // per_template
    pairs = [f"{a} {b} {int(a == b)}" for a in range(n) for b in range(n) if a <= b]
    (root / "pairs.txt").write_text("\n".join(pairs) + "\n")
    return root / "tid_mid.txt", root / "pairs.txt", img_dir


def test_ijb_templates_fused_and_scored_by_mls(planted, tmp_path):
    # one identity per template: image pairs (2p, 2p+1) of genuine .bin pairs, two pairs (4 images) per template
    genuine = np.flatnonzero(planted["issame"])[:12]
    images = planted["images"][np.stack([2 * genuine, 2 * genuine + 1], 1).ravel()]
    meta, pairs, img_dir = ijb_files(tmp_path, images, per_template=2)
    model = PixelPFE()
    rep = run_ijb_pfe(model, meta, pairs, img_dir, weighting="norm")
    plain = suite.run_ijb(model, meta, pairs, img_dir, weighting="norm")
    np.testing.assert_array_equal(rep.roc.tpr, plain.roc.tpr)
    np.testing.assert_array_equal(rep.roc.fpr, plain.roc.fpr)
    assert rep.num_templates == 12 and rep.mls_roc.num_pos == 12 and rep.mls_roc.num_neg == 66
    # templates fused exactly as fuse_template over their images
    f = pfe_features(model, images)
    ids, mu, s = fuse_templates(f.mu, f.sigma_sq, np.arange(24) // 2)
    m3, s3 = fuse_template(f.mu[6:8], f.sigma_sq[6:8])
    np.testing.assert_allclose(mu[3], m3)
    np.testing.assert_allclose(s[3], s3)
    assert list(ids) == list(range(12))
    # a template of one clean and one corrupted face: fusion keeps the clean face's noise-free dimensions
    bad = planted["corrupted"][np.stack([2 * genuine, 2 * genuine + 1], 1).ravel()].reshape(12, 2)
    t = int(np.flatnonzero(bad[:, 0] != bad[:, 1])[0])
    clean, noisy = 2 * t + int(bad[t, 0]), 2 * t + int(bad[t, 1])
    np.testing.assert_allclose(s[t], f.sigma_sq[clean], rtol=1e-6)
    # measured 0.14 vs 0.68 (a plain mean of the two would keep about half of the noise)
    assert np.linalg.norm(mu[t, ID_DIMS:]) < 0.3 * np.linalg.norm(f.mu[noisy, ID_DIMS:])
    assert np.trapezoid(rep.mls_roc.tpr, rep.mls_roc.fpr) > 0.99
    assert rep.mu_cosine_roc.num_neg == 66


# ------------------------------------------------------------------------------------------ the CLI end to end


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("plain") / "ckpt"
    arch = {"backbone": "iresnet_tiny", "embedding_size": 64}
    model = build_backbone(arch["backbone"], arch["embedding_size"])
    TrainCheckpoint(model, nn.Linear(64, 2), {}, TrainProgress(), arch=arch).save(ckpt, rank=0)
    return ckpt


def test_cli_pfe_needs_forward_pfe(planted, plain_ckpt, tmp_path, capsys):
    rc = main(["eval", "--model", str(plain_ckpt), "--bin", str(planted["bin"]), "--pfe", "--no-mlflow",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{plain_ckpt}: --pfe needs a model with forward_pfe" in err, err
    assert not (tmp_path / "o").exists()  # stopped before the long part
    rc = main(["eval", "--model", str(plain_ckpt), "--id-synthetic", "--pfe", "--no-mlflow"])
    assert rc == 2 and "--pfe evaluates --bin sets and IJB templates" in capsys.readouterr().err
    with pytest.raises(PfeModelError, match="without it"):
        pfe_features(nn.Identity(), planted["images"][:2])

    class ZeroVariance(PixelPFE):
        def forward_pfe(self, x):
            mu, sigma_sq = super().forward_pfe(x)
            return mu, sigma_sq * (x[:, 2].mean(dim=(1, 2)) > -0.5)[:, None]  # a dark blue channel: sigma^2 = 0

    images = planted["images"][:8].copy()
    images[6, :, :, 2] = 0
    with pytest.raises(PfeModelError, match="sigma_sq <= 0 or non-finite for image 6"):
        pfe_features(ZeroVariance(), images, batch_size=4)


def test_cli_pfe_end_to_end_logs_mls_metrics_and_plots(planted, tmp_path, capsys):
    model_dir = save_mlflow_model(PixelPFE(), tmp_path / "pixel_pfe")
    genuine = np.flatnonzero(planted["issame"])[:8]
    meta, pairs, img_dir = ijb_files(tmp_path, planted["images"][np.stack([2 * genuine, 2 * genuine + 1], 1).ravel()],
                                     per_template=2)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(model_dir), "--pfe", "--bin", str(planted["bin"]), "--ijb-meta", str(meta),
               "--ijb-pairs", str(pairs), "--ijb-images", str(img_dir), "--ijb-weighting", "none",
               "--out", str(out), "--tracking-uri", uri, "--artifact-root", str(tmp_path / "art")])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "PFE MLS" in printed and "accuracy (most uncertain rejected)" in printed and "PFE fusion, MLS" in printed
    expected = planted["report"]
    sets = {s["name"]: s for s in json.loads((out / "report.json").read_text())["sets"]}
    assert sets["planted"]["pfe"]["mls"]["accuracy_mean"] == pytest.approx(expected.mls["accuracy_mean"])
    assert "mls_tpr_at_fpr" in sets["pairs"]["pfe"]
    for png in ("roc.png", "pfe_roc.png", "pfe_quality_rejection.png", "quality_rejection.png"):
        assert (out / png).stat().st_size > 1000

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("facescale-eval").experiment_id])
    m = run.data.metrics
    assert m["planted/pfe_mls_accuracy"] == pytest.approx(expected.mls["accuracy_mean"])
    assert m["planted/accuracy"] == pytest.approx(expected.verification["accuracy_mean"])
    assert m["planted/pfe_mls_accuracy"] > m["planted/accuracy"]
    assert "planted/pfe_accuracy_reject_uncertain_50pct" in m and "pairs/pfe_mls_tpr_at_fpr_1e-1" in m
    assert run.data.params["pfe"] == "True"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/pfe_roc.png",
                                                                                   "plots/pfe_quality_rejection.png"}


def test_cli_pfe_with_the_pfe_model(tmp_path, capsys):
    from facescale.pfe.model import PFEModel, UncertaintyHead, backbone_shapes

    synthesize(tmp_path / "synth", identities=2, images_per_identity=1, seed=5, difficulty=0.2,
               held_out_identities=20, num_pairs=10, progress=False)
    torch.manual_seed(0)
    backbone = build_backbone("iresnet_tiny", 64).eval()
    model = PFEModel(backbone, UncertaintyHead(*backbone_shapes(backbone))).eval()
    model_dir = save_mlflow_model(model, tmp_path / "pfe_model")
    bin_path = tmp_path / "synth" / "verification.bin"
    rc = main(["eval", "--model", str(model_dir), "--pfe", "--bin", str(bin_path), "--no-mlflow",
               "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    (rep,) = json.loads((tmp_path / "out" / "report.json").read_text())["sets"]
    images, issame = load_bin(bin_path)
    f = pfe_features(model, images)
    assert rep["accuracy_mean"] == pytest.approx(evaluate(f.embeddings, issame)["accuracy_mean"])
    assert np.all(f.sigma_sq > 0) and f.mu.shape == (20, 64)
    np.testing.assert_allclose(np.linalg.norm(f.mu, axis=1), 1.0, atol=1e-5)
    mls = mls_score(f.mu[0::2], f.sigma_sq[0::2], f.mu[1::2], f.sigma_sq[1::2])
    assert rep["pfe"]["mls"]["accuracy_mean"] == pytest.approx(evaluate_scores(mls, issame)["accuracy_mean"])

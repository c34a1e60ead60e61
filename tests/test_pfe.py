"""PFE uncertainty head (facescale.pfe): the MLS loss and its gradient, the head's shapes and errors, uncertainty that
rises with the synthetic generator's degradation, and `facescale pfe` as an MLflow run with a loadable model."""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import spearmanr
from torch.nn import functional as F

from facescale.data.identity_batches import IdentityBatcher
from facescale.data.synth import NUM_TRAITS, FaceRenderer
from facescale.data.transforms import normalize_images
from facescale.models import build_backbone
from facescale.models.iresnet import IResNet
from facescale.models.mobilefacenet import MobileFaceNet
from facescale.models.vargfacenet import VarGFaceNet
from facescale.models.vit import VisionTransformer
from facescale.pfe.config import PFEConfig, PFERunConfig
from facescale.pfe.loss import mls_loss
from facescale.pfe.model import PFEModel, PFEShapeError, UncertaintyHead, backbone_shapes
from facescale.pfe.train import build_pfe_model, lr_at, train_head

# --- the MLS loss -----------------------------------------------------------------------------------------------


def test_mls_loss_matches_a_hand_computation_and_ignores_impostors() -> None:
    # Samples 0 and 1 are the one genuine pair; sample 2 is alone. Per dimension: diff^2 = 1, s1 + s2 = 0.3 / 0.4.
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], requires_grad=True)
    log_s = torch.tensor([[0.1, 0.3], [0.2, 0.1], [0.5, 0.5]]).log().requires_grad_()
    labels = torch.tensor([7, 7, 3])
    loss = mls_loss(mu, log_s, labels)
    want = 1 / 0.3 + math.log(0.3) + 1 / 0.4 + math.log(0.4)  # -MLS = sum_d diff^2 / var + log var
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    # d/d log s1_d = s1_d * (1 / var - diff^2 / var^2); d/d mu1 = 2 (mu1 - mu2) / var.
    assert log_s.grad[0].tolist() == pytest.approx([0.1 * (1 / 0.3 - 1 / 0.09), 0.3 * (1 / 0.4 - 1 / 0.16)], rel=1e-5)
    assert log_s.grad[1].tolist() == pytest.approx([0.2 * (1 / 0.3 - 1 / 0.09), 0.1 * (1 / 0.4 - 1 / 0.16)], rel=1e-5)
    assert mu.grad[0].tolist() == pytest.approx([2 / 0.3, -2 / 0.4], rel=1e-5)
    assert mu.grad[2].abs().sum() == 0 and log_s.grad[2].abs().sum() == 0  # the impostor pairs do not count
    # Two identities of two images: the mean over the two genuine pairs.
    pair = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    two = mls_loss(torch.cat([mu.detach()[:2], pair]), torch.cat([log_s.detach()[:2], torch.zeros(2, 2)]),
                   torch.tensor([0, 0, 1, 1]))
    assert two.item() == pytest.approx((want + (1 / 2 + 2 * math.log(2))) / 2, rel=1e-6)


def test_mls_loss_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    mu = F.normalize(torch.randn(6, 5, generator=gen, dtype=torch.float64), dim=1).requires_grad_()
    log_s = (torch.randn(6, 5, generator=gen, dtype=torch.float64) - 2).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda m, s: mls_loss(m, s, labels), (mu, log_s), eps=1e-6, atol=1e-5)


def test_mls_loss_without_genuine_pairs_is_an_error() -> None:
    with pytest.raises(ValueError, match="no genuine pair"):
        mls_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor([0, 1, 2]))


def test_lr_steps_at_the_milestones() -> None:
    cfg = PFEConfig(lr=1.0, lr_milestones=[2, 4], lr_gamma=0.5)
    assert [lr_at(s, cfg) for s in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


# --- the head and the model -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("build", "feature_shape"), [
    (lambda: build_backbone("iresnet_nano", embedding_size=24), (64, 7, 7)),
    # Narrow members of the other families (same classes, same embedding layers), cheap to build.
    (lambda: MobileFaceNet(embedding_size=24, blocks=(1, 1, 1, 1), scale=1, gdc_channels=32), (32, 7, 7)),
    (lambda: VarGFaceNet(embedding_size=24, width_multiplier=0.25, units=(1, 1, 1), last_channels=64), (64, 7, 7)),
    (lambda: VisionTransformer(embedding_size=24, dim=32, depth=1), (144 * 32,)),
], ids=["iresnet", "mobilefacenet", "vargfacenet", "vit"])
def test_feature_map_is_the_embedding_layers_input(build, feature_shape: tuple) -> None:
    backbone = build().train()
    assert backbone_shapes(backbone) == (feature_shape, 24)
    assert backbone.training  # put back in the mode it was in
    model = PFEModel(backbone, UncertaintyHead(feature_shape, 24, hidden_size=8))
    mu, sigma_sq = model.forward_pfe(torch.zeros(2, 3, 112, 112))
    assert mu.shape == sigma_sq.shape == (2, 24)


def test_pfe_model_keeps_the_embedding_and_freezes_the_backbone() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("iresnet_nano", embedding_size=16).eval()
    x = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        want = backbone(x)
    model = build_pfe_model(backbone, PFEConfig(), seed=0)
    model.train()
    assert model.head.training and not model.backbone.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    mu, sigma_sq = model.forward_pfe(x)
    assert mu.shape == sigma_sq.shape == (4, 16)
    assert torch.allclose(mu.norm(dim=1), torch.ones(4), atol=1e-5) and (sigma_sq > 0).all()
    # The authors' init: shared scale 1e-4, shift -7, so every face starts at sigma^2 ~ exp(-7).
    assert torch.allclose(sigma_sq.log(), torch.full_like(sigma_sq, -7.0), atol=1e-2)
    sigma_sq.sum().backward()
    assert model.head.fc1.weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), want)  # the embedding is the backbone's, unchanged
        assert torch.allclose(model.forward_pfe(x)[0], F.normalize(want, dim=1), atol=1e-6)


def test_head_that_does_not_fit_names_both_shapes() -> None:
    backbone = build_backbone("iresnet_nano", embedding_size=16)
    with pytest.raises(PFEShapeError, match=r"\(128, 7, 7\).*\(64, 7, 7\)"):
        PFEModel(backbone, UncertaintyHead((128, 7, 7), 16))
    with pytest.raises(PFEShapeError, match=r"embedding size 32.*embedding size 16"):
        PFEModel(backbone, UncertaintyHead((64, 7, 7), 32))
    other = build_pfe_model(build_backbone("iresnet_tiny", embedding_size=16), PFEConfig())
    with pytest.raises(PFEShapeError, match=r"init_head.*\(128, 7, 7\).*\(64, 7, 7\)"):
        build_pfe_model(backbone, PFEConfig(), init_head=other)
    with pytest.raises(PFEShapeError, match="feature maps of shape"):
        UncertaintyHead((64, 7, 7), 16)(torch.zeros(2, 64, 6, 6))
    with pytest.raises(PFEShapeError, match="not a known backbone family"):
        backbone_shapes(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 112 * 112, 8)))


def test_config_is_typed_and_strict() -> None:
    with pytest.raises(ValueError, match="images_per_id"):
        PFEConfig(images_per_id=1)
    with pytest.raises(ValueError, match="buffer_samples"):
        PFEConfig(ids_per_batch=64, images_per_id=4, buffer_samples=100)
    with pytest.raises(ValueError, match="extra"):
        PFERunConfig.model_validate({"pfe": {"stpes": 3}})
    assert PFERunConfig.model_validate({"model": {"backbone": "iresnet_nano"}, "pfe": {"steps": 3}}).pfe.steps == 3


def test_pipeline_pfe_stages_follow_their_stage() -> None:
    from facescale.config import ConfigError
    from facescale.distill.pipeline import PipelineSpec, pfe_stage_configs, pfe_stages, stage_configs

    tree = {"name": "p", "teacher": {"backbone": "iresnet_tiny"}, "student": {"backbone": "iresnet_nano"},
            "generations": 2, "seeds": [0, 1], "config": {"train": {"batch_size": 8}},
            "pfe": {"after": ["gen-2"], "config": {"pfe": {"steps": 50}}}}
    spec = PipelineSpec.model_validate(tree)
    assert pfe_stages(spec) == {"gen-2-pfe/seed0": "gen-2/seed0", "gen-2-pfe/seed1": "gen-2/seed1"}
    assert "gen-2-pfe/seed0" not in spec.stage_names()  # not a training stage, not a champion candidate
    configs = pfe_stage_configs(spec, stage_configs(spec))
    cfg = configs["gen-2-pfe/seed1"]
    assert (cfg.pfe.steps, cfg.train.seed, cfg.train.batch_size, cfg.tracking.run_name) == (50, 1, 8, "gen-2-pfe/seed1")
    with pytest.raises(ValueError, match=r"pfe.after: unknown stage\(s\) \['gen-3'\]"):
        PipelineSpec.model_validate({**tree, "pfe": {"after": ["gen-3"]}})
    bad = PipelineSpec.model_validate({**tree, "pfe": {"after": ["gen-1"], "config": {"pfe": {"stepz": 1}}}})
    with pytest.raises(ConfigError, match=r"(?s)gen-1-pfe/seed0.*pfe.stepz: unknown key"):
        pfe_stage_configs(bad, stage_configs(bad))


# --- uncertainty against the generator's degradation -------------------------------------------------------------

LEVELS = (0.0, 0.5, 1.0)  # synth difficulty: scales blur, noise, occluders, pose and lighting


def _render(latents: np.ndarray, per_level: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """uint8 [N, 3, 112, 112] images of each identity at every level, their labels and level indices."""
    renderer, images, labels, levels = FaceRenderer(), [], [], []
    for identity, latent in enumerate(latents):
        for level, difficulty in enumerate(LEVELS):
            for k in range(per_level):
                images.append(renderer.render(latent, np.random.default_rng([seed, identity, level, k]), difficulty))
                labels.append(identity)
                levels.append(level)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels), np.array(levels)


def _briefly_trained_backbone(images: torch.Tensor, labels: torch.Tensor, embedding_size: int = 64) -> IResNet:
    """A freshly initialised tiny IResNet (widths 2/4/8/32: half of iresnet_nano, cheap on a CPU) whose embedding
    layer (the "E" block and the features BN) is trained for a few hundred CosFace steps (Wang et al., CVPR 2018:
    s=16, m=0.2) on its random trunk's feature maps, computed once.

    Cheap on a CPU, and enough for embeddings that mostly ignore background and lighting, so that genuine pairs drift
    apart as the degradation grows (what the head has to learn to predict)."""
    torch.manual_seed(0)
    backbone = IResNet((1, 1, 1, 1), (2, 4, 8, 32), embedding_size=embedding_size).eval()
    with torch.no_grad():
        fmaps = torch.cat([backbone.stages(backbone.stem(normalize_images(chunk, "cpu")))
                           for chunk in images.split(128)])
    embed = torch.nn.Sequential(backbone.head, backbone.features).train()
    num_classes = int(labels.max()) + 1
    centers = torch.nn.Linear(embedding_size, num_classes, bias=False)
    optimizer = torch.optim.SGD([*embed.parameters(), *centers.parameters()], lr=0.1, momentum=0.9,
                                weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(fmaps), (64,), generator=gen)
        cos = F.normalize(embed(fmaps[idx])) @ F.normalize(centers.weight).T
        loss = F.cross_entropy(16 * (cos - 0.2 * F.one_hot(labels[idx], num_classes)), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return backbone.eval()


def _stream(images: torch.Tensor, labels: torch.Tensor, batch: int = 32):
    """Endless shuffled micro-batches, as a loader's epoch_samples yields them."""
    gen = torch.Generator().manual_seed(1)
    while True:
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(order) - batch + 1, batch):
            idx = order[start:start + batch]
            yield images[idx], labels[idx], [str(int(i)) for i in idx]


def _spearman(model: PFEModel, images: torch.Tensor, levels: np.ndarray) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        _, sigma_sq = model.forward_pfe(normalize_images(images, "cpu"))
    summaries = {"mean": sigma_sq.mean(1), "harmonic_mean": 1 / (1 / sigma_sq).mean(1),
                 "geometric_mean": sigma_sq.log().mean(1)}
    return {name: float(spearmanr(levels, value.numpy()).statistic) for name, value in summaries.items()}


def test_uncertainty_rises_with_degradation() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster than two on a shared 2-core machine
    try:
        untrained, trained, losses = _train_and_measure()
    finally:
        torch.set_num_threads(threads)
    print(f"\nPFE Spearman rho (difficulty level vs uncertainty): untrained {untrained}, trained {trained}; "
          f"MLS loss per window {[round(v, 1) for v in losses]}")
    assert losses[-1] < losses[0]
    assert trained["mean"] > 0.3, trained
    assert untrained["mean"] < 0.3, untrained  # the test fails for an untrained head


def _train_and_measure() -> tuple[dict[str, float], dict[str, float], list[float]]:
    latents = np.random.default_rng(5).random((160 + 128 + 16, NUM_TRAITS))
    # Three disjoint sets of identities: the backbone's, the head's, and the held-out ones the correlation is
    # measured on (a head trained on embeddings its backbone memorised would see only tiny genuine distances).
    backbone = _briefly_trained_backbone(*_render(latents[:160], 2, seed=1)[:2])
    head_images, head_labels, _ = _render(latents[160:288], 2, seed=2)
    test_images, _, test_levels = _render(latents[288:], 4, seed=3)
    cfg = PFEConfig(steps=300, lr=1e-3, lr_milestones=[], ids_per_batch=8, images_per_id=4, buffer_samples=512,
                    bn_momentum=0.1, log_every=50)
    model = build_pfe_model(backbone, cfg, seed=0)
    untrained = _spearman(copy.deepcopy(model), test_images, test_levels)
    batcher = IdentityBatcher(_stream(head_images, head_labels), cfg.ids_per_batch, cfg.images_per_id,
                              cfg.buffer_samples, seed=0)
    result = train_head(model, batcher, cfg, torch.device("cpu"))
    return untrained, _spearman(model, test_images, test_levels), result.losses


# --- `facescale pfe` ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_cli_trains_a_linked_run_and_logs_a_loadable_model(mlflow_server: str, tiny_data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.tracking import MlflowClient

    from facescale.cli import main
    from facescale.data import load_manifest
    from facescale.tracking.mlflow_run import Tracker, end_run, start_run
    from facescale.tracking.models import load_backbone

    # The base model, logged by a pipeline-like stage run.
    experiment = "pfe-cli"
    base_run = start_run(mlflow_server, experiment, str(tmp_path / "artifacts"), "gen-2", {}, "{}",
                         tags={"facescale.stage": "gen-2", "facescale.generation": "2",
                               "facescale.pipeline_run_id": "demo-1"})
    torch.manual_seed(0)
    backbone = build_backbone("iresnet_nano", embedding_size=32).eval()
    base_id = Tracker(mlflow_server, base_run, 0).log_model(backbone, metadata={"backbone": "iresnet_nano",
                                                                                "embedding_size": 32})
    end_run(mlflow_server, base_run, True)
    config = tmp_path / "pfe.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"root": str(tiny_data), "val_bins": [], "loader": "torch", "num_workers": 0},
        "train": {"batch_size": 16},
        "tracking": {"uri": mlflow_server, "experiment": experiment},
        "pfe": {"steps": 6, "ids_per_batch": 4, "images_per_id": 2, "buffer_samples": 192, "log_every": 2},
    }))

    assert main(["pfe", "--model", f"models:/{base_id}", "--config", str(config), "pfe.lr=0.002"]) == 0
    assert "models:/m-" in capsys.readouterr().out
    client = MlflowClient(mlflow_server)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    (run,) = client.search_runs([exp_id], "tags.`facescale.stage` = 'pfe'")
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["facescale.base_model_id"] == tags["facescale.init_model_id"] == base_id
    assert tags["facescale.base_run_id"] == base_run
    assert (tags["facescale.pipeline_run_id"], tags["facescale.generation"]) == ("demo-1", "2")  # lineage carried
    assert tags["facescale.dataset_digest"] == load_manifest(tiny_data).digest
    inputs = client.get_run(run.info.run_id).inputs
    assert [m.model_id for m in inputs.model_inputs] == [base_id]  # the base model is an input of the run
    assert run.data.params["pfe.lr"] == "0.002"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4, 6]

    pfe_id = tags["facescale.model_id"]
    assert client.get_logged_model(pfe_id).source_run_id == run.info.run_id
    loaded = load_backbone(f"models:/{pfe_id}", tracking_uri=mlflow_server)
    assert isinstance(loaded.module, PFEModel) and loaded.embedding_size == 32
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), backbone(x), atol=1e-5)  # the backbone is the base model's
        mu, sigma_sq = loaded.module.forward_pfe(x)
    assert mu.shape == sigma_sq.shape == (3, 32) and (sigma_sq > 0).all()
    assert loaded.module.head.shift.item() != pytest.approx(-7.0, abs=1e-6)  # the head was trained

    # A head that does not fit the model: exit 2 before any run starts, naming both shapes.
    ckpt = tmp_path / "tiny_ckpt"
    ckpt.mkdir()
    torch.save({"backbone": build_backbone("iresnet_tiny", embedding_size=32).state_dict(),
                "arch": {"backbone": "iresnet_tiny", "embedding_size": 32}}, ckpt / "model.pt")
    assert main(["pfe", "--model", str(ckpt), "--config", str(config), f"pfe.init_head=models:/{pfe_id}"]) == 2
    err = capsys.readouterr().err
    assert "(64, 7, 7)" in err and "(128, 7, 7)" in err and "embedding size 32" in err
    assert main(["pfe", "--model", f"models:/{base_id}", "--config", str(config), "pfe.ids_per_batch=13"]) == 2
    err = capsys.readouterr().err
    assert "pfe.ids_per_batch=13, but" in err and "only 12 identities" in err
    assert len(client.search_runs([exp_id], "tags.`facescale.stage` = 'pfe'")) == 1


def test_identity_batches_that_never_fill_are_an_error(tiny_data: Path) -> None:
    from facescale.data.factory import build_train_loader
    from facescale.pfe.train import endless_identity_batches

    cfg = PFERunConfig.model_validate({"data": {"root": str(tiny_data), "loader": "torch", "num_workers": 0},
                                       "train": {"batch_size": 32}})
    loader = build_train_loader(cfg, rank=0, world_size=1)
    # 16 images per identity in the shards: 17 never come together.
    pfe = PFEConfig(ids_per_batch=2, images_per_id=17, buffer_samples=4096)
    _, batches = endless_identity_batches(loader, pfe, seed=0)
    with pytest.raises(RuntimeError, match="epoch 0 of 192 samples gave no batch of pfe.ids_per_batch=2"):
        next(batches)

"""Angular distillation loss, teacher-embedding cache and pipeline-spec validation (no Ray except the cache build)."""

from __future__ import annotations

import logging
import math
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from facescale.config import ConfigError, ScalingConfig
from facescale.data import iter_shard, load_manifest, synthesize
from facescale.distill import angular_distillation_loss
from facescale.distill.cache import TeacherCache, TeacherCacheError, check_cache
from facescale.distill.pipeline import load_pipeline, stage_configs
from facescale.distill.runner import PipelineRunner
from facescale.models import build_backbone


# ---------------------------------------------------------------- loss: values and gradients by hand
def _hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    # Two samples whose angles are easy to do on paper: 90 degrees apart, and 60 degrees apart (norms differ).
    student = torch.tensor([[3.0, 0.0], [1.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 2.0], [0.5, 0.5 * math.sqrt(3.0)]])
    return student, teacher


def test_eq4_value_and_gradient_by_hand() -> None:
    student, teacher = _hand_case()
    loss = angular_distillation_loss(student, teacher, form="eq4")
    # cos = 0 and 0.5: mean((1-0)^2, (1-0.5)^2) = (1 + 0.25) / 2
    assert loss.item() == pytest.approx(0.625, abs=1e-6)
    loss.backward()
    # d/ds (1 - cos)^2 / B = -2 (1 - cos) / B * dcos/ds, dcos/ds = (t_hat - cos * s_hat) / |s|.
    # Sample 0: s_hat = (1,0), t_hat = (0,1), cos 0, |s| = 3 -> -2 * 1 / 2 * (0, 1) / 3 = (0, -1/3).
    # Sample 1: s_hat = (1,0), t_hat = (1/2, sqrt3/2), cos 1/2, |s| = 1 -> -2 * 0.5 / 2 * (0, sqrt3/2) = (0, -sqrt3/4).
    expected = torch.tensor([[0.0, -1.0 / 3.0], [0.0, -math.sqrt(3.0) / 4.0]])
    torch.testing.assert_close(student.grad, expected, atol=1e-6, rtol=0)


def test_eq5_value_and_gradient_by_hand() -> None:
    student, teacher = _hand_case()
    loss = angular_distillation_loss(student, teacher, form="eq5")
    # ||t_hat - s_hat||^2 = 2 - 2 cos: (2 + 1) / 2
    assert loss.item() == pytest.approx(1.5, abs=1e-6)
    loss.backward()
    # d/ds (2 - 2cos) / B = -(2 / B) dcos/ds: sample 0 -> -(0, 1)/3, sample 1 -> -(0, sqrt3/2).
    expected = torch.tensor([[0.0, -1.0 / 3.0], [0.0, -math.sqrt(3.0) / 2.0]])
    torch.testing.assert_close(student.grad, expected, atol=1e-6, rtol=0)


def test_loss_ignores_norms_and_does_not_train_the_teacher() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    for form in ("eq4", "eq5"):
        a = angular_distillation_loss(student, teacher, form)
        b = angular_distillation_loss(student * 5.0, teacher * 0.1, form)
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
        assert angular_distillation_loss(teacher.detach(), teacher, form).item() == pytest.approx(0.0, abs=1e-6)
    angular_distillation_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


def test_loss_rejects_mismatched_embedding_sizes_and_forms() -> None:
    with pytest.raises(ValueError, match="same D"):
        angular_distillation_loss(torch.zeros(4, 128), torch.zeros(4, 512))
    with pytest.raises(ValueError, match="eq4"):
        angular_distillation_loss(torch.ones(2, 3), torch.ones(2, 3), form="eq6")  # type: ignore[arg-type]


# ---------------------------------------------------------------- teacher cache
class _CountingTeacher(nn.Module):
    """A real backbone that refuses to run after ``limit`` forward calls (to prove a cache is reused)."""

    def __init__(self, poisoned: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = build_backbone("iresnet_tiny", 32)
        self.poisoned = poisoned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.poisoned:
            raise AssertionError("teacher forward pass although the cache is complete")
        return self.net(x)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distill_data")
    synthesize(root, identities=6, images_per_identity=4, seed=1, difficulty=0.2, held_out_identities=4, num_pairs=20,
               samples_per_shard=8, progress=False)
    return root


@pytest.fixture(scope="module")
def local_ray():
    import ray
    from ray import cloudpickle

    # The test's teacher class lives in this test module, which Ray workers cannot import: ship it by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def test_cache_built_once_reused_without_teacher_and_rebuilt_for_another_teacher(
        tiny_data: Path, tmp_path: Path, local_ray: None, caplog: pytest.LogCaptureFixture) -> None:
    from facescale.train.teacher_cache import build_teacher_cache

    manifest = load_manifest(tiny_data)
    scaling = ScalingConfig(num_workers=2, cpus_per_worker=1)
    cache_dir = tmp_path / "cache"
    meta, built = build_teacher_cache(_CountingTeacher(), "m-teacher-a", manifest, cache_dir, 32, scaling)
    assert built and meta.num_samples == manifest.num_samples == 24 and meta.num_shards == 3
    cache = TeacherCache(cache_dir, tiny_data, "m-teacher-a")
    keys = [s["__key__"] for url in manifest.shard_urls() for s in iter_shard(url)]
    assert len(cache) == len(keys) == 24
    emb = cache.lookup(keys[:5])
    assert emb.shape == (5, 32) and torch.allclose(emb.norm(dim=1), torch.ones(5), atol=2e-3)
    mtimes = {p: p.stat().st_mtime_ns for p in cache_dir.glob("shard-*.npz")}

    # Same teacher, same data: reused, the teacher never runs.
    _, built = build_teacher_cache(_CountingTeacher(poisoned=True), "m-teacher-a", manifest, cache_dir, 32, scaling)
    assert not built
    assert {p: p.stat().st_mtime_ns for p in cache_dir.glob("shard-*.npz")} == mtimes

    # Another teacher: detected, reported and rebuilt.
    assert "not m-teacher-b" in (check_cache(cache_dir, "m-teacher-b", manifest) or "")
    with caplog.at_level(logging.WARNING, logger="facescale.teacher_cache"):
        meta_b, built = build_teacher_cache(_CountingTeacher(), "m-teacher-b", manifest, cache_dir, 32, scaling)
    assert built and meta_b.teacher_model_id == "m-teacher-b"
    assert any("rebuilt" in r.message and "m-teacher-a" in r.message for r in caplog.records)
    with pytest.raises(TeacherCacheError, match="not m-teacher-a"):
        TeacherCache(cache_dir, tiny_data, "m-teacher-a")


def test_cache_for_other_data_is_refused_and_missing_keys_are_named(tiny_data: Path, tmp_path: Path,
                                                                   local_ray: None) -> None:
    from facescale.train.teacher_cache import build_teacher_cache

    other = tmp_path / "other"
    synthesize(other, identities=6, images_per_identity=4, seed=2, difficulty=0.2, held_out_identities=4, num_pairs=20,
               samples_per_shard=8, progress=False)
    cache_dir = tmp_path / "cache"
    build_teacher_cache(_CountingTeacher(), "m-t", load_manifest(tiny_data), cache_dir, 32, ScalingConfig())
    with pytest.raises(TeacherCacheError, match="dataset digest"):
        TeacherCache(cache_dir, other)
    with pytest.raises(TeacherCacheError, match="no-such-key"):
        TeacherCache(cache_dir, tiny_data).lookup(["no-such-key"])
    # A half-built cache (no cache.json) is never used.
    os.remove(cache_dir / "cache.json")
    with pytest.raises(TeacherCacheError, match="incomplete"):
        TeacherCache(cache_dir, tiny_data)


def test_cached_embedding_is_the_flip_sum_embedding(tiny_data: Path, tmp_path: Path, local_ray: None) -> None:
    from facescale.data.shards import decode_image
    from facescale.eval.verification import compute_embeddings
    from facescale.train.teacher_cache import build_teacher_cache

    manifest = load_manifest(tiny_data)
    teacher = _CountingTeacher()
    build_teacher_cache(teacher, "m-t", manifest, tmp_path / "c", 32, ScalingConfig(num_workers=1))
    sample = next(iter_shard(manifest.shard_urls()[1]))
    direct = compute_embeddings(teacher.eval(), decode_image(sample)[None])
    cached = TeacherCache(tmp_path / "c", tiny_data).lookup([sample["__key__"]]).numpy()
    np.testing.assert_allclose(cached, direct, atol=2e-3)  # float16 storage


# ---------------------------------------------------------------- pipeline spec: errors before any training
def _write_spec(tmp_path: Path, data: Path, body: str) -> Path:
    spec = tmp_path / "p.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: t
        config:
          data: {{root: {data}, val_bins: [{data}/verification.bin]}}
          scaling: {{num_workers: 1, storage_path: {tmp_path}/runs}}
          tracking: {{uri: "sqlite:///{tmp_path}/mlruns.db", artifact_root: {tmp_path}/art}}
        """) + textwrap.dedent(body))
    return spec


def test_pipeline_stages_expand_in_order_with_merged_configs(tiny_data: Path, tmp_path: Path) -> None:
    spec = load_pipeline(_write_spec(tmp_path, tiny_data, """\
        teacher: {backbone: iresnet18, config: {train: {epochs: 3}}}
        student: {backbone: mobilefacenet, config: {train: {lr: 0.05}}}
        generations: 3
        stages: {gen-3: {train: {lr: 0.01}}}
        """), ["distill.alpha=5"])
    configs = stage_configs(spec)
    assert list(configs) == ["teacher", "scratch", "gen-1", "gen-2", "gen-3"]
    assert configs["teacher"].model.backbone == "iresnet18" and configs["teacher"].train.epochs == 3
    assert configs["gen-1"].model.backbone == "mobilefacenet" and configs["gen-1"].train.lr == 0.05
    assert configs["gen-3"].train.lr == 0.01 and configs["gen-2"].distill.alpha == 5
    assert configs["scratch"].distill.teacher_cache is None and configs["gen-2"].tracking.run_name == "gen-2"


@pytest.mark.parametrize(("body", "message"), [
    ("teacher: {backbone: iresnet_tiny}\nstudent: {backbone: iresnet_tiny}\nwarmup: 3\n", "warmup: unknown key"),
    ("teacher: {backbone: iresnet_tiny}\nstudent: {backbone: resnet_huge}\n", "unknown backbone 'resnet_huge'"),
    ("teacher: {backbone: iresnet_tiny}\nstudent: {backbone: iresnet_tiny}\nstages: {gen-7: {}}\n",
     "unknown stage"),
    ("teacher: {backbone: iresnet_tiny}\nstudent: {backbone: iresnet_tiny, config: {train: {lrr: 1}}}\n",
     "train.lrr: unknown key"),
    ("teacher: {backbone: iresnet_tiny}\nstudent: {backbone: iresnet_tiny, config: {model: {embedding_size: 64}}}\n",
     "embedding_size 64"),
])
def test_bad_pipeline_specs_fail_before_training(tiny_data: Path, tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PipelineRunner(load_pipeline(_write_spec(tmp_path, tiny_data, body)))


def test_teacher_uri_that_does_not_resolve_fails_before_training(tiny_data: Path, tmp_path: Path) -> None:
    spec = load_pipeline(_write_spec(tmp_path, tiny_data, """\
        teacher: {model_uri: "models:/no-such-teacher@champion"}
        student: {backbone: iresnet_tiny}
        """))
    with pytest.raises(ConfigError, match="teacher.model_uri.*no-such-teacher"):
        PipelineRunner(spec)


def test_shipped_pipelines_are_valid() -> None:
    repo = Path(__file__).resolve().parents[1]
    demo = stage_configs(load_pipeline(repo / "pipelines" / "demo.yaml"))
    assert list(demo) == ["teacher", "scratch", "gen-1", "gen-2"]
    assert demo["teacher"].model.backbone == "iresnet_tiny" and demo["gen-2"].model.backbone == "iresnet_nano"
    # The paper setting, for a GPU cluster: IResNet-100 teacher, VarGFaceNet students, Partial FC, alpha 7.
    paper = stage_configs(load_pipeline(repo / "pipelines" / "vargfacenet_rkd.yaml"))
    assert paper["teacher"].model.backbone == "iresnet100"
    assert {paper[s].model.backbone for s in ("scratch", "gen-1", "gen-2")} == {"vargfacenet"}
    assert all(c.classifier.type == "partial_fc" and c.scaling.use_gpu for c in paper.values())
    assert paper["gen-2"].distill.alpha == 7.0 and paper["gen-2"].distill.form == "eq5"

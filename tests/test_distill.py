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
from facescale.distill.pipeline import load_pipeline, split_stage, stage_configs, student_epochs
from facescale.distill.report import comparison_metrics, format_summary, summarize, summary_table
from facescale.distill.runner import PipelineRunner
from facescale.models import build_backbone
from facescale.tracking.lineage import TAG_BASE_STAGE, TAG_EPOCHS, TAG_SEED, PipelineLineage, StageRecord, pick_champion


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
    from facescale.distill.cache_build import build_teacher_cache

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
    from facescale.distill.cache_build import build_teacher_cache

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
    from facescale.distill.cache_build import build_teacher_cache
    from facescale.eval.verification import compute_embeddings

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
    assert list(demo) == ["teacher", "scratch", "scratch-matched", "gen-1", "gen-2"]
    assert demo["teacher"].model.backbone == "iresnet_tiny" and demo["gen-2"].model.backbone == "iresnet_nano"
    # the budget-matched baseline has had as many student epochs as gen-2 (gen-1's plus its own)
    assert demo["scratch-matched"].train.epochs == demo["gen-1"].train.epochs + demo["gen-2"].train.epochs == 2
    assert demo["scratch"].train.epochs == 1 and demo["scratch-matched"].distill.teacher_cache is None
    # The paper setting, for a GPU cluster: IResNet-100 teacher, VarGFaceNet students, Partial FC, alpha 7.
    paper = stage_configs(load_pipeline(repo / "pipelines" / "vargfacenet_rkd.yaml"))
    assert paper["teacher"].model.backbone == "iresnet100"
    assert {paper[s].model.backbone for s in ("scratch", "scratch-matched", "gen-1", "gen-2")} == {"vargfacenet"}
    assert paper["scratch-matched"].train.epochs == 40
    assert all(c.classifier.type == "partial_fc" and c.scaling.use_gpu for c in paper.values())
    assert paper["gen-2"].distill.alpha == 7.0 and paper["gen-2"].distill.form == "eq5"


# ---------------------------------------------------------------- budget-matched baseline and seeds (no Ray)
_TWO_GENS = """\
    teacher: {backbone: iresnet_tiny, config: {train: {epochs: 3}}}
    student: {backbone: iresnet_nano, config: {train: {epochs: 2}}}
    generations: 3
    stages: {gen-2: {train: {epochs: 1}}}
    """


@pytest.mark.parametrize(("baseline", "stages", "matched_epochs"), [
    ("true", ["teacher", "scratch", "gen-1", "gen-2", "gen-3"], None),        # the old spelling, unchanged
    ("false", ["teacher", "gen-1", "gen-2", "gen-3"], None),
    ("{epochs: match}", ["teacher", "scratch", "scratch-matched", "gen-1", "gen-2", "gen-3"], 2 + 1 + 2),
    ("{one_generation: false, epochs: 7}", ["teacher", "scratch-matched", "gen-1", "gen-2", "gen-3"], 7),
])
def test_scratch_baseline_spellings_and_the_matched_budget(tiny_data: Path, tmp_path: Path, baseline: str,
                                                           stages: list[str], matched_epochs: int | None) -> None:
    spec = load_pipeline(_write_spec(tmp_path, tiny_data, _TWO_GENS + f"scratch_baseline: {baseline}\n"))
    configs = stage_configs(spec)
    assert list(configs) == stages
    # gen-3 starts from gen-2, which started from gen-1: 2 + 1 + 2 student epochs behind its model
    assert [student_epochs(configs, f"gen-{g}") for g in (1, 2, 3)] == [2, 3, 5]
    if matched_epochs is not None:
        matched = configs["scratch-matched"]
        assert matched.train.epochs == matched_epochs and matched.distill.teacher_cache is None
        assert matched.model.backbone == "iresnet_nano" and matched.tracking.run_name == "scratch-matched"
    if "scratch" in configs:
        assert configs["scratch"].train.epochs == 2  # one generation's budget


def test_matched_budget_follows_a_step_budget_and_rejects_bad_epochs(tiny_data: Path, tmp_path: Path) -> None:
    body = ("teacher: {backbone: iresnet_tiny}\nstudent: {backbone: iresnet_nano, config: {train: {max_steps: 5}}}\n"
            "stages: {gen-2: {train: {max_steps: 3}}}\nscratch_baseline: {epochs: match}\n")
    configs = stage_configs(load_pipeline(_write_spec(tmp_path, tiny_data, body)))
    assert configs["scratch-matched"].train.max_steps == 8 and configs["scratch"].train.max_steps == 5
    with pytest.raises(ConfigError, match="scratch_baseline.epochs"):
        load_pipeline(_write_spec(tmp_path, tiny_data, "teacher: {backbone: iresnet_tiny}\n"
                                  "student: {backbone: iresnet_nano}\nscratch_baseline: {epochs: 0}\n"))
    with pytest.raises(ConfigError, match="seeds"):
        load_pipeline(_write_spec(tmp_path, tiny_data, "teacher: {backbone: iresnet_tiny}\n"
                                  "student: {backbone: iresnet_nano}\nseeds: [1, 1]\n"))


def test_seeds_expand_every_student_stage_once_per_seed(tiny_data: Path, tmp_path: Path) -> None:
    spec = load_pipeline(_write_spec(tmp_path, tiny_data, _TWO_GENS + "scratch_baseline: {epochs: match}\n"),
                         ["seeds=[0,1,2]", "generations=2"])
    configs = stage_configs(spec)
    students = ["scratch", "scratch-matched", "gen-1", "gen-2"]
    assert list(configs) == ["teacher"] + [f"{b}/seed{s}" for s in (0, 1, 2) for b in students]
    assert spec.student_stages() == set(configs) - {"teacher"}
    for name, cfg in configs.items():
        base, seed = split_stage(name)
        assert cfg.train.seed == (0 if name == "teacher" else seed) and cfg.tracking.run_name == name
    assert configs["gen-2/seed1"].train.epochs == 1  # stages.gen-2 applies to every seed
    assert configs["scratch-matched/seed2"].train.epochs == 3 and configs["gen-1/seed2"].distill.alpha == 7.0
    assert split_stage("gen-1/seed12") == ("gen-1", 12) and split_stage("scratch-matched") == ("scratch-matched", None)
    runner = PipelineRunner(spec)  # validates every seeded stage (inputs, sizes) without Ray
    assert runner._first_generation().tracking.run_name == "gen-1/seed0"


def _record(stage: str, seed: int | None, accuracy: float, epochs: int = 1, version: str = "1") -> StageRecord:
    base = stage.split("/seed")[0]
    tags = {TAG_BASE_STAGE: base, TAG_EPOCHS: str(epochs), **({TAG_SEED: str(seed)} if seed is not None else {})}
    return StageRecord(stage, f"run-{stage}", f"m-{stage}", "/ckpt", version,
                       {"val/verification/accuracy": accuracy, "val/verification/accuracy_std": 0.01}, tags)


def test_report_mean_and_std_over_seeds_by_hand(tmp_path: Path) -> None:
    from facescale.distill.report import plot_accuracy, stage_table

    records = [_record("teacher", 0, 0.96, 3)]
    records += [_record(f"scratch/seed{s}", s, a) for s, a in ((0, 0.90), (1, 0.92), (2, 0.97))]
    records += [_record(f"gen-1/seed{s}", s, a) for s, a in ((0, 0.93), (1, 0.95), (2, 0.94))]
    rows = {r.stage: r for r in summarize(records)}
    # scratch: mean (0.90 + 0.92 + 0.97) / 3 = 0.93; deviations -0.03, -0.01, 0.04; sample variance
    # (0.0009 + 0.0001 + 0.0016) / 2 = 0.0013 -> std sqrt(0.0013) = 0.0360555...
    assert rows["scratch"].mean == pytest.approx(0.93) and rows["scratch"].std == pytest.approx(0.0360555128, abs=1e-9)
    # gen-1: mean 0.94; deviations -0.01, 0.01, 0 -> variance 0.0002 / 2 -> std 0.01
    assert rows["gen-1"].mean == pytest.approx(0.94) and rows["gen-1"].std == pytest.approx(0.01)
    assert math.isnan(rows["teacher"].std) and rows["scratch"].seeds == [0, 1, 2]
    table = summary_table(records)
    assert table["stage"] == ["teacher", "scratch", "gen-1"] and table["num_seeds"] == [1, 3, 3]
    metrics = comparison_metrics(records)
    assert metrics["scratch/accuracy"] == pytest.approx(0.93) and metrics["gen-1/seed2/accuracy"] == 0.94
    assert metrics["gen-1/accuracy_std_over_seeds"] == pytest.approx(0.01) and "teacher/accuracy_std_over_seeds" \
        not in metrics
    assert stage_table(records, "gen-1/seed1")["seed"] == [0, 0, 1, 2, 0, 1, 2]
    text = format_summary(records, [], "gen-1/seed1", {})
    assert "scratch           93.00% ± 3.61  (3 seed(s)" in text and "gen-1/seed1 (champion)" in text
    assert plot_accuracy(records, tmp_path / "acc.png", "t").stat().st_size > 0
    # The champion is chosen by the stage's mean (gen-1, 0.94 > scratch's 0.93), not by the best single seed
    # (scratch/seed2, 0.97); of gen-1, its best seed.
    students = {r.stage for r in records} - {"teacher"}
    assert pick_champion(records, students).stage == "gen-1/seed1"
    assert pick_champion([_record("scratch", None, 0.9), _record("gen-1", None, 0.91)], {"scratch", "gen-1"}).stage \
        == "gen-1"


def test_lineage_carries_the_seed_and_resume_finds_seeded_stages(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    lineage = PipelineLineage(uri, "seeds", str(tmp_path / "art"), "p-1", "p", "p-model")
    assert lineage.open_parent({}, "name: p\n") is False
    client = lineage.client
    tags = {"facescale.stage": "gen-1/seed1", TAG_BASE_STAGE: "gen-1", TAG_SEED: "1",
            "facescale.pipeline_run_id": "p-1", "mlflow.parentRunId": lineage.parent_run_id}
    run = client.create_run(lineage.experiment_id, run_name="gen-1/seed1", tags=tags)
    other = client.create_run(lineage.experiment_id, run_name="gen-2/seed1", tags={
        **tags, "facescale.stage": "gen-2/seed1", TAG_BASE_STAGE: "gen-2"})
    model = client.create_logged_model(lineage.experiment_id, name="model", source_run_id=run.info.run_id)
    rec = lineage.complete_stage("gen-1/seed1", run.info.run_id, model.model_id, "/ckpt", {"val/v/accuracy": 0.9})
    assert rec.seed == 1 and rec.base_stage == "gen-1"
    version = client.get_model_version_by_alias("p-model", "gen-1-seed1")  # '/' is not allowed in an alias
    assert version.tags[TAG_SEED] == "1" and version.tags["facescale.stage"] == "gen-1/seed1"
    # what a re-submission of the pipeline run sees: the seeded stage is done, the other one was interrupted
    assert lineage.finished_stage("gen-1/seed1").seed == 1
    assert lineage.finished_stage("gen-1/seed0") is None and lineage.finished_stage("gen-2/seed1") is None
    assert lineage.interrupted_stage("gen-2/seed1") == other.info.run_id

"""``facescale plan``: bf16 centers, the whole rank (backbone terms per engine and ZeRO stage) and ``--fit``."""

from __future__ import annotations

import argparse
import json

import pytest

from facescale.parallel.backbone_memory import BACKBONE_MEMORY
from facescale.parallel.plan import add_plan_arguments, backbone_terms, estimate, fit_identities, run_plan

GIB = 1 << 30


def _run(capsys, argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    code = run_plan(parser.parse_args(argv.split()))
    return code, capsys.readouterr().out


def test_bf16_centers_fit_the_issue_budget(capsys):
    fp32 = estimate(100_000_000, 8, 128, 0.1)
    bf16 = estimate(100_000_000, 8, 128, 0.1, center_dtype="bf16")
    assert bf16.centers_bytes * 2 == fp32.centers_bytes == bf16.num_local * 512 * 4
    assert bf16.bytes_per_identity == 512 * 2 + 548 <= 1600  # bf16 centers + int8 momentum with its scales
    assert bf16.peak_bytes < fp32.peak_bytes
    code, out = _run(capsys, "--identities 10M --world-size 2 --batch-size 64 --sample-rate 0.1 --center-dtype bf16 "
                             "--json")
    assert code == 0 and json.loads(out)["bytes_per_identity"] <= 1600
    with pytest.raises(ValueError, match="dense v2 baseline keeps fp32"):
        estimate(1000, 2, 8, 1.0, center_dtype="bf16", dense=True)


def test_backbone_terms_per_engine_and_zero_stage():
    p = BACKBONE_MEMORY["iresnet100"]["params"]
    act = BACKBONE_MEMORY["iresnet100"]
    ddp = backbone_terms("iresnet100", 64, 8, "sgd", "fp32", "ddp")
    # weights, gradients and DDP's bucket copy in fp32, SGD momentum, activations at batch 64
    assert ddp == {"weights (fp32)": 4 * p, "gradients (fp32)": 4 * p, "DDP gradient buckets": 4 * p,
                   "optimizer state": 4 * p, "activations": act["fp32"]["fixed"] + 64 * act["fp32"]["per_sample"]}
    adamw = backbone_terms("iresnet100", 64, 8, "adamw", "fp32", "ddp")
    assert adamw["optimizer state"] == 8 * p
    ddp_bf16 = backbone_terms("iresnet100", 64, 8, "sgd", "bf16", "ddp")
    assert ddp_bf16["activations + autocast weight copies"] == act["bf16"]["fixed"] + 64 * act["bf16"]["per_sample"]
    # ZeRO (Rajbhandari et al. 2020): 2P weights + 2P gradients + (4 + K)P masters and state, partitioned by stage.
    totals = []
    for stage in range(4):
        t = backbone_terms("iresnet100", 64, 8, "sgd", "bf16", "deepspeed", stage)
        assert t["weights (bf16)"] == 2 * p // (8 if stage == 3 else 1)
        assert t["gradients (bf16)"] == 2 * p // (8 if stage >= 2 else 1)
        assert t["fp32 master weights + optimizer state"] == 8 * p // (8 if stage >= 1 else 1)
        assert t["activations"] == act["fp32"]["fixed"] + 64 * act["bf16"]["per_sample"]
        totals.append(sum(t.values()))
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[3]
    fp32_z3 = backbone_terms("vit_b", 32, 4, "adamw", "fp32", "deepspeed", 3)
    q = BACKBONE_MEMORY["vit_b"]["params"]
    assert fp32_z3["weights (fp32)"] == 4 * q // 4 and fp32_z3["optimizer state"] == 8 * q // 4
    report = estimate(1_000_000, 8, 64, 0.1, backbone="iresnet100", engine="deepspeed", zero_stage=2,
                      precision="bf16")
    assert report.rank_peak_bytes == report.peak_bytes + sum(report.backbone_terms.values())
    assert estimate(1_000_000, 8, 64, 0.1).rank_peak_bytes == estimate(1_000_000, 8, 64, 0.1).peak_bytes
    with pytest.raises(ValueError, match="not in the planner's table"):
        backbone_terms("resnet9000", 64, 8)
    with pytest.raises(ValueError, match="only to --engine deepspeed"):
        backbone_terms("iresnet100", 64, 8, zero_stage=2)


def test_every_registered_backbone_is_in_the_table():
    from facescale.models import list_backbones

    assert set(list_backbones()) <= set(BACKBONE_MEMORY)
    for name in ("vit_t", "vit_s", "vit_b", "vit_l", "iresnet100"):
        assert BACKBONE_MEMORY[name]["fp32"]["per_sample"] > BACKBONE_MEMORY[name]["bf16"]["per_sample"] > 0


@pytest.mark.parametrize("kwargs", [
    dict(world_size=8, batch_size=128, sample_rate=0.1, backbone="iresnet100", center_dtype="bf16", precision="bf16"),
    dict(world_size=3, batch_size=16, sample_rate=1.0, backbone="vit_b", engine="deepspeed", zero_stage=3),
    dict(world_size=2, batch_size=64, sample_rate=0.1, center_dtype="bf16"),
])
def test_fit_inverts_the_estimate(kwargs):
    budget = 20 * GIB
    count, report = fit_identities(budget, **kwargs)
    w = kwargs["world_size"]
    assert count > 0 and count % w == 0
    fits = estimate(count, **kwargs)
    assert fits.rank_peak_bytes <= budget and fits.rank_peak_bytes == report.rank_peak_bytes
    assert estimate(count + w, **kwargs).rank_peak_bytes > budget  # one more class per rank does not fit


def test_fit_and_memory_budget_judge_the_rank(capsys):
    code, out = _run(capsys, "--fit --memory-gib 80 --world-size 8 --batch-size 128 --sample-rate 0.1 "
                             "--backbone iresnet100 --precision bf16 --center-dtype bf16")
    count, _ = fit_identities(80 * GIB, 8, 128, 0.1, backbone="iresnet100", precision="bf16", center_dtype="bf16")
    assert code == 0 and f"fit: {count:,} identities fit 80.0 GiB per rank on 8 ranks" in out
    assert "backbone iresnet100" in out and "rank peak (classifier + backbone)" in out
    # The classifier alone fits 1 GiB; with the backbone's activations the rank does not.
    base = "--identities 100k --world-size 2 --batch-size 64 --sample-rate 0.1 --memory-gib 1"
    assert _run(capsys, base)[0] == 0
    assert _run(capsys, base + " --backbone iresnet100")[0] == 1
    with pytest.raises(SystemExit, match="--fit needs --memory-gib"):
        _run(capsys, "--fit --world-size 8 --batch-size 128")
    with pytest.raises(SystemExit, match="--zero-stage applies only"):
        _run(capsys, "--identities 1M --world-size 8 --batch-size 128 --zero-stage 2")

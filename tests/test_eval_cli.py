"""`facescale eval` / `facescale export` end to end: checkpoint and MLflow models, real stores, bad input → exit 2."""

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import simplejpeg
import torch
from mlflow.tracking import MlflowClient

from facescale.checkpoint.format import TrainCheckpoint, TrainProgress
from facescale.cli import main
from facescale.data.synth import synthesize
from facescale.eval.verification import compute_embeddings, evaluate, load_bin
from facescale.models import build_backbone
from facescale.tracking.mlflow_run import Tracker, end_run, start_run

ARCH = {"backbone": "iresnet_tiny", "embedding_size": 64}  # the fastest backbone: tests measure logic
BIN = Path(sys.executable).parent


def backbone(seed=0):
    torch.manual_seed(seed)
    model = build_backbone(ARCH["backbone"], ARCH["embedding_size"])
    model.train()
    with torch.no_grad():  # BN statistics from a forward pass, so embeddings behave like a trained model's
        model(torch.rand(8, 3, 112, 112) * 2 - 1)
    return model.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    synthesize(root / "synth", identities=2, images_per_identity=1, seed=5, difficulty=0.2, held_out_identities=30,
               num_pairs=20, progress=False)
    ckpt = root / "ckpt"
    model = backbone()
    TrainCheckpoint(model, torch.nn.Linear(64, 2), {}, TrainProgress(), arch=ARCH).save(ckpt, rank=0)
    return {"root": root, "bin": root / "synth" / "verification.bin", "ckpt": ckpt, "model": model}


def ijb_files(root, images):
    """An IJB-style set from .bin images: 6 templates of 2 media each, pairs of templates, detector scores."""
    img_dir = root / "ijb_images"
    img_dir.mkdir()
    lines, scores = [], []
    for i, img in enumerate(images[:24]):
        (img_dir / f"{i}.jpg").write_bytes(simplejpeg.encode_jpeg(img, quality=95))
        lines.append(f"{i}.jpg {i // 4} {i // 2}")
        scores.append(f"{i}.jpg 38 52 74 52 56 72 42 92 71 92 {0.5 + i / 48:.3f}")  # name, 5 landmarks, score
    (root / "tid_mid.txt").write_text("\n".join(lines) + "\n")
    pairs = [f"{a} {b} {int(a == b)}" for a in range(6) for b in range(6) if a <= b]
    (root / "pairs.txt").write_text("\n".join(pairs) + "\n")
    (root / "name_5pts_score.txt").write_text("\n".join(scores) + "\n")
    return root / "tid_mid.txt", root / "pairs.txt", img_dir, root / "name_5pts_score.txt"


def test_eval_checkpoint_all_protocols(data, tmp_path, capsys):
    images, issame = load_bin(data["bin"])
    meta, pairs, img_dir, scores = ijb_files(tmp_path, images)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(data["ckpt"]), "--bin", str(data["bin"]), "--ijb-meta", str(meta),
               "--ijb-pairs", str(pairs), "--ijb-images", str(img_dir), "--ijb-scores", str(scores),
               "--id-synthetic", "--id-enrolled", "6",
               "--id-non-mated", "4", "--id-rendered-distractors", "20", "--id-max-distractors", "3000",
               "--distractor-counts", "10", "1000", "--out", str(out), "--tracking-uri", uri,
               "--artifact-root", str(tmp_path / "art")])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "accuracy (10-fold)" in printed and "rank-1 identification" in printed and "TPR@FPR=1e-1" in printed
    report = json.loads((out / "report.json").read_text())
    sets = {s["name"]: s for s in report["sets"]}
    expected = evaluate(compute_embeddings(data["model"], images), issame)
    assert sets["verification"]["accuracy_mean"] == pytest.approx(expected["accuracy_mean"])
    assert sets["pairs"]["num_templates"] == 6 and sets["pairs"]["num_genuine"] == 6
    assert sets["pairs"]["weighting"] == "both" and "IJB weighting: both" in printed
    assert sets["synthetic_1n"]["distractor_counts"] == [0, 10, 1000, 3000]
    for png in ("roc.png", "det.png", "quality_rejection.png", "rank1_vs_distractors.png"):
        assert (out / png).stat().st_size > 1000

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("facescale-eval")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["verification/accuracy"] == pytest.approx(expected["accuracy_mean"])
    assert "synthetic_1n/rank1_at_3000" in run.data.metrics and "pairs/tpr_at_fpr_1e-1" in run.data.metrics
    assert run.data.params["ijb_weighting"] == "both" and run.data.tags["facescale.ijb_weighting"] == "both"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/roc.png", "plots/det.png"}


def bad_bin(path, images, labels):
    with open(path, "wb") as f:
        pickle.dump((images, labels), f)
    return str(path)


def test_bad_input_exits_2_naming_the_problem(data, tmp_path, capsys):
    jpeg = simplejpeg.encode_jpeg(np.zeros((112, 112, 3), np.uint8))
    cases = [
        (["--bin", bad_bin(tmp_path / "odd.bin", [jpeg] * 3, [True])], "odd.bin: 3 images is an odd number"),
        (["--bin", bad_bin(tmp_path / "n.bin", [jpeg] * 4, [True] * 3)], "n.bin: 4 images make 2 pairs but"),
        (["--bin", str(tmp_path / "missing.bin")], "verification file not found"),
        ([], "nothing to evaluate"),
    ]
    (tmp_path / "m.txt").write_text("a.jpg 1 1\nb.jpg 2 2\n")
    (tmp_path / "p.txt").write_text("1 2 0\n2 7 0\n")
    cases.append((["--ijb-meta", str(tmp_path / "m.txt"), "--ijb-pairs", str(tmp_path / "p.txt"), "--ijb-images",
                   str(tmp_path)], "p.txt:2: template 7 is not in"))
    for extra, message in cases:
        rc = main(["eval", "--model", str(data["ckpt"]), "--no-mlflow", "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (extra, err)
    for model in ("models:/nothing@here", str(tmp_path / "no_ckpt")):
        rc = main(["eval", "--model", model, "--bin", str(data["bin"]), "--no-mlflow",
                   "--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}"])
        assert rc == 2 and model in capsys.readouterr().err
    rc = main(["export", "--model", "runs:/0123456789abcdef0123456789abcdef/model", "--out", str(tmp_path / "x.onnx"),
               "--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}"])
    assert rc == 2 and "0123456789abcdef" in capsys.readouterr().err



@pytest.mark.integration
def test_eval_and_export_registered_model_on_mlflow_server(data, mlflow_server, tmp_path, capsys):
    run_id = start_run(mlflow_server, "facescale-train", "unused", "train", {}, "")
    model_id = Tracker(mlflow_server, run_id, 0).log_model(data["model"], registered_model_name="fs-cli", metadata=ARCH)
    end_run(mlflow_server, run_id, ok=True)
    client = MlflowClient(mlflow_server)
    client.set_registered_model_alias("fs-cli", "champion", "1")

    rc = main(["eval", "--model", "models:/fs-cli@champion", "--bin", str(data["bin"]), "--tracking-uri",
               mlflow_server, "--out", str(tmp_path / "out"), "--run-name", "eval-champion"])
    assert rc == 0, capsys.readouterr().err
    assert f"model id {model_id}" in capsys.readouterr().out
    (run,) = client.search_runs([client.get_experiment_by_name("facescale-eval").experiment_id])
    assert run.info.run_name == "eval-champion" and run.data.params["model_id"] == model_id
    assert [i.model_id for i in client.get_run(run.info.run_id).inputs.model_inputs] == [model_id]  # not in search
    linked = client.get_logged_model(model_id).metrics  # metrics logged with the model id show on the model
    assert any(m.key == "verification/accuracy" and m.run_id == run.info.run_id for m in linked)
    assert "plots/roc.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}

    rc = main(["export", "--model", "models:/fs-cli/1", "--out", str(tmp_path / "m.onnx"), "--tracking-uri",
               mlflow_server])
    assert rc == 0 and "onnxruntime matches PyTorch" in capsys.readouterr().out
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props["model_id"] == model_id and props["backbone"] == "iresnet_tiny"

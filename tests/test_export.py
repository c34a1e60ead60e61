"""ONNX export of every registered backbone: dynamic batch axis and parity with PyTorch in onnxruntime."""

import onnx
import pytest
import torch

from facescale.export import OnnxParityError, check_parity, export_onnx
from facescale.models import build_backbone, list_backbones

# The ViTs share one code path: vit_t (19 M parameters) stands for vit_s/b/l (76-256 M), whose export would cost
# seconds and hundreds of MB per test run.
HEAVY = {"vit_s", "vit_b", "vit_l"}


def calibrated(name, seed=0):
    """A backbone whose BatchNorm statistics are measured on random faces-range inputs, as a trained model's are.

    NOTE: with unit BN statistics (fresh init) deep residual stacks grow activations exponentially (iresnet200
    reaches ~1e23), and float32 rounding differences between runtimes then exceed any tolerance; a trained
    model's statistics keep activations O(1). One train-mode pass with cumulative averaging gives that here.
    """
    torch.manual_seed(seed)
    model = build_backbone(name, 512)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 112, 112) * 2 - 1)
    return model.eval()


@pytest.mark.parametrize("name", [n for n in list_backbones() if n not in HEAVY])
def test_every_backbone_exports_with_parity(name, tmp_path):
    model = calibrated(name)
    res = export_onnx(model, tmp_path / f"{name}.onnx", metadata={"backbone": name}, parity_batches=(2,))
    assert res.max_abs_diff <= 1e-4
    graph = onnx.load(str(res.path), load_external_data=False).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_dynamic_batch_metadata_and_restored_mode(tmp_path):
    model = calibrated("mobilefacenet").train()
    res = export_onnx(model, tmp_path / "sub" / "m.onnx", metadata={"backbone": "mobilefacenet", "source": "x"},
                      parity_batches=(1, 5))
    assert model.training  # export switches to eval for tracing and gives the mode back
    assert res.parity_batches == (1, 5) and res.size_mb > 1
    props = {p.key: p.value for p in onnx.load(str(res.path)).metadata_props}
    assert props["backbone"] == "mobilefacenet" and props["source"] == "x" and props["producer"] == "facescale"


def test_parity_failure_is_loud(tmp_path):
    res = export_onnx(calibrated("iresnet_tiny", seed=0), tmp_path / "a.onnx", parity_batches=(2,))
    other = calibrated("iresnet_tiny", seed=1)  # same graph, other weights: must not pass as "the same model"
    with pytest.raises(OnnxParityError, match="a.onnx.*differ by"):
        check_parity(other, res.path, batches=(2,))


def test_failed_export_parity_removes_the_file(tmp_path, monkeypatch):
    import facescale.export as export

    def broken(module, path, batches, atol):
        raise OnnxParityError(f"{path}: differ")

    monkeypatch.setattr(export, "check_parity", broken)
    with pytest.raises(OnnxParityError):
        export.export_onnx(calibrated("mobilefacenet"), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()

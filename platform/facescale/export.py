"""ONNX export of a backbone with a dynamic batch axis, checked against PyTorch in onnxruntime.

The exported graph takes what the PyTorch backbone takes: ``input`` float32 ``[batch, 3, 112, 112]``, RGB,
normalised as ``(pixel - 127.5) / 127.5``; it returns ``embedding`` float32 ``[batch, embedding_size]``
(un-normalised, like the backbone; the evaluation protocol adds the flipped image and L2-normalises).

Exporter: the TorchScript-based one (``dynamo=False``). torch 2.13 defaults to the dynamo exporter, which needs
the ``onnxscript`` package and goes through ``torch.export``; every registered backbone is plain convolutions,
BatchNorm, PReLU and pooling, or (the ViTs) LayerNorm, linear layers and ``scaled_dot_product_attention`` (exported
as MatMul/Softmax from opset 14), which the TorchScript exporter covers in seconds per model with no extra
dependency. Export runs in eval mode, so the ViTs' patch masking and drop-path are not in the graph. The exporter
is deprecated upstream: moving to ``dynamo=True`` means pinning ``onnxscript`` and re-running the parity test over
every backbone (``tests/test_export.py``).

Parity: after writing, the file is loaded in onnxruntime (CPU) and run on random inputs at batch sizes other
than the export example's (which also proves the batch axis is dynamic); the largest absolute difference of
L2-normalised embeddings must be at most ``1e-4``, else :class:`OnnxParityError` is raised and the file removed.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

PARITY_ATOL = 1e-4
DEFAULT_OPSET = 17
EXAMPLE_BATCH = 2


class OnnxParityError(RuntimeError):
    """The exported model's embeddings differ from PyTorch's by more than the tolerance; names the file."""


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and measured.

    Attributes:
        path: The ONNX file.
        max_abs_diff: Largest absolute difference of normalised embeddings, onnxruntime vs PyTorch.
        parity_batches: Batch sizes the parity check ran.
        opset: ONNX opset.
        size_mb: File size in MiB.
    """

    path: Path
    max_abs_diff: float
    parity_batches: tuple[int, ...]
    opset: int
    size_mb: float


def _normalised(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def check_parity(module: nn.Module, path: str | Path, batches: Sequence[int] = (1, 3), seed: int = 0,
                 atol: float = PARITY_ATOL) -> float:
    """Runs ``module`` and the ONNX file on the same random inputs; raises if normalised embeddings differ.

    Args:
        module: The PyTorch backbone (eval mode, CPU).
        path: The ONNX file.
        batches: Batch sizes to compare at.
        seed: Seed of the random inputs (uniform in ``[-1, 1]``, the normalised pixel range).
        atol: Tolerance on the max absolute difference.

    Returns:
        The largest difference seen.

    Raises:
        OnnxParityError: Difference above ``atol``, non-finite outputs, or wrong output shape.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batches:
        x = torch.rand(batch, 3, 112, 112, generator=gen) * 2 - 1
        with torch.no_grad():
            expected = module(x).numpy()
        got = session.run(["embedding"], {"input": x.numpy()})[0]
        if got.shape != expected.shape:
            raise OnnxParityError(f"{path}: onnxruntime returned {got.shape} for batch {batch}, "
                                  f"PyTorch {expected.shape}")
        if not (np.all(np.isfinite(got)) and np.all(np.isfinite(expected))):
            raise OnnxParityError(f"{path}: non-finite embeddings at batch {batch}")
        diff = float(np.max(np.abs(_normalised(got) - _normalised(expected))))
        worst = max(worst, diff)
        if diff > atol:
            scale = float(np.max(np.abs(expected)))
            raise OnnxParityError(
                f"{path}: ONNX and PyTorch normalised embeddings differ by {diff:.3g} > {atol:g} at batch {batch} "
                f"(largest PyTorch output magnitude {scale:.3g}; an untrained deep network with huge activations "
                "amplifies float32 rounding -- export a trained model)")
    return worst


def export_onnx(module: nn.Module, out_path: str | Path, metadata: dict[str, str] | None = None,
                opset: int = DEFAULT_OPSET, parity_batches: Sequence[int] = (1, 3),
                atol: float = PARITY_ATOL) -> ExportResult:
    """Exports ``module`` to ONNX with a dynamic batch axis, then checks parity in onnxruntime.

    Args:
        module: Backbone; exported in eval mode on CPU (its own mode is restored afterwards).
        out_path: ONNX file to write (parent directories are created).
        metadata: String key/values stored in the model's ``metadata_props`` (backbone name, source URI, ...).
        opset: ONNX opset version.
        parity_batches: Batch sizes of the parity check.
        atol: Parity tolerance on normalised embeddings.

    Returns:
        What was written and measured.

    Raises:
        OnnxParityError: The parity check failed (the file is removed).
    """
    import onnx

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module = module.cpu().eval()
    try:
        example = torch.zeros(EXAMPLE_BATCH, 3, 112, 112)
        buffer = io.BytesIO()  # exported in memory: metadata is added before the one write to disk
        with warnings.catch_warnings():
            # NOTE: the legacy exporter warns that it is deprecated on every call; the module docstring says why
            # we use it, and the warning would bury the parity line users look for.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["embedding"],
                              dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}})
        model = onnx.load_from_string(buffer.getvalue())
        del buffer
        for key, value in {"producer": "facescale", "input_normalisation": "(rgb - 127.5) / 127.5, NCHW",
                           **(metadata or {})}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.checker.check_model(model)
        onnx.save(model, str(out))
        del model
        try:
            diff = check_parity(module, out, parity_batches, atol=atol)
        except OnnxParityError:
            out.unlink(missing_ok=True)
            raise
    finally:
        module.train(was_training)
    return ExportResult(path=out, max_abs_diff=diff, parity_batches=tuple(parity_batches), opset=opset,
                        size_mb=out.stat().st_size / 2**20)

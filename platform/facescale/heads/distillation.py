"""Angular distillation loss of VarGFaceNet (Yan et al., "VarGFaceNet: An Efficient Variable Group Convolutional
Neural Network for Lightweight Face Recognition", ICCVW 2019, arXiv:1910.04985, section 3.3).

The student is trained to point its embedding in the teacher's direction; the norms are free. Two forms from the
paper:

- eq. 4: ``L = mean_i (1 - cos(F_t_i, F_s_i))^2``
- eq. 5: ``L = mean_i || F_t_i / ||F_t_i|| - F_s_i / ||F_s_i|| ||_2^2``  (= ``2 (1 - cos)``, the default)

and the total loss ``L = L_margin + alpha * L_distill`` with ``alpha = 7`` (the paper's setting).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DistillForm = Literal["eq4", "eq5"]
DEFAULT_ALPHA = 7.0  # VarGFaceNet section 3.3: weight of the angular distillation term
_EPS = 1e-12


def angular_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, form: DistillForm = "eq5") -> torch.Tensor:
    """Angular distillation loss between student and teacher embeddings (batch mean).

    Args:
        student: ``[B, D]`` student embeddings (any norm; gradients flow into them).
        teacher: ``[B, D]`` teacher embeddings (any norm; treated as a constant target).
        form: ``"eq4"`` -- ``(1 - cos)^2`` -- or ``"eq5"`` -- squared distance of the unit vectors.

    Returns:
        The scalar loss.

    Raises:
        ValueError: On mismatched shapes (a student whose embedding size differs from the teacher's) or an unknown
            form.
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"student embeddings {tuple(student.shape)} and teacher embeddings "
                         f"{tuple(teacher.shape)} must both be [B, D] with the same D")  # fmt: skip
    s = F.normalize(student, dim=1, eps=_EPS)
    t = F.normalize(teacher.detach().to(student.dtype), dim=1, eps=_EPS)
    if form == "eq4":
        return (1.0 - (s * t).sum(dim=1)).pow(2).mean()
    if form == "eq5":
        return (t - s).pow(2).sum(dim=1).mean()
    raise ValueError(f"distillation form must be 'eq4' or 'eq5', got {form!r}")

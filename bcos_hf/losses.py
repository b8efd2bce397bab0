"""The losses and the gradient clipping of the B-cosification recipe (Arya et al., NeurIPS 2024): binary
cross-entropy, logit distillation, SigLIP distillation of image embeddings, adaptive gradient clipping."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIGLIP_SCALE = 10.0
SIGLIP_BIAS = -10.0
"""The fixed scale and bias of the SigLIP distillation loss of B-cosified CLIP (Arya et al., NeurIPS 2024)."""


def bce_loss(logits: torch.Tensor, labels: torch.Tensor, off_target: float | None = None) -> torch.Tensor:
    """Binary cross-entropy of the recipe: target 1 for the true class, ``off_target`` (default 1/C) elsewhere.

    ``logits`` already include the model's logit bias (``-log(C - 1)`` after conversion: every class starts
    at probability 1/C). The mean over batch and classes, computed in float32.
    """
    num_classes = logits.shape[-1]
    off = 1.0 / num_classes if off_target is None else off_target
    targets = torch.full(logits.shape, off, dtype=torch.float32, device=logits.device)
    targets.scatter_(1, labels.view(-1, 1), 1.0)
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) || softmax(student / T))``, batch mean, float32 (Hinton et al. 2015)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def siglip_distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, scale: float = SIGLIP_SCALE, bias: float = SIGLIP_BIAS
) -> torch.Tensor:
    """SigLIP loss between image embeddings: each student image must match its own teacher embedding only.

    Both are L2-normalised (float32); ``logits = scale * s @ t.T + bias``, label +1 on the diagonal and -1
    elsewhere, ``loss = -sum(log sigmoid(label * logit)) / batch``. No captions are needed.
    """
    student = F.normalize(student.float(), dim=-1)
    teacher = F.normalize(teacher.float(), dim=-1)
    logits = scale * student @ teacher.T + bias
    labels = 2 * torch.eye(len(student), device=logits.device) - 1
    return -F.logsigmoid(labels * logits).sum() / len(student)


def _unit_norms(tensor: torch.Tensor) -> torch.Tensor:
    """Norm per unit: per row of a weight / filter of a conv (dim 0), whole-tensor for vectors and scalars."""
    dims = None if tensor.ndim <= 1 else tuple(range(1, tensor.ndim))
    return torch.linalg.vector_norm(tensor.float(), dim=dims, keepdim=tensor.ndim > 1)


@torch.no_grad()
def adaptive_clip_grad_(parameters, clip_factor: float = 0.01, eps: float = 1e-3) -> torch.Tensor:
    """Adaptive gradient clipping (Brock et al. 2021), in place; returns the total gradient norm before clipping.

    Each unit's gradient norm is capped at ``clip_factor * max(‖unit‖, eps)``: a bound relative to the weights,
    which suits B-cos fine-tuning where layers' weight norms differ by orders of magnitude.
    """
    squares = []
    for parameter in parameters:
        if parameter.grad is None:
            continue
        grad_norm = _unit_norms(parameter.grad)
        squares.append(grad_norm.square().sum())
        max_norm = _unit_norms(parameter).clamp_min(eps) * clip_factor
        scale = (max_norm / grad_norm.clamp_min(1e-6)).clamp(max=1.0)
        parameter.grad.mul_(scale.to(parameter.grad.dtype))
    if not squares:
        return torch.tensor(0.0)
    return torch.stack(squares).sum().sqrt()

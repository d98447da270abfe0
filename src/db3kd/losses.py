"""Distillation losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import choice
from .errors import ConfigError


@dataclass(frozen=True)
class KDLoss:
    """Cross-entropy on hard labels plus KL divergence to soft targets at temperature T (Hinton et al. 2015).

        loss = ce_weight * CE(s, y) + kd_weight * scale * KL(softmax(z / T) || softmax(s / T))

    where s are the student's logits, z the soft-label logits (DB3KD: 1/d_t for t != c, the sum of those for
    c; or a teacher's logits for standard KD), y the hard labels, and scale = T^2 if `t2_scaling`.

    Paper defaults (DB3KD, Wang 2021, and its reference code): T = 20, both weights 1, no T^2 scaling, and
    the KL term summed over the batch (`reduction="sum"`) while CE is averaged, so the soft targets dominate.
    `reduction="batchmean"` averages the KL term over the batch instead (the textbook form).

    Rows whose soft logits are NaN (images with a hard label only, e.g. teacher-labelled mixtures) get
    the CE term alone.
    """

    temperature: float = 20.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    t2_scaling: bool = False
    reduction: str = "sum"

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        if self.ce_weight < 0 or self.kd_weight < 0 or self.ce_weight + self.kd_weight == 0:
            raise ConfigError(f"expected non-negative weights, not both 0, got ce_weight={self.ce_weight}, kd_weight={self.kd_weight}")
        choice(self.reduction, "reduction", ("sum", "batchmean"))

    def __call__(self, student_logits: torch.Tensor, labels: torch.Tensor, soft_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        soft = torch.isfinite(soft_logits).all(dim=1)
        kl = F.kl_div(F.log_softmax(student_logits[soft] / t, dim=1), F.log_softmax(soft_logits[soft] / t, dim=1),
                      reduction="sum", log_target=True)
        if self.reduction == "batchmean":
            kl = kl / max(int(soft.sum()), 1)
        if self.t2_scaling:
            kl = kl * t * t
        return self.ce_weight * F.cross_entropy(student_logits, labels) + self.kd_weight * kl

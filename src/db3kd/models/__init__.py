"""Model zoo: teachers and students of ZSKD / DB3KD, built by name.

    model = build_model("lenet5-half", (1, 28, 28), num_classes=10)

Every model takes raw images in [0, 1], float32 (N, C, H, W), and returns logits (N, num_classes). There is
no normalisation layer inside: the reference code trains on unnormalised `ToTensor()` images, and the
benchmark teacher expects them too.
"""

from db3kd.models.registry import available_models, build_model, count_parameters, register_model

# Imported for their side effect: each family registers its builders.
from db3kd.models import alexnet, lenet, resnet  # noqa: F401  isort: skip

__all__ = ["available_models", "build_model", "count_parameters", "register_model"]

"""db3kd: decision-based black-box knowledge distillation from label-only teachers."""

__version__ = "0.1.0"

from .checkpoint import ModelSpec, export_onnx, load_checkpoint, save_checkpoint  # noqa: E402
from .data import DATASETS, load_dataset, load_split  # noqa: E402
from .errors import (  # noqa: E402
    BudgetExceededError,
    ConfigError,
    DataError,
    DB3KDError,
    InputError,
    TeacherConnectionError,
    TeacherError,
)
from .models import available_models, build_model  # noqa: E402
from .oracle import LabelOracle, open_oracle  # noqa: E402
from .teachers import TeacherSpec, load_teacher  # noqa: E402

__all__ = [
    "DATASETS", "BudgetExceededError", "ConfigError", "DataError", "DB3KDError", "InputError", "LabelOracle",
    "ModelSpec", "TeacherConnectionError", "TeacherSpec", "TeacherError", "available_models", "build_model", "export_onnx",
    "load_checkpoint", "load_dataset", "load_split", "load_teacher", "open_oracle", "save_checkpoint",
]

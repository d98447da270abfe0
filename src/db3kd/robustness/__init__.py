"""How far each sample is from the teacher's decision boundary toward every other class (DB3KD's SD, BD, MBD).

Estimators are objects holding their hyper-parameters, called on batches (`estimator(oracle, x, labels,
reference_x, reference_y)`); each returns a `RobustnessResult` of (N, K) distances and per-pair query counts.
`distances_to_logits` turns distances into the paper's soft labels. A new estimator subclasses `Estimator`
and writes only its `_search` (see `base.py`).
"""

from .base import Estimator, LabelQueries, RobustnessResult
from .boundary import BoundaryDistance
from .logits import distances_to_logits
from .minimal import MinimalBoundaryDistance
from .registry import ESTIMATORS, estimator_from_name
from .sample import SampleDistance

__all__ = [
    "ESTIMATORS", "BoundaryDistance", "Estimator", "LabelQueries", "MinimalBoundaryDistance", "RobustnessResult",
    "SampleDistance", "distances_to_logits", "estimator_from_name",
]

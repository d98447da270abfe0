"""How far each sample is from the teacher's decision boundary toward every other class (DB3KD's SD, BD, MBD).

Estimators are objects holding their hyper-parameters, called on batches; each returns a
`RobustnessResult` of (N, K) distances and per-pair query counts. `distances_to_logits` turns distances
into the paper's soft labels.
"""

from ._common import RobustnessResult
from .boundary import BoundaryDistance
from .minimal import MinimalBoundaryDistance
from .registry import ESTIMATORS, estimator_from_name
from .sample import SampleDistance
from .softlabels import distances_to_logits

__all__ = [
    "ESTIMATORS", "BoundaryDistance", "MinimalBoundaryDistance", "RobustnessResult", "SampleDistance",
    "distances_to_logits", "estimator_from_name",
]

"""The estimators by name: 'sd', 'bd', 'mbd'."""

from __future__ import annotations

import inspect

from ..errors import ConfigError
from .boundary import BoundaryDistance
from .minimal import MinimalBoundaryDistance
from .sample import SampleDistance

ESTIMATORS = {"sd": SampleDistance, "bd": BoundaryDistance, "mbd": MinimalBoundaryDistance}


def estimator_from_name(name: str, **params):
    """The estimator called `name`, built with `params`; unknown names and parameters are refused."""
    if not isinstance(name, str) or name not in ESTIMATORS:
        raise ConfigError(f"unknown robustness estimator {name!r}; expected one of {', '.join(map(repr, ESTIMATORS))}")
    cls = ESTIMATORS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for estimator {name!r}; "
                          f"expected some of {', '.join(map(repr, accepted))}")
    return cls(**params)

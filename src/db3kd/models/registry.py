"""Models by name: a registry of builders and the one checked way to call them.

A builder is `builder(input_shape, num_classes, *, option=default, ...) -> nn.Module`. Its keyword-only
parameters are the options `build_model` accepts for that name; anything else is refused, so a typo in a
recipe fails loudly instead of silently building the default network.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from numbers import Integral

from torch import nn

from db3kd.errors import ConfigError

Builder = Callable[..., nn.Module]

_BUILDERS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding `builder(input_shape, num_classes, **options)` to the registry under `name`."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name: expected a non-empty string, got {name!r}")

    def decorate(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ConfigError(f"model name {name!r} is already registered (by {_BUILDERS[name].__qualname__})")
        _BUILDERS[name] = builder
        return builder

    return decorate


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_BUILDERS)


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int, **kwargs) -> nn.Module:
    """Build a freshly initialised model (in training mode) taking (N, C, H, W) images, returning (N, classes) logits.

    Args:
        name: one of `available_models()`.
        input_shape: (channels, height, width) of one image.
        num_classes: number of output logits, at least 2.
        **kwargs: options of that model's builder (see its docstring); unknown ones raise ConfigError.
    """
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(available_models())}")
    builder = _BUILDERS[name]
    shape = check_input_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 2:
        raise ConfigError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
    options = _keyword_options(builder)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        accepted = ", ".join(options) if options else "none"
        raise ConfigError(f"model {name!r}: unknown option(s) {', '.join(unknown)}; accepted options: {accepted}")
    return builder(shape, int(num_classes), **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (BatchNorm running statistics are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """Return `input_shape` as a tuple of 3 positive ints, or raise ConfigError."""
    if (
        not isinstance(input_shape, (tuple, list))
        or len(input_shape) != 3
        or any(isinstance(v, bool) or not isinstance(v, Integral) or v < 1 for v in input_shape)
    ):
        raise ConfigError(
            f"input_shape: expected 3 positive integers (channels, height, width), got {input_shape!r}"
        )
    c, h, w = (int(v) for v in input_shape)
    return c, h, w


def _keyword_options(builder: Builder) -> list[str]:
    params = inspect.signature(builder).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]

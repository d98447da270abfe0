"""Exceptions raised by db3kd. Every one says what is wrong and what to do about it."""

from __future__ import annotations


class DB3KDError(Exception):
    """Base class of every error db3kd raises on purpose."""

    # Set by a backend whose batch needed several requests and failed after the teacher had answered (and so
    # been paid for) its first `answered` images; `LabelOracle.labels` counts them before re-raising.
    answered: int = 0
    # Set with `answered` when those images are not the first ones of the batch (requests sent in parallel):
    # their positions in the batch the backend was given, so the oracle counts the right samples.
    answered_at: tuple[int, ...] | None = None


class DataError(DB3KDError):
    """A dataset is missing, corrupt or not in the expected format."""


class ConfigError(DB3KDError, ValueError):
    """A hyper-parameter, model spec or command-line value is invalid."""


class InputError(DB3KDError, ValueError):
    """A batch given to the oracle has the wrong shape, dtype or values."""


class TeacherError(DB3KDError):
    """The teacher could not be loaded or answered something other than valid labels."""


class TeacherConnectionError(TeacherError):
    """A remote teacher could not be reached, even after retries."""


class TeacherRateLimitError(TeacherConnectionError):
    """A remote teacher kept answering "too many requests" (HTTP 429) for longer than the client would wait."""


class BudgetExceededError(DB3KDError):
    """A query would exceed the oracle's budget. Raised before anything is sent.

    Attributes:
        used: queries spent so far.
        budget: the budget.
        requested: images in the refused call.
    """

    def __init__(self, used: int, budget: int | None, requested: int, advice: str | None = None):
        self.used, self.budget, self.requested, self.advice = used, budget, requested, advice
        advice = advice or "Raise the budget or stop here; results so far are kept."
        # budget None: a worker's oracle refused by a shared budget it does not hold (the driver reports that one).
        of = "" if budget is None else f" of {budget}"
        left = "" if budget is None else f" ({budget - used} left)"
        super().__init__(
            f"query budget exceeded: {used}{of} queries used, this call needs {requested} more{left}. {advice}"
        )

    def __reduce__(self):  # pickled with its fields (it crosses process boundaries from distributed workers)
        return type(self), (self.used, self.budget, self.requested, self.advice)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, Ray, `docker stop`), raised where the program is, so that it stops as on Ctrl-C:
    the queries of the work in flight are recorded before it ends."""


class ExecutorError(DB3KDError):
    """A distributed run could not start, or a shard failed on every attempt."""


class CheckpointError(DB3KDError):
    """A model file is missing, unreadable or not a db3kd checkpoint."""

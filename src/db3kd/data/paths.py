"""Where datasets live on disk."""

from __future__ import annotations

import os
from pathlib import Path

from db3kd.errors import ConfigError

ENV_VAR = "DB3KD_DATA"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the data directory: `data_dir` if given, else $DB3KD_DATA, else a per-user cache.

    The per-user default is $XDG_CACHE_HOME/db3kd/data, or ~/.cache/db3kd/data when XDG_CACHE_HOME is
    unset or relative (the XDG spec says to ignore relative values). Nothing is created or read here.
    """
    if data_dir is not None:
        if not isinstance(data_dir, (str, os.PathLike)):
            raise ConfigError(f"data_dir must be a str, os.PathLike or None, got {type(data_dir).__name__}")
        if os.fspath(data_dir) == "":
            # Path("") is the working directory: almost certainly an unset variable, not a choice.
            raise ConfigError("data_dir is an empty string; pass a directory or None for the default")
        return Path(data_dir).expanduser()
    from_env = os.environ.get(ENV_VAR, "")
    if from_env:
        return Path(from_env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"
    return base / "db3kd" / "data"

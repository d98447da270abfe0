"""Results written shard by shard, so a long run survives a crash, kill -9 or Ctrl-C and resumes.

A shard store is a directory with `fingerprint.json` (everything that determines the results: teacher,
method, parameters, seed, sample selection, shard size) and `shards/NNNNN.npz`, each written atomically
(`db3kd.io`), so a shard file is either complete or absent. A rerun with the same fingerprint skips finished
shards; a rerun with a different one is refused rather than mixed, unless no shard was finished (nothing to
mix: the directory is taken over).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError
from .io import load_npz, save_npz, write_json


class ShardStore:
    """Atomic, fingerprinted shard files under `root`.

    Args:
        root: the run directory.
        fingerprint: JSON-serialisable description of everything that determines the results.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: dict):
        self.root = Path(root)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))  # normalise tuples etc.
        self.shard_dir = self.root / "shards"
        if self.root.exists() and not self.root.is_dir():
            raise DataError(f"{self.root} is a file; expected a directory for the results (choose another --out)")
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self._check_fingerprint()
        for leftover in self.shard_dir.glob("*.tmp"):
            leftover.unlink()  # a shard interrupted mid-write; it will be recomputed

    def _check_fingerprint(self) -> None:
        path = self.root / "fingerprint.json"
        if not path.exists() or not any(self.shard_dir.glob("*.npz")):  # a new run, or one that finished nothing
            write_json(path, self.fingerprint)
            return
        try:
            existing = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path} is unreadable ({e}); delete the run directory {self.root} to start over") from e
        if existing != self.fingerprint:
            diffs = [f"{k}: was {existing.get(k)!r}, now {self.fingerprint.get(k)!r}"
                     for k in sorted(set(existing) | set(self.fingerprint)) if existing.get(k) != self.fingerprint.get(k)]
            raise ConfigError(
                f"{self.root} holds shards of a different run ({'; '.join(diffs)}). "
                "Use another --out directory, or delete this one to start over."
            )

    def path(self, shard: int) -> Path:
        return self.shard_dir / f"{shard:05d}.npz"

    @staticmethod
    def written(root: str | os.PathLike) -> set[int]:
        """The shards written under `root` so far, read without opening the store (its fingerprint is checked
        when it is opened to compute the rest)."""
        return {int(p.stem) for p in (Path(root) / "shards").glob("[0-9]*.npz")}

    def done(self, shard: int) -> bool:
        return self.path(shard).exists()

    def write(self, shard: int, **arrays: np.ndarray) -> Path:
        """Write one shard atomically: complete or absent, never half-written."""
        return save_npz(self.path(shard), **arrays)

    def read(self, shard: int) -> dict[str, np.ndarray]:
        return load_npz(self.path(shard), "delete it and rerun the same command to recompute it")

    def merge(self, shards: range | list[int]) -> dict[str, np.ndarray]:
        """Concatenate the arrays of `shards` along their first axis, in order."""
        parts = [self.read(s) for s in shards]
        if not parts:
            return {}
        return {key: np.concatenate([p[key] for p in parts], axis=0) for key in parts[0]}

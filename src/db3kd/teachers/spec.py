"""A teacher as the command line and recipes name it, parsed once: a model file or a label service URL."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data.download import file_digest
from ..errors import ConfigError, TeacherError
from .base import LabelBackend

SUFFIXES = {".onnx": "onnx", ".pt": "torch", ".pth": "torch"}


@dataclass(frozen=True)
class TeacherSpec:
    """What `--teacher SPEC` names: `path/model.onnx` (ONNX Runtime), `path/model.pt` (a `db3kd train-teacher`
    checkpoint, PyTorch) or `http(s)://host:port` (a label service speaking `db3kd serve`'s protocol).

    It also owns the thread policy of a run against it (`thread_policy`) and how the teacher travels to
    distributed workers (`shippable`: a file's bytes go with the spec, a service is reached by URL).
    """

    text: str
    kind: str  # onnx | torch | http
    api_key: str | None = field(default=None, repr=False)  # for a label service only
    payload: bytes | None = field(default=None, repr=False)  # the file's bytes, once shipped

    @classmethod
    def parse(cls, spec: str | os.PathLike | TeacherSpec, api_key: str | None = None) -> TeacherSpec:
        """The spec of `spec` (a TeacherSpec is returned as is); the API key is kept for a service only."""
        if isinstance(spec, TeacherSpec):
            return spec
        text = os.fspath(spec)
        if text.startswith(("http://", "https://")):
            return cls(text, "http", api_key=api_key or None)
        kind = SUFFIXES.get(Path(text).suffix.lower())
        if kind is None:
            raise ConfigError(f"cannot tell what kind of teacher {text!r} is: expected a .pt checkpoint, an .onnx "
                              "file or an http(s):// URL of a label service")
        return cls(text, kind)

    @property
    def is_file(self) -> bool:
        return self.kind != "http"

    @contextlib.contextmanager
    def thread_policy(self) -> Iterator[None]:
        """Inside, torch runs on one thread unless torch is the teacher (the previous count is restored after).

        The searches use torch only for small-batch bookkeeping while ONNX Runtime or a service answers, and
        torch's idle OpenMP threads would spin against the teacher's on the same cores (measured on 2 loaded
        cores: 3 to 6 times slower)."""
        import torch

        before = torch.get_num_threads()
        if self.kind != "torch":
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def load(self, threads: int | None = None, **options) -> LabelBackend:
        """The backend; `threads` bounds an ONNX teacher's intra-op threads, `options` go to its constructor."""
        if self.kind == "http":
            from .http_backend import HttpBackend

            return HttpBackend(self.text, api_key=self.api_key, **options)
        path = Path(self.text) if self.payload is None else self._materialise()
        if not path.is_file():
            raise TeacherError(f"teacher not found: {path}")
        if self.kind == "onnx":
            from .onnx_backend import OnnxBackend

            return OnnxBackend(path, threads=threads, **options)
        from .torch_backend import TorchBackend

        return TorchBackend.from_checkpoint(path, **options)

    def shippable(self) -> TeacherSpec:
        """This spec with its file's bytes inside, for workers without the driver's file system."""
        if not self.is_file or self.payload is not None:
            return self
        path = Path(self.text)
        if not path.is_file():
            raise TeacherError(f"teacher not found: {path}")
        return replace(self, payload=path.read_bytes())

    def identity(self) -> str:
        """What a run records of its teacher: a file's SHA-256 (a retrained teacher is another teacher), or the URL."""
        if not self.is_file:
            return self.text
        if self.payload is not None:
            return "sha256:" + hashlib.sha256(self.payload).hexdigest()
        try:
            return "sha256:" + file_digest(Path(self.text))
        except OSError as e:
            raise TeacherError(f"cannot read the teacher {self.text}: {e.strerror or e}") from e

    def _materialise(self) -> Path:
        """The shipped bytes as a file of this machine (one per content; concurrent workers race harmlessly)."""
        path = Path(tempfile.gettempdir()) / "db3kd-teachers" / f"{self.identity().split(':')[1]}{Path(self.text).suffix}"
        if not path.exists() or path.stat().st_size != len(self.payload):
            from ..io import atomic_write

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: f.write(self.payload))
        return path

"""A teacher as the command line and recipes name it, parsed once: a model file, a label service or V2 server URL,
or a Python callable; with how it is asked (requests in flight, a rate limit) and what it costs."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data.download import file_digest
from ..errors import ConfigError, TeacherError
from .base import LabelBackend

SUFFIXES = {".onnx": "onnx", ".pt": "torch", ".pth": "torch"}
FILE_KINDS = ("onnx", "torch")
REMOTE_KINDS = ("http", "v2")  # reached over the network, with an API key
CALLING_OPTIONS = ("concurrency", "max_rps")  # how a teacher is asked: services and Python callables only


@dataclass(frozen=True)
class TeacherSpec:
    """What `--teacher SPEC` names: `path/model.onnx` (ONNX Runtime), `path/model.pt` (a `db3kd train-teacher`
    checkpoint, PyTorch), `http(s)://host:port` (a label service speaking `db3kd serve`'s protocol),
    `v2+http(s)://host:port/models/NAME` (a model on an Open Inference Protocol server: Triton, KServe, MLServer,
    TorchServe) or `python:package.module:function` (any Python callable, or `module:Class`).

    Besides what it names, it holds how the teacher is asked, for services and Python callables: `concurrency`
    (requests in flight) and `max_rps` (most requests per second); and what it costs: `price_per_1000` (USD per
    1000 images) and `budget_usd` (most USD to spend; `LabelOracle`s opened on the spec turn it into a query
    budget). It also owns the thread policy of a run against it (`thread_policy`) and how the teacher travels to
    distributed workers (`shippable`: a file's bytes go with the spec, a service is reached by URL, a Python
    callable imported by its path).
    """

    text: str
    kind: str  # onnx | torch | http | v2 | python
    api_key: str | None = field(default=None, repr=False)  # for a label service or V2 server only
    payload: bytes | None = field(default=None, repr=False)  # the file's bytes, once shipped
    concurrency: int | None = None  # None: the backend's default, 1
    max_rps: float | None = None  # None: no limit
    price_per_1000: float | None = None  # USD per 1000 images; None: not known
    budget_usd: float | None = None  # None: no money budget

    def __post_init__(self):
        def expect(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        def positive(value, integer: bool = False) -> bool:
            number = isinstance(value, int) if integer else isinstance(value, (int, float))
            return number and not isinstance(value, bool) and 0 < value < math.inf

        expect(self.concurrency is None or positive(self.concurrency, integer=True), "concurrency",
               "a positive integer")
        expect(self.max_rps is None or positive(self.max_rps), "max_rps", "a positive number of requests per second")
        expect(self.price_per_1000 is None or positive(self.price_per_1000), "price_per_1000",
               "a positive number of USD")
        expect(self.budget_usd is None or positive(self.budget_usd) or self.budget_usd == 0, "budget_usd",
               "a non-negative number of USD")
        given = [name for name in CALLING_OPTIONS if getattr(self, name) is not None]
        if given and self.is_file:
            raise ConfigError(f"{given[0]}: applies to a label service, a V2 server or a Python teacher, not to the "
                              f"{self.kind} file {self.text}, which runs in this process")
        if self.budget_usd is not None and self.price_per_1000 is None:
            raise ConfigError("budget_usd: needs the teacher's price (price_per_1000, USD per 1000 images) to turn "
                              "into a number of queries")

    @classmethod
    def parse(cls, spec: str | os.PathLike | TeacherSpec, api_key: str | None = None) -> TeacherSpec:
        """The spec of `spec` (a TeacherSpec is returned as is); the API key is kept for a service only."""
        if isinstance(spec, TeacherSpec):
            return spec
        text = os.fspath(spec)
        if text.startswith(("http://", "https://")):
            return cls(text, "http", api_key=api_key or None)
        if text.startswith("v2+"):
            from .v2_protocol import parse_v2_url

            parse_v2_url(text)  # a malformed URL is refused now, before anything runs
            return cls(text, "v2", api_key=api_key or None)
        if text.startswith("python:"):
            module, _, attribute = text.removeprefix("python:").partition(":")
            if not module or not attribute:
                raise ConfigError(f"expected a Python teacher as python:package.module:function or "
                                  f"python:module:Class, got {text!r}")
            return cls(text, "python")
        kind = SUFFIXES.get(Path(text).suffix.lower())
        if kind is None:
            raise ConfigError(f"cannot tell what kind of teacher {text!r} is: expected a .pt checkpoint, an .onnx "
                              "file, an http(s):// URL of a label service, a v2+http(s)://host:port/models/NAME "
                              "URL of an inference server, or python:package.module:function")
        return cls(text, kind)

    def with_options(self, **options) -> TeacherSpec:
        """This spec with `concurrency`, `max_rps`, `price_per_1000` or `budget_usd` set (None: left as is)."""
        return replace(self, **{key: value for key, value in options.items() if value is not None})

    @property
    def is_file(self) -> bool:
        return self.kind in FILE_KINDS

    @contextlib.contextmanager
    def thread_policy(self) -> Iterator[None]:
        """Inside, torch runs on one thread unless torch is the teacher (the previous count is restored after).

        The searches use torch only for small-batch bookkeeping while ONNX Runtime or a service answers, and
        torch's idle OpenMP threads would spin against the teacher's on the same cores (measured on 2 loaded
        cores: 3 to 6 times slower)."""
        import torch

        before = torch.get_num_threads()
        if self.kind not in ("torch", "python"):  # a Python teacher may well run torch itself
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def load(self, threads: int | None = None, **options) -> LabelBackend:
        """The backend; `threads` bounds an ONNX teacher's intra-op threads, `options` go to its constructor."""
        calling = {name: getattr(self, name) for name in CALLING_OPTIONS if getattr(self, name) is not None}
        if self.kind == "http":
            from .http_backend import HttpBackend

            return HttpBackend(self.text, api_key=self.api_key, **calling, **options)
        if self.kind == "v2":
            from .v2_backend import V2Backend

            return V2Backend(self.text, api_key=self.api_key, **calling, **options)
        if self.kind == "python":
            from .python_backend import PythonBackend

            return PythonBackend.from_path(self.text.removeprefix("python:"), **calling, **options)
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
        """What a run records of its teacher: a file's SHA-256 (a retrained teacher is another teacher), a URL, or
        a Python teacher's path with its own `identity` / `version` attribute (read without instantiating it)."""
        if self.kind == "python":
            from .python_backend import identity_of, resolve

            path = self.text.removeprefix("python:")
            return identity_of(path, resolve(path))
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

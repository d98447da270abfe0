"""`db3kd serve MODEL`: a teacher as a label-only HTTP service (protocol in `db3kd.serve`).

Serve a teacher over HTTP, answering only top-1 labels: GET /info, POST /labels (a .npy batch).
"""

from __future__ import annotations

from .common import command

import argparse
import logging
import os

from ..errors import ConfigError


def register(subparsers) -> None:
    parser = command(subparsers, "serve", run, "serve a teacher as a label-only HTTP service")
    parser.add_argument("model", metavar="MODEL", help="the teacher: a model.pt checkpoint or a model.onnx file")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    parser.add_argument("--api-key", default=os.environ.get("DB3KD_API_KEY"),
                        help="bearer token clients must send (default: $DB3KD_API_KEY; none: an open service)")
    parser.add_argument("--max-batch", type=int, default=1024, metavar="N",
                        help="most images accepted in one request (default: 1024)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op threads of the model (default: the runtime's own choice)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="logging detail; debug also logs every request (default: info)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..serve import run_server
    from ..teachers import TeacherSpec

    if args.api_key is not None and not args.api_key.strip():
        # An empty key would silently start an open service: whoever set it meant to protect the teacher.
        raise ConfigError(f"--api-key: expected a non-empty key, got {args.api_key!r} (from --api-key or "
                          "$DB3KD_API_KEY); omit both for an open service")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch: expected a positive integer, got {args.max_batch}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads: expected a positive integer, got {args.threads}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: expected 0 to 65535, got {args.port}")
    teacher = TeacherSpec.parse(args.model)
    if not teacher.is_file:
        raise ConfigError(f"MODEL: expected a .pt or .onnx file to serve, got the URL {args.model!r}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if teacher.kind == "torch" and args.threads is not None:
        torch.set_num_threads(args.threads)  # the model's threads; an ONNX model gets them below
    backend = teacher.load(threads=args.threads)
    try:
        with teacher.thread_policy():  # torch only validates and clips batches for an ONNX model
            run_server(backend, host=args.host, port=args.port, api_key=args.api_key,
                       max_batch=args.max_batch, log_level=args.log_level)
    except OSError as e:  # port taken, address not available: the user's to fix, no traceback needed
        raise ConfigError(e.strerror or str(e)) from e
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, re-raised by uvicorn after its graceful shutdown: a normal end
        pass
    return 0

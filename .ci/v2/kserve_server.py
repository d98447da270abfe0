"""KServe's Python model server over an ONNX classifier, for db3kd's V2 teacher tests (run in its own venv).

    python kserve_server.py --http_port PORT --onnx model.onnx --models lenet5-logits,lenet5-labels

Each model name picks a behaviour (MODES): the two a real deployment has (scores, labels) and the answers a
broken one gives with HTTP 200 (wrong datatype, width, batch size), which the client must refuse. REST binds
127.0.0.1 only (KServe hard-codes 0.0.0.0; patched below), gRPC is off. `GET /metrics` (same port) has
db3kd_teacher_images_total{model=...}: images classified, the server's own count the tests compare with
db3kd's.
"""

import argparse

import numpy as np
import onnxruntime as ort
import uvicorn
from prometheus_client import Counter

_Config = uvicorn.Config


class _LoopbackConfig(_Config):
    def __init__(self, *args, **kwargs):
        kwargs["host"] = "127.0.0.1"
        super().__init__(*args, **kwargs)


uvicorn.Config = _LoopbackConfig  # before kserve imports uvicorn's Config

import kserve  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer  # noqa: E402
from kserve.errors import InferenceError, InvalidInput  # noqa: E402

REQUESTS = Counter("db3kd_teacher_requests", "infer requests classified", ["model"])
IMAGES = Counter("db3kd_teacher_images", "images classified", ["model"])
MODES = {"lenet5-logits": "logits", "lenet5-labels": "labels", "lenet5-bad-dtype": "bad_dtype",
         "lenet5-bad-shape": "bad_shape", "lenet5-bad-batch": "bad_batch", "lenet5-http-error": "http_error"}


class OnnxClassifier(Model):
    def __init__(self, name: str, onnx_path: str, mode: str):
        super().__init__(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.mode = mode
        self.ready = True

    def get_input_types(self):
        return [{"name": "image", "datatype": "FP32", "shape": [-1, *self.input.shape[1:]]}]

    def get_output_types(self):
        if self.mode in ("labels", "bad_batch"):
            return [{"name": "label", "datatype": "INT64", "shape": [-1]}]
        return [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        if self.mode == "http_error":
            raise InferenceError("teacher exploded")
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        if x.ndim != 4 or list(x.shape[1:]) != list(self.input.shape[1:]):
            raise InvalidInput(f"input 'image' must be [N, {self.input.shape[1:]}], got {list(x.shape)}")
        logits = self.session.run(None, {self.input.name: x})[0]
        n = len(x)
        REQUESTS.labels(self.name).inc()
        IMAGES.labels(self.name).inc(n)
        labels = logits.argmax(1).astype(np.int64)
        out = {
            "logits": lambda: InferOutput("logits", list(logits.shape), "FP32", data=logits),
            "labels": lambda: InferOutput("label", [n], "INT64", data=labels),
            "bad_dtype": lambda: InferOutput("logits", [n], "BYTES", data=["cat"] * n),
            "bad_shape": lambda: InferOutput("logits", [n, 9], "FP32", data=np.ascontiguousarray(logits[:, :9])),
            "bad_batch": lambda: InferOutput("label", [n - 1], "INT64", data=labels[:n - 1]),
        }[self.mode]()
        # The request's binary-output wish is passed on, else binary_data_output is ignored.
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[out],
                             use_binary_outputs=payload.use_binary_outputs, requested_outputs=payload.request_outputs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--models", default=",".join(MODES))
    parser.add_argument("--onnx", required=True)
    args, _ = parser.parse_known_args()
    models = [OnnxClassifier(name, args.onnx, MODES[name]) for name in args.models.split(",")]
    ModelServer(http_port=args.http_port, enable_grpc=False, workers=1, enable_latency_logging=False,
                grace_period=2).start(models)

"""A Seldon MLServer custom runtime over an ONNX classifier, for db3kd's V2 teacher tests (run in its own venv).

Each model's `parameters.extra.mode` in its model-settings.json picks a behaviour: `logits` (FP32 [N, K]),
`labels` (INT64 [N]), `labels_n1` (INT64 [N, 1], what MLServer's NumpyCodec makes of a 1-D array), and the
answers a broken deployment gives with HTTP 200 (`bad_dtype`, `bad_shape`, `bad_batch`), which the client must
refuse. Images classified are counted in db3kd_teacher_images_total{model=...} on MLServer's metrics port.
"""

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from mlserver.utils import get_model_uri
from prometheus_client import REGISTRY, Counter


def _counter(name: str, doc: str) -> Counter:
    # Several models share this module: each counter is registered once per process.
    return REGISTRY._names_to_collectors.get(name) or Counter(name, doc, ["model"])


REQUESTS = _counter("db3kd_teacher_requests", "infer requests classified")
IMAGES = _counter("db3kd_teacher_images", "images classified")


class OnnxClassifier(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(await get_model_uri(self._settings), options,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0]
        self._mode = (self._settings.parameters.extra or {}).get("mode", "logits")
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if self._mode == "http_error":
            raise MLServerError("teacher exploded", status_code=400)
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        if x.ndim != 4 or list(x.shape[1:]) != list(self._input.shape[1:]):
            raise MLServerError(f"input 'image' must be [N, {self._input.shape[1:]}], got {list(x.shape)}", status_code=400)
        logits = self._session.run(None, {self._input.name: x})[0]
        n = len(x)
        REQUESTS.labels(self.name).inc()
        IMAGES.labels(self.name).inc(n)
        labels = logits.argmax(axis=1).astype(np.int64)
        out = {
            "logits": lambda: NumpyCodec.encode_output("logits", logits),
            # By hand: NumpyCodec.encode_output turns a 1-D array into [N, 1].
            "labels": lambda: ResponseOutput(name="label", datatype="INT64", shape=[n], data=labels.tolist()),
            "labels_n1": lambda: NumpyCodec.encode_output("label", labels),
            "bad_dtype": lambda: ResponseOutput(name="logits", datatype="BYTES", shape=[n], data=[b"cat"] * n),
            "bad_shape": lambda: NumpyCodec.encode_output("logits", logits[:, :9]),
            "bad_batch": lambda: NumpyCodec.encode_output("label", labels[:n - 1]),
        }[self._mode]()
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id, outputs=[out])

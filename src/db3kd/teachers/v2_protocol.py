"""The Open Inference Protocol (KServe V2 REST) as db3kd speaks it: teacher URLs, model metadata, tensors.

Pure functions and data, no network: `V2Backend` sends what these build and reads what they parse.

A teacher URL is `v2+http://host:port[/prefix]/models/NAME[/versions/VERSION][?option=value&...]`, options:

| option | meaning |
| --- | --- |
| `num_classes=K` | class count, needed when the model answers labels (its metadata cannot say K) |
| `bounds=LO,HI` | pixel range (default 0,1) |
| `input_shape=C,H,W` | image shape, needed when the metadata leaves it open (-1) |
| `input=NAME`, `output=NAME` | which input / output, when the model has several |
| `binary=true\\|false` | the binary tensor extension (default: if the server declares `binary_tensor_data`) |
| `max_batch=N` | most images per request (default 256; halved on HTTP 413) |
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlsplit

import numpy as np

from ..errors import ConfigError, TeacherError

SCHEMES = ("v2+http://", "v2+https://")
# Datatypes of the protocol, as NumPy dtypes (little-endian, as the binary extension sends them).
DTYPES = {"BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1",
          "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
FLOAT_TYPES = ("FP16", "FP32", "FP64")
INTEGER_TYPES = ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")
BINARY_HEADER = "Inference-Header-Content-Length"
BINARY_EXTENSION = "binary_tensor_data"


@dataclass(frozen=True)
class V2Options:
    """What a V2 teacher URL's query (or the Python API) says beyond the server's metadata (see the module)."""

    num_classes: int | None = None
    bounds: tuple[float, float] | None = None
    input_shape: tuple[int, int, int] | None = None
    input: str | None = None
    output: str | None = None
    binary: bool | None = None
    max_batch: int | None = None

    def __post_init__(self):
        def expect(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"V2 teacher option {name}: expected {expected}, got {getattr(self, name)!r}")

        k, bounds, shape, batch = self.num_classes, self.bounds, self.input_shape, self.max_batch
        expect(k is None or _is_int(k) and k >= 2, "num_classes", "an integer >= 2")
        expect(bounds is None or len(bounds) == 2 and all(math.isfinite(b) for b in bounds) and bounds[0] < bounds[1],
               "bounds", "LO,HI with LO < HI")
        expect(shape is None or len(shape) == 3 and all(_is_int(s) and s > 0 for s in shape), "input_shape",
               "C,H,W of positive integers")
        expect(batch is None or _is_int(batch) and batch >= 1, "max_batch", "a positive integer")
        expect(self.binary in (None, True, False), "binary", "true or false")

    @classmethod
    def from_query(cls, query: str) -> "V2Options":
        """The options of a URL query string, e.g. `num_classes=10&bounds=0,1`."""
        readers = {"num_classes": int, "bounds": _floats, "input_shape": _ints, "input": str, "output": str,
                   "binary": _boolean, "max_batch": int}
        values = {}
        for key, text in parse_qsl(query, keep_blank_values=True):
            if key not in readers:
                raise ConfigError(f"unknown option {key!r} in a V2 teacher URL; expected some of {', '.join(readers)}")
            try:
                values[key] = readers[key](text)
            except ValueError:
                raise ConfigError(f"V2 teacher option {key}: cannot read {text!r}") from None
        return cls(**values)


@dataclass(frozen=True)
class V2Target:
    """Where a V2 model is: its server's `base` URL, `model` name, `version` and the URL's options."""

    base: str
    model: str
    version: str | None = None
    options: V2Options = field(default_factory=V2Options)

    @property
    def model_path(self) -> str:
        """`/v2/models/NAME[/versions/V]`, relative to `base`."""
        path = f"/v2/models/{quote(self.model, safe='')}"
        return path if self.version is None else f"{path}/versions/{quote(self.version, safe='')}"

    @property
    def name(self) -> str:
        """The URL without its options: how messages name the teacher."""
        return "v2+" + self.base + self.model_path.removeprefix("/v2")


def parse_v2_url(text: str) -> V2Target:
    """The `V2Target` of a teacher URL (see the module), or a `ConfigError` saying what is wrong with it."""
    if not text.startswith(SCHEMES):
        raise ConfigError(f"expected a V2 teacher URL v2+http(s)://host:port/models/NAME, got {text!r}")
    parts = urlsplit(text[len("v2+"):])
    match = re.fullmatch(r"(?P<prefix>.*?)/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/?", parts.path)
    if not parts.netloc or match is None or parts.fragment:
        raise ConfigError(f"expected a V2 teacher URL v2+http(s)://host:port/models/NAME (optionally "
                          f"/versions/V and ?options), got {text!r}")
    prefix = match["prefix"].removesuffix("/v2")  # also take .../v2/models/NAME, the endpoint's own path
    return V2Target(f"{parts.scheme}://{parts.netloc}{prefix}", match["model"], match["version"],
                    V2Options.from_query(parts.query))


@dataclass(frozen=True)
class V2Model:
    """A model's contract as db3kd uses it: which input (name, datatype, image shape), which output (None: the
    only one in each answer), K classes, pixel bounds."""

    input_name: str
    input_datatype: str
    input_shape: tuple[int, int, int]
    output_name: str | None
    num_classes: int
    bounds: tuple[float, float]
    ask_output: bool  # name the output in requests (the model has several)
    versions: tuple[str, ...] = ()

    def describe(self) -> str:
        """The contract in one line (part of the teacher's identity)."""
        versions = f" versions={list(self.versions)}" if self.versions else ""
        return (f"input={self.input_name} {self.input_datatype} {list(self.input_shape)} "
                f"output={self.output_name or '(the only one)'} num_classes={self.num_classes} "
                f"bounds={list(self.bounds)}{versions}")


def read_model_metadata(meta, options: V2Options, where: str) -> V2Model:
    """The `V2Model` of a model metadata answer (`GET /v2/models/NAME`), completed by `options`."""
    if not isinstance(meta, dict):
        raise TeacherError(f"{where}: expected model metadata as a JSON object, got {str(meta)[:200]}")
    inputs, outputs = _tensor_list(meta, "inputs", where), _tensor_list(meta, "outputs", where)
    image = _pick(inputs, options.input, "input", where) if inputs else None
    if image is None:
        if options.input is None or options.input_shape is None:
            raise TeacherError(f"{where}: the model's metadata declares no inputs; give the input's name and "
                               "shape in the teacher URL: ?input=NAME&input_shape=C,H,W")
        image = {"name": options.input, "datatype": "FP32", "shape": [-1, *options.input_shape]}
    datatype = image.get("datatype")
    if datatype not in FLOAT_TYPES:
        raise TeacherError(f"{where}: expected a floating-point image input ({', '.join(FLOAT_TYPES)}), got input "
                           f"{image['name']!r} of datatype {datatype!r}")
    output = _pick(outputs, options.output, "output", where)
    versions = meta.get("versions") or ()
    return V2Model(image["name"], datatype, _image_shape(image, options.input_shape, where),
                   None if output is None else output["name"],
                   _class_count(output, options.num_classes, where),
                   options.bounds or (0.0, 1.0), ask_output=len(outputs) > 1,
                   versions=tuple(str(v) for v in versions) if isinstance(versions, list) else ())


def _tensor_list(meta: dict, key: str, where: str) -> list[dict]:
    tensors = meta.get(key) or []
    if not isinstance(tensors, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tensors):
        raise TeacherError(f"{where}: expected {key} as a list of {{name, datatype, shape}}, got {str(tensors)[:200]}")
    return tensors


def _pick(tensors: list[dict], name: str | None, what: str, where: str) -> dict | None:
    """The tensor named `name`, else the only one; None when the metadata lists none."""
    if name is not None:
        for tensor in tensors:
            if tensor["name"] == name:
                return tensor
        if tensors:
            raise TeacherError(f"{where}: the model has no {what} {name!r}; its {what}s: "
                               f"{[t['name'] for t in tensors]}")
        return {"name": name}
    if len(tensors) > 1:
        raise TeacherError(f"{where}: the model has several {what}s {[t['name'] for t in tensors]}; say which in "
                           f"the teacher URL: ?{what}=NAME")
    return tensors[0] if tensors else None


def _image_shape(image: dict, given, where: str) -> tuple[int, int, int]:
    dims = image.get("shape")
    if not (isinstance(dims, list) and len(dims) == 4 and all(_is_int(d) for d in dims)):
        raise TeacherError(f"{where}: expected input {image['name']!r} of shape [-1, C, H, W] (a batch of images), "
                           f"got {dims!r}")
    if dims[0] not in (-1, 1):
        raise TeacherError(f"{where}: input {image['name']!r} takes exactly {dims[0]} images per request "
                           f"(shape {dims}); db3kd sends any number: expected a variable batch dimension, -1")
    declared = tuple(dims[1:])
    if given is not None:
        if any(d != -1 and d != g for d, g in zip(declared, given)):
            raise TeacherError(f"{where}: input_shape {list(given)} contradicts the model's input shape {dims}")
        return tuple(given)
    if any(d <= 0 for d in declared):
        raise TeacherError(f"{where}: the model's input shape {dims} leaves the image size open; give it in the "
                           "teacher URL: ?input_shape=C,H,W")
    return declared


def _class_count(output: dict | None, given: int | None, where: str) -> int:
    dims = (output or {}).get("shape")
    declared = (dims[-1] if (output or {}).get("datatype") in FLOAT_TYPES and isinstance(dims, list)
                and len(dims) == 2 and _is_int(dims[-1]) and dims[-1] >= 2 else None)
    if given is not None:
        if declared is not None and declared != given:
            raise TeacherError(f"{where}: num_classes={given} contradicts the model's output "
                               f"{output['name']!r} of shape {dims}")
        return given
    if declared is None:
        described = "none" if output is None else f"{output['name']!r} {output.get('datatype')} {dims}"
        raise TeacherError(f"{where}: cannot tell the class count from the model's output ({described}); give it "
                           "in the teacher URL: ?num_classes=K")
    return declared


def server_declares_binary(meta) -> bool:
    """Whether a server metadata answer (`GET /v2`) lists the binary tensor extension."""
    extensions = meta.get("extensions") if isinstance(meta, dict) else None
    return isinstance(extensions, list) and BINARY_EXTENSION in extensions


def encode_request(model: V2Model, images: np.ndarray, request_id: str, binary: bool) -> tuple[bytes, dict]:
    """(body, headers) of an infer request for `images`: JSON, or JSON header + raw tensor (binary extension)."""
    images = np.ascontiguousarray(images, dtype=DTYPES[model.input_datatype])
    tensor = {"name": model.input_name, "datatype": model.input_datatype, "shape": list(images.shape)}
    request: dict = {"id": request_id, "inputs": [tensor]}
    if model.ask_output:
        request["outputs"] = [{"name": model.output_name}]
    if not binary:
        tensor["data"] = images.ravel().tolist()
        return json.dumps(request).encode(), {"Content-Type": "application/json"}
    tensor["parameters"] = {"binary_data_size": images.nbytes}
    request["parameters"] = {"binary_data_output": True}
    header = json.dumps(request).encode()
    return header + images.tobytes(), {"Content-Type": "application/octet-stream", BINARY_HEADER: str(len(header))}


def decode_labels(content: bytes, header_length: str | None, model: V2Model, n: int, request_id: str,
                  where: str) -> np.ndarray:
    """The labels in an infer answer for `n` images: its label tensor [n] or [n, 1], or the arg-max of its scores
    [n, K] (logits or probabilities; the scores themselves are discarded). `header_length`: the answer's
    `Inference-Header-Content-Length` (binary extension), or None for a JSON answer."""
    answer, raw = _split_answer(content, header_length, where)
    if answer.get("id") not in (None, request_id):
        raise TeacherError(f"{where}: answered request id {answer.get('id')!r} to request {request_id!r}")
    output = _answer_output(answer, model, where)
    name, datatype, shape = output.get("name"), output.get("datatype"), output.get("shape")
    labels = datatype in INTEGER_TYPES and shape in ([n], [n, 1])
    scores = datatype in FLOAT_TYPES and shape == [n, model.num_classes]
    if not (labels or scores):
        raise TeacherError(f"{where}: expected output {name!r} as integer labels [{n}] or [{n}, 1], or scores "
                           f"FP32 [{n}, {model.num_classes}] (logits or probabilities), got {datatype} {shape}")
    values = _tensor_values(output, raw, where)
    return values.reshape(n) if labels else values.reshape(n, model.num_classes).argmax(axis=1)


def _split_answer(content: bytes, header_length: str | None, where: str) -> tuple[dict, bytes]:
    """(the JSON part, the raw bytes after it) of an answer."""
    size = len(content)
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(content):
            raise TeacherError(f"{where}: expected {BINARY_HEADER} between 0 and the body's {len(content)} bytes, "
                               f"got {header_length!r}")
    try:
        answer = json.loads(content[:size])
    except ValueError:
        raise TeacherError(f"{where}: expected a JSON answer, got {content[:100]!r}") from None
    if not isinstance(answer, dict):
        raise TeacherError(f"{where}: expected an infer answer as a JSON object, got {str(answer)[:200]}")
    return answer, content[size:]


def _answer_output(answer: dict, model: V2Model, where: str) -> dict:
    outputs = answer.get("outputs")
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, dict) for o in outputs):
        raise TeacherError(f"{where}: expected an answer with outputs, got {str(answer)[:200]}")
    if model.output_name is None:
        if len(outputs) > 1:
            raise TeacherError(f"{where}: the model answered several outputs {[o.get('name') for o in outputs]}; say "
                               "which holds the labels or scores in the teacher URL: ?output=NAME")
        return outputs[0]
    for output in outputs:
        if output.get("name") == model.output_name:
            return output
    raise TeacherError(f"{where}: expected output {model.output_name!r} in the answer, got "
                       f"{[o.get('name') for o in outputs]}")


def _tensor_values(output: dict, raw: bytes, where: str) -> np.ndarray:
    """An answer tensor's values, flat, from its JSON `data` or its share of the binary part."""
    dtype, count = np.dtype(DTYPES[output["datatype"]]), math.prod(output["shape"])
    size = (output.get("parameters") or {}).get("binary_data_size")
    try:
        if size is not None:  # db3kd asks for one output only, so it is the whole binary part
            if size != count * dtype.itemsize or len(raw) < size:
                raise ValueError(f"{size} bytes declared, {len(raw)} sent, {count * dtype.itemsize} expected")
            return np.frombuffer(raw[:size], dtype=dtype)
        values = np.asarray(output.get("data"), dtype=dtype).ravel()
    except (TypeError, ValueError, OverflowError) as e:
        raise TeacherError(f"{where}: output {output.get('name')!r} holds no {count} {output['datatype']} values "
                           f"({e})") from None
    if values.size != count:
        raise TeacherError(f"{where}: output {output.get('name')!r} of shape {output['shape']} holds {values.size} "
                           f"values; expected {count}")
    return values


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(","))


def _boolean(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise ValueError(text)
    return value

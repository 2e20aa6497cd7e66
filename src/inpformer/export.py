"""Exported models and the runtimes that run them: ONNX files (fp32 or int8) on ONNX Runtime, OpenVINO IR folders
on OpenVINO.

Exported models are self-describing: the caller's metadata (categories, thresholds, preprocessing...) is stored as
JSON in the model itself (ONNX: its metadata_props; OpenVINO: the IR's rt_info), under the same keys and read back
by the same checks, so a deployment needs the .onnx file, or the folder with model.xml and model.bin, alone.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch

from .data.geometry import Size, parse_size
from .errors import InpformerError
from .files import output_folder, write_atomically
from .runtime import InferenceGraph, RuntimeOutput, runtime_inputs

if TYPE_CHECKING:
    import openvino

METADATA_KEY = "inpformer"
VERSION_KEY = f"{METADATA_KEY}_format_version"
FORMAT_VERSION = 2  # 2: the valid-box input
INPUTS = ("images", "valid")
OUTPUTS = ("anomaly_map", "score", "decision", "embedding")
OPENVINO_XML, OPENVINO_BIN = "model.xml", "model.bin"
_FIX = "re-export with `inpformer export RUN_DIR --onnx FILE`"
_OPENVINO_FIX = "re-export with `inpformer export RUN_DIR --openvino DIR`"


def export_onnx(graph: InferenceGraph, path: str | Path, input_size: int | Size, metadata: dict,
                opset: int = 18) -> Path:
    """Traces `graph` for images [batch, 3, height, width] and valid boxes [batch, 4] (dynamic batch) into a
    checked ONNX file."""
    if opset < 17:
        raise InpformerError(f"opset {opset} is too old; use 17 or newer (LayerNormalization needs 17)")
    graph.eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # timm's input-size asserts hold by construction here (fixed input size), so tracing them is harmless;
        # the legacy exporter is deliberate (the dynamo one needs onnxscript), so its deprecation notice is noise
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            graph, (torch.zeros(1, 3, *parse_size(input_size)), torch.tensor([[0.0, 0.0, 1.0, 1.0]])), buffer,
            dynamo=False, opset_version=opset, input_names=list(INPUTS), output_names=list(OUTPUTS),
            dynamic_axes={name: {0: "batch"} for name in (*INPUTS, *OUTPUTS)},
        )
    model = onnx.load_from_string(buffer.getvalue())
    set_onnx_metadata(model, metadata)
    return save_onnx(model, path)


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Checks `model` and writes it atomically."""
    onnx.checker.check_model(model)
    return write_atomically(path, lambda tmp: onnx.save(model, tmp))


def set_onnx_metadata(model: onnx.ModelProto, metadata: dict) -> None:
    """Stores `metadata` (and the format version) in the model's metadata_props."""
    props = {p.key: p.value for p in model.metadata_props}
    props.update({METADATA_KEY: json.dumps(metadata), VERSION_KEY: str(FORMAT_VERSION)})
    onnx.helper.set_model_props(model, props)


def read_onnx_metadata(path: str | Path) -> dict:
    """The metadata dict stored by `export_onnx` (raises InpformerError for other files)."""
    path = Path(path)
    if not path.is_file():
        raise InpformerError(f"{path}: ONNX model not found; {_FIX}")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # protobuf raises several types for a file that is not ONNX
        raise InpformerError(f"{path}: not an ONNX model; {_FIX}") from None
    return _parse_metadata({p.key: p.value for p in model.metadata_props}, f"{path}: ONNX model", _FIX)


def _parse_metadata(props: dict[str, str], model: str, fix: str) -> dict:
    """The metadata among a model's string properties, checked: written by inpformer, in this format version."""
    if METADATA_KEY not in props:
        raise InpformerError(f"{model} without inpformer metadata (not exported by inpformer); {fix}")
    version = props.get(VERSION_KEY, "0")
    if version != str(FORMAT_VERSION):
        raise InpformerError(f"{model} in inpformer format {version[:20]!r}, this version reads {FORMAT_VERSION}; "
                             f"{fix}")
    try:
        metadata = json.loads(props[METADATA_KEY])
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict):
        raise InpformerError(f"{model}: the inpformer metadata is not a JSON object; {fix}")
    return metadata


def export_openvino(onnx_path: str | Path, folder: str | Path) -> Path:
    """Converts an exported ONNX file into an OpenVINO IR in `folder` (model.xml and model.bin, fp32 weights) with
    the same metadata, in the IR's rt_info."""
    ov = _openvino()
    metadata = read_onnx_metadata(onnx_path)
    folder = output_folder(folder, "--openvino")
    model = ov.convert_model(str(onnx_path))
    model.set_rt_info(json.dumps(metadata), METADATA_KEY)
    model.set_rt_info(str(FORMAT_VERSION), VERSION_KEY)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as tmp:
        ov.save_model(model, str(Path(tmp) / OPENVINO_XML), compress_to_fp16=False)
        for name in (OPENVINO_BIN, OPENVINO_XML):  # each replaced atomically, the .xml (what readers look for) last
            # the "write" moves the saved file into write_atomically's temporary name, which it then syncs and renames
            write_atomically(folder / name, lambda target, name=name: os.replace(Path(tmp) / name, target))
    return folder


def is_openvino_folder(path: str | Path) -> bool:
    """Whether `path` is a folder holding an OpenVINO IR (model.xml)."""
    return (Path(path) / OPENVINO_XML).is_file()


def read_openvino_model(folder: str | Path) -> tuple[openvino.Model, dict]:
    """The OpenVINO model in `folder` and its checked metadata dict (raises InpformerError for other folders)."""
    ov = _openvino()
    folder = Path(folder)
    if not is_openvino_folder(folder):
        raise InpformerError(f"{folder}: no OpenVINO model ({OPENVINO_XML}) in this folder; {_OPENVINO_FIX}")
    try:
        model = ov.Core().read_model(str(folder / OPENVINO_XML), str(folder / OPENVINO_BIN))
    except RuntimeError:
        raise InpformerError(f"{folder}: not a readable OpenVINO model ({OPENVINO_XML} and {OPENVINO_BIN}); "
                             f"{_OPENVINO_FIX}") from None
    keys = [key for key in (METADATA_KEY, VERSION_KEY) if model.has_rt_info(key)]
    props = {key: model.get_rt_info(key).astype(str) for key in keys}
    return model, _parse_metadata(props, f"{folder}: OpenVINO model", _OPENVINO_FIX)


def read_metadata(path: str | Path) -> dict:
    """The metadata of an exported model: an .onnx file or an OpenVINO folder."""
    return read_openvino_model(path)[1] if Path(path).is_dir() else read_onnx_metadata(path)


def open_runtime(path: str | Path, threads: int | None = None) -> ExportedRuntime:
    """The runtime of an exported model: OpenVINO for an OpenVINO folder, else ONNX Runtime."""
    return OpenVinoRuntime(path, threads) if Path(path).is_dir() else OnnxRuntime(path, threads)


class ExportedRuntime:
    """Runs an exported model on the CPU: images [B, 3, H, W] (and their valid boxes) -> RuntimeOutput. Subclasses
    set `path`, `metadata` and `input_size` and implement `_run`."""

    name: str
    path: Path
    metadata: dict
    input_size: Size

    def __call__(self, images: np.ndarray, valid: np.ndarray | None = None) -> RuntimeOutput:
        return RuntimeOutput(*self._run(*runtime_inputs(images, valid)))

    def _run(self, images: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(maps, scores, embeddings) of contiguous float32 inputs."""
        raise NotImplementedError


class OnnxRuntime(ExportedRuntime):
    """An exported (fp32 or int8) ONNX model on ONNX Runtime."""

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.metadata = read_onnx_metadata(self.path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default, one thread per physical core
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_size: Size = tuple(self.session.get_inputs()[0].shape[-2:])

    def _run(self, images: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self.session.run(["anomaly_map", "score", "embedding"], {"images": images, "valid": valid}))


class OpenVinoRuntime(ExportedRuntime):
    """An exported OpenVINO IR folder on OpenVINO's CPU plugin, in fp32 (no bf16 even where the CPU has it, so that
    maps and scores match the other runtimes)."""

    name = "openvino"

    def __init__(self, folder: str | Path, threads: int | None = None):
        ov = _openvino()
        self.path = Path(folder)
        model, self.metadata = read_openvino_model(self.path)
        shape = model.input("images").get_partial_shape()
        self.input_size: Size = (shape[2].get_length(), shape[3].get_length())
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                  **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        self.compiled = ov.Core().compile_model(model, "CPU", config)

    def _run(self, images: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # an infer request per call: requests are not thread-safe, and the service may call from several threads
        outputs = self.compiled.create_infer_request().infer({"images": images, "valid": valid})
        return tuple(outputs[self.compiled.output(name)] for name in ("anomaly_map", "score", "embedding"))


def _openvino():
    try:
        import openvino
    except ImportError:
        raise InpformerError("OpenVINO is not installed; pip install 'inpformer[openvino]'") from None
    return openvino

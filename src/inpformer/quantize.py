"""int8 copies of an exported ONNX model, for faster CPU inference (ONNX Runtime's quantisation tools).

    static    int8 weights and int8 activations whose ranges are calibrated on good images: the inputs the model
              gets while those images are scored (`RecordingRuntime`), replayed to ONNX Runtime's calibrator
    dynamic   int8 weights; activations quantised per batch at run time, so no images are needed

Both quantise only the matrix products with a weight matrix (MatMul with a constant operand): attention products,
Softmax, LayerNorm and GELU stay float. The decoder's MLP inputs need care: from the middle blocks on, nearly all
their channels are ~0.02 while a few reach ~9, and one per-tensor int8 scale erases the small ones (quantising them
as they are costs ~0.01 P-AUROC). Dynamic keeps those 8 products fp32; static first evens out their channels
(SmoothQuant, `_smooth_decoder_mlp_inputs`) and quantises them too. The recipes and their measurements:
docs/runtimes.md.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import InpformerError
from .export import read_onnx_metadata, save_onnx, set_onnx_metadata
from .runtime import RuntimeOutput, runtime_inputs

INT8_METHODS = ("static", "dynamic")
_DECODER_MLP_INPUT = re.compile(r"/decoder\.\d+/mlp/fc1/MatMul$")
Batches = Sequence[tuple[np.ndarray, np.ndarray]]  # (images, valid boxes) of the calibration images


class RecordingRuntime:
    """Runs `runtime` and keeps the inputs of every call: the batches that calibrate int8 activation ranges."""

    def __init__(self, runtime: Callable[[np.ndarray, np.ndarray], RuntimeOutput]):
        self.runtime = runtime
        self.batches: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, images: np.ndarray, valid: np.ndarray | None = None) -> RuntimeOutput:
        images, valid = runtime_inputs(images, valid)
        self.batches.append((images, valid))
        return self.runtime(images, valid)


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, method: str = "static", batches: Batches = ()) -> Path:
    """Writes an int8 copy of an exported model: same inputs, outputs and metadata, plus "precision": "int8" and
    "quantization": `method`. "static" needs `batches` to calibrate on."""
    from onnxruntime.quantization import quant_pre_process

    if method not in INT8_METHODS:
        raise InpformerError(f"unknown --int8 {method!r}; choose one of: {', '.join(INT8_METHODS)}")
    if method == "static" and not batches:
        raise InpformerError("--int8 static needs good images to calibrate on; give --calibration-data DIR")
    fp32_path = Path(fp32_path)
    metadata = read_onnx_metadata(fp32_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)  # symbolic inference fails on this graph
        model = onnx.load(prepared)
        weights = {i.name for i in model.graph.initializer}
        nodes = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                 and any(i in weights for i in n.input)]
        if method == "static":
            _smooth_decoder_mlp_inputs(model, batches)
            onnx.save(model, prepared)
            _quantize_static(prepared, quantized, nodes, batches)
        else:
            _quantize_dynamic(prepared, quantized, [n for n in nodes if not _DECODER_MLP_INPUT.search(n)])
        model = onnx.load(quantized)
    set_onnx_metadata(model, {**metadata, "precision": "int8", "quantization": method})
    return save_onnx(model, int8_path)


def _smooth_decoder_mlp_inputs(model: onnx.ModelProto, batches: Batches) -> None:
    """SmoothQuant (Xiao et al., 2023) on the decoder's MLP inputs: input channel j of each fc1 is divided by
    s_j = sqrt(max |x_j| / max |w_j|), folded into the LayerNorm before it (its scale and bias), and fc1's weight row
    j multiplied by s_j. The same function in fp32, with activation and weight ranges balanced per channel, so that
    one int8 scale no longer erases the small channels."""
    producers = {output: node for node in model.graph.node for output in node.output}
    initializers = {i.name: i for i in model.graph.initializer}
    pairs = [(producers[n.input[0]], n) for n in model.graph.node if _DECODER_MLP_INPUT.search(n.name)]
    maxima = _channel_maxima(model, [norm.output[0] for norm, _ in pairs], batches)
    for (norm, fc1), maximum in zip(pairs, maxima, strict=True):
        weight = numpy_helper.to_array(initializers[fc1.input[1]])  # [in, out]
        scale = np.sqrt(np.maximum(maximum, 1e-5) / np.maximum(np.abs(weight).max(axis=1), 1e-5))
        for name, value in ((norm.input[1], numpy_helper.to_array(initializers[norm.input[1]]) / scale),
                            (norm.input[2], numpy_helper.to_array(initializers[norm.input[2]]) / scale),
                            (fc1.input[1], weight * scale[:, None])):
            initializers[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def _channel_maxima(model: onnx.ModelProto, tensors: list[str], batches: Batches) -> list[np.ndarray]:
    """The largest |value| of each channel (last axis) of each of `tensors` over the calibration batches."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    maxima = [np.zeros(1, np.float32)] * len(tensors)
    for images, valid in batches:
        outputs = session.run(tensors, {"images": images, "valid": valid})
        maxima = [np.maximum(m, np.abs(o).reshape(-1, o.shape[-1]).max(axis=0))
                  for m, o in zip(maxima, outputs, strict=True)]
    return maxima


def _quantize_static(fp32: Path, int8: Path, nodes: list[str], batches: Batches) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    # One image per run: the ranges do not depend on the grouping, and the calibration session, which outputs
    # every calibrated tensor, needed 24 GB for batches of 8 images at 448 px
    class Reader(CalibrationDataReader):
        def __init__(self):
            self.pending = ((images[i : i + 1], valid[i : i + 1]) for images, valid in batches
                            for i in range(len(images)))

        def get_next(self) -> dict | None:
            batch = next(self.pending, None)
            return None if batch is None else {"images": batch[0], "valid": batch[1]}

    quantize_static(fp32, int8, Reader(), quant_format=QuantFormat.QDQ, nodes_to_quantize=nodes,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    # no int8 outputs: each product's float output feeds float ops (bias, GELU, residual)
                    extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})


def _quantize_dynamic(fp32: Path, int8: Path, nodes: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(fp32, int8, nodes_to_quantize=nodes, weight_type=QuantType.QInt8)


def set_decision_threshold(source: str | Path, path: str | Path, threshold: float, metadata: dict) -> Path:
    """Writes the exported model `source` to `path` with a new pooled image threshold (the constant of its
    `decision` output) and new metadata, e.g. after recalibrating an int8 model on its own scores."""
    model = onnx.load(source)
    [decision] = [n for n in model.graph.node if "decision" in n.output]  # Greater(score, threshold)
    # a new initializer rather than the old constant's: optimisers may have shared that one with equal constants
    old, name = decision.input[1], "inpformer_image_threshold"
    decision.input[1] = name
    dropped = {name} if any(old in n.input for n in model.graph.node) else {name, old}  # the old one, if unused
    nodes = [n for n in model.graph.node if not dropped & set(n.output)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [i for i in model.graph.initializer if i.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, numpy_helper.from_array(np.array(threshold, np.float32), name)])
    set_onnx_metadata(model, metadata)
    return save_onnx(model, path)

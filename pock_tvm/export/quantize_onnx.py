"""``pock-tvm quantize``: a float ONNX model into the QDQ int8 form pock_tvm trains (int8 weights
per output channel, int8 activations per tensor, both symmetric), calibrated on the user's data with
ONNX Runtime's static quantizer, and checked before it is written: pock_tvm imports it, and its
predictions are compared with the float model's."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .onnx_export import write_onnx


def _inputs(model) -> list:
    inits = {i.name for i in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def calibration_batches(model, data: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """``data`` (``{input name: samples}``; a single-input model also takes the one array under any
    name) cut into batches of the model's batch size (its first dimension; all at once when dynamic)."""
    inputs = _inputs(model)
    if len(inputs) == 1 and len(data) == 1 and inputs[0].name not in data:
        data = {inputs[0].name: next(iter(data.values()))}
    missing = [v.name for v in inputs if v.name not in data]
    if missing:
        raise ValueError(f"the calibration file lacks inputs {missing}; save it with np.savez(path, "
                         f"{'=..., '.join(missing)}=...) (its arrays: {sorted(data)})")
    first = inputs[0].type.tensor_type.shape.dim[0]
    batch = first.dim_value if first.HasField("dim_value") and first.dim_value > 0 else None
    count = len(data[inputs[0].name])
    step = batch or count
    if count < step:
        raise ValueError(f"the calibration file has {count} samples, fewer than the model's batch of {step}")
    return [{v.name: np.ascontiguousarray(data[v.name][i:i + step]).astype(np.float32)
             if data[v.name].dtype.kind == "f" else data[v.name][i:i + step] for v in inputs}
            for i in range(0, count - step + 1, step)]


def quantize_onnx(model_path: str | Path, calibration: str | Path, output: str | Path, force: bool = False) -> dict:
    """Quantize ``model_path`` with the samples of ``calibration`` (``.npz``) and write the QDQ
    model to ``output`` atomically. Returns what was checked: the share of calibration samples whose
    top-1 class (or nearest output) agrees with the float model, and the largest output difference."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from ..frontend import from_onnx
    from ..frontend.onnx_frontend import load

    output = Path(output)
    if output.exists() and not force:  # before the calibration, not after it
        raise ValueError(f"'{output}' exists; choose another path or pass --force")
    model = load(model_path)
    with np.load(calibration, allow_pickle=False) as f:
        batches = calibration_batches(model, {k: f[k] for k in f.files})

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = iter(batches)

        def get_next(self):
            return next(self.left, None)

    with tempfile.TemporaryDirectory() as tmp:
        quantized = Path(tmp) / "q.onnx"
        quantize_static(str(model_path), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        proto = onnx.load(str(quantized))
    from_onnx(proto)  # pock_tvm's int8 path reads it (an unsupported op is an error here, before writing)
    run_float = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    run_int8 = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    agree, total, diff = 0, 0, 0.0
    for batch in batches:
        a, b = run_float.run(None, batch)[0], run_int8.run(None, batch)[0]
        diff = max(diff, float(np.max(np.abs(a - b))))
        if a.ndim == 2:
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            total += len(a)
    write_onnx(proto, output, force)
    return {"output": str(output), "top1_agreement": agree / total if total else None, "max_abs_diff": diff,
            "quantized_nodes": sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)}

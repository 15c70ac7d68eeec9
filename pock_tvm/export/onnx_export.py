"""A fine-tuned step as an ONNX model: the source ONNX file with the trained initializers, or the
torch model's ONNX export with its fine-tuned parameters, checked against the bundle with ONNX Runtime."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from ..runtime.files import atomic_file
from ..runtime.program import Program


def with_trained_initializers(model, state: dict[str, np.ndarray]):
    """A copy of the ONNX ``model`` (in the form pock_tvm imported it: ``onnx_frontend.normalize``)
    whose float initializers hold ``state``'s values; a tensor of ``state`` the model lacks, or of
    another shape, is an error."""
    from onnx import numpy_helper

    from ..frontend.onnx_frontend import load, normalize

    proto = normalize(load(model))
    inits = {init.name: init for init in proto.graph.initializer}
    unknown = sorted(set(state) - set(inits))
    if unknown:
        raise ValueError(f"the bundle's parameters {unknown[:4]} are not initializers of this ONNX model: export "
                         "with the model the bundle was compiled from")
    for name, value in state.items():
        old = inits[name]
        if tuple(old.dims) != tuple(value.shape):
            raise ValueError(f"initializer '{name}' is {tuple(old.dims)} in the ONNX model, {value.shape} in the bundle")
        old.CopyFrom(numpy_helper.from_array(np.asarray(value, numpy_helper.to_array(old).dtype), name))
    return proto


def torch_onnx(torch_model, example_inputs: tuple, state: dict[str, np.ndarray]):
    """``torch_model`` (left unchanged) with ``state`` loaded, exported by ``torch.onnx.export``."""
    import io

    import onnx
    import torch

    model = copy.deepcopy(torch_model).eval()
    unknown = sorted(set(state) - set(model.state_dict()))
    if unknown:  # they would be dropped, and the export would not hold the fine-tune
        raise ValueError(f"the bundle's tensors {unknown[:4]} are not in the torch model: export with the model the "
                         "bundle was compiled from")
    # tensors the bundle does not hold (a tied copy, num_batches_tracked) keep the model's values
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False)
    buffer = io.BytesIO()
    torch.onnx.export(model, example_inputs, buffer, dynamo=False, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def check_with_onnxruntime(proto, program: Program, seed: int = 0, rtol: float = 1e-3, atol: float = 1e-4) -> float:
    """Run ``proto`` in ONNX Runtime and the bundle's forward on the same random inputs (the
    compiled shapes); returns the largest difference, or raises when they disagree."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal(s.shape).astype(s.dtype) if s.dtype.startswith("float")
              else np.ones(s.shape, s.dtype) for s in program.layout.inputs]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, inputs)))[0]
    expected = program.predict(*inputs)
    diff = float(np.max(np.abs(got - expected)))
    if not np.allclose(got, expected, rtol=rtol, atol=atol):
        raise ValueError(f"the exported ONNX model disagrees with the bundle (largest difference {diff:.3g}); "
                         "it was not written")
    return diff


def write_onnx(proto, path: str | Path, force: bool = False) -> Path:
    """Write ``proto`` to ``path`` atomically (an existing file only with ``force``)."""
    path = Path(path)
    if path.exists() and not force:
        raise ValueError(f"'{path}' exists; choose another path or pass --force")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(proto.SerializeToString())
    return path

"""``pock_tvm.check_parity``: a compiled training step against an independent reference.

The forward pass is compared with ONNX Runtime (an ONNX model) or PyTorch (a torch model), and one
training step (loss and every trained tensor's update) with PyTorch autograd in float64, the exact
gradient that float32 rounding in either framework only approximates. This is how the zoo of
architectures in ``benchmarks/zoo_parity.py`` is verified, and how a user verifies a model of their
own before trusting it on a device.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# the errors a case must stay within (relative, see ParityResult)
FORWARD_RTOL, UPDATE_RTOL = 1e-5, 1e-4
# an update is compared relative to its own largest element, but never to less than this fraction
# of the largest update in the model (a tensor whose gradient is rounding noise, e.g. a key
# projection's bias under softmax, has no scale of its own)
UPDATE_FLOOR = 1e-3
# the SGD step's learning rate: large, so that an update is read back from ``before - after`` to
# float32 precision (with lr 1, a BatchNorm scale of ~1 moving by 1e-3 keeps only the bits of the
# update that survive next to 1: 6e-5 of it, which looked like a wrong gradient)
LR = 1e4


@dataclass
class ParityResult:
    """``forward``: ``max|ours - reference| / max|reference|`` of the model's output;
    ``loss``: the same for the first step's loss; ``update``: the largest over trained tensors of
    ``max|our update - exact update| / max(max|exact update|, UPDATE_FLOOR x largest update)``,
    ``worst`` the tensor it came from; ``trained``: how many tensors the scheme updates;
    ``torch_float32``: PyTorch's float32 step measured the same way (how much of ``update`` is
    float32 rounding any framework makes)."""

    forward: float
    loss: float
    update: float
    worst: str
    trained: int
    torch_float32: float = 0.0  # the same update error of PyTorch's own float32 step
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.forward <= FORWARD_RTOL and self.loss <= FORWARD_RTOL and self.update <= UPDATE_RTOL

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def check_parity(model, example_inputs, target, *, torch_model=None, scheme="full", loss="cross_entropy",
                 options=None, lr: float = LR, forward_reference: str = "auto", torch_names: dict | None = None,
                 **compile_args) -> ParityResult:
    """Compile ``model`` (a torch module, or an ONNX path/``ModelProto`` with ``torch_model``, the
    torch module it computes) for the host, run its forward pass and one SGD step (``lr``, no
    momentum: the update is ``lr`` x the gradient) on ``example_inputs`` and ``target``, and
    compare both with the references (module docstring). ``loss``: ``"cross_entropy"`` or
    ``"next_token"`` (a causal LM, labels ``-100`` ignored). ``forward_reference``: ``"onnxruntime"``,
    ``"torch"`` or ``"auto"`` (ONNX Runtime for an ONNX model). Trained tensors are matched to the
    torch model's by name (``torch_names``: ``{program name: torch name}`` where they differ, e.g.
    an ONNX file's ``conv1_w_0``). Raises ``ValueError`` naming a trained tensor the torch model lacks."""
    import torch

    from ..optim import SGD
    from .step import compile

    inputs = [np.asarray(t.numpy() if hasattr(t, "numpy") else t) for t in example_inputs]
    target = np.asarray(target.numpy() if hasattr(target, "numpy") else target)
    onnx_model = not isinstance(model, torch.nn.Module)
    reference_model = torch_model if onnx_model else model
    if reference_model is None:
        raise ValueError("check_parity: an ONNX model needs torch_model=, the torch module it computes "
                         "(the gradient reference)")
    program = compile(model, None if onnx_model else tuple(torch.from_numpy(a) for a in inputs), scheme=scheme,
                      loss=loss, optimizer=SGD(lr=lr), options=options, **compile_args)
    notes = []
    ours_forward = program.predict(*inputs)
    if forward_reference == "onnxruntime" or (forward_reference == "auto" and onnx_model):
        want_forward = onnxruntime_forward(model, inputs)
        notes.append("forward: ONNX Runtime")
    else:
        want_forward = None
        notes.append("forward: torch (float64)")
    before = program.state_dict()
    ours_loss = float(program.step(*inputs, target))
    after = program.state_dict()
    trained = sorted({p.source for p in program.layout.params if p.trainable})
    names = {name: (torch_names or {}).get(name, name) for name in trained}
    exact_loss, exact_output, grads = float64_step(reference_model, inputs, target, loss, sorted(set(names.values())))
    if want_forward is None:
        want_forward = exact_output
    updates = {name: (before[name] - after[name]).astype(np.float64) for name in trained}
    exact = {name: lr * grads[names[name]] for name in trained}
    largest = max((float(np.abs(u).max()) for u in exact.values()), default=0.0)
    _, _, torch32 = float64_step(reference_model, inputs, target, loss, sorted(set(names.values())), "float32")
    worst, update_error, noise = "", 0.0, 0.0
    for name in trained:
        scale = max(float(np.abs(exact[name]).max()), UPDATE_FLOOR * largest, 1e-30)
        error = float(np.abs(updates[name] - exact[name]).max()) / scale
        noise = max(noise, float(np.abs(lr * torch32[names[name]] - exact[name]).max()) / scale)
        if error > update_error:
            worst, update_error = name, error
    return ParityResult(_relative(ours_forward, want_forward), abs(ours_loss - exact_loss) / max(abs(exact_loss), 1e-30),
                        update_error, worst, len(trained), noise, notes)


def _relative(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def onnxruntime_forward(model, inputs: list[np.ndarray]) -> np.ndarray:
    """The ONNX model's first output from ONNX Runtime (CPU)."""
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("check_parity: ONNX Runtime is the forward reference of an ONNX model; "
                         "pip install onnxruntime (the test extra has it)") from None
    data = model.SerializeToString() if not isinstance(model, (str, Path)) else str(model)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs)))[0]


def float64_step(model, inputs: list[np.ndarray], target: np.ndarray, loss: str, trained: list[str],
                 dtype: str = "float64"):
    """``(loss, output, {name: gradient})`` of ``model`` in ``dtype`` (float64: the exact reference;
    float32: PyTorch's own rounding, the noise floor) autograd, eval mode."""
    import torch

    reference = copy.deepcopy(model).eval().to(getattr(torch, dtype))
    named = dict(reference.named_parameters())
    missing = [n for n in trained if n not in named]
    if missing:
        raise ValueError(f"check_parity: the torch model has no parameter {missing[:3]} that the program "
                         "trains; pass the torch module the ONNX file was exported from")
    for p in reference.parameters():
        p.requires_grad_(False)
    for name in trained:
        named[name].requires_grad_(True)
    tensors = [torch.from_numpy(a).to(getattr(torch, dtype)) if a.dtype.kind == "f" else torch.from_numpy(a)
               for a in inputs]
    output = reference(*tensors)
    output = getattr(output, "logits", output)
    labels = torch.from_numpy(target)
    if loss == "next_token":
        value = torch.nn.functional.cross_entropy(output[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                  ignore_index=-100)
    elif loss == "cross_entropy":
        value = torch.nn.functional.cross_entropy(output, labels)
    else:
        raise ValueError(f"check_parity: loss {loss!r} has no reference here; use cross_entropy or next_token")
    value.backward()
    grads = {name: named[name].grad.numpy() if named[name].grad is not None else np.zeros(named[name].shape)
             for name in trained}
    return float(value), output.detach().double().numpy(), {k: np.asarray(v, np.float64) for k, v in grads.items()}

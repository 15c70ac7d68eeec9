"""What a compiled step updates and what its backward pass costs, before and after elimination."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the compiler's cost analysis builds a report; reading one needs none of it
    from ..analysis.cost import GraphCost


@dataclass
class LayerRow:
    layer: str
    updated: list[str]  # e.g. ["weight[:, :8] of 32", "bias"]
    trainable_elements: int
    total_elements: int


@dataclass
class Report:
    """``dense`` is full backprop of every parameter (no elimination), ``sparse`` the scheme."""

    scheme: str
    layers: list[LayerRow]
    dense: dict
    sparse: dict
    optimizer_state_bytes: int
    param_bytes: int
    notes: list[str] = field(default_factory=list)
    planned: dict = field(default_factory=dict)  # bytes: train_step, forward, kernel_scratch, folded_bytes
    phases: list[dict] = field(default_factory=list)  # planned memory after each optimization phase
    kernel_flops: dict = field(default_factory=dict)  # kernel name -> floating-point operations per call
    quantization: dict = field(default_factory=dict)  # int8 tensors and scales (pock_tvm.quantization.post_training.describe)

    @staticmethod
    def build(scheme: str, layers: list[LayerRow], dense: GraphCost, sparse: GraphCost,
              state_bytes: int, param_bytes: int) -> Report:
        keys = ("forward_flops", "backward_flops", "saved_activation_bytes", "gradient_bytes")
        return Report(scheme, layers, {k: getattr(dense, k) for k in keys},
                      {k: getattr(sparse, k) for k in keys} | {"backward_ops": sparse.backward_ops},
                      state_bytes, param_bytes)

    def to_json(self) -> dict:
        return asdict(self)

    def training_bytes(self) -> int:
        """Planned memory training adds to the model's parameters: step storage (saved activations,
        gradients, intermediates), the largest kernel scratch and the optimizer state."""
        p = self.planned
        return p["train_step"] + p.get("kernel_scratch", 0) + self.optimizer_state_bytes

    def inference_bytes(self) -> int:
        """Planned memory of the forward alone, beside the parameters (what no update costs)."""
        return self.planned["forward"] + self.planned.get("kernel_scratch", 0)

    @staticmethod
    def from_json(data: dict) -> Report:
        return Report(data["scheme"], [LayerRow(**r) for r in data["layers"]], data["dense"],
                      data["sparse"], data["optimizer_state_bytes"], data["param_bytes"],
                      list(data.get("notes", [])), dict(data.get("planned", {})),
                      list(data.get("phases", [])), dict(data.get("kernel_flops", {})),
                      dict(data.get("quantization", {})))

    def __str__(self) -> str:
        lines = [f"scheme: {self.scheme}", "", f"{'layer':<34} {'updated':<40} trainable/total"]
        for row in self.layers:
            what = ", ".join(row.updated) if row.updated else "frozen"
            lines.append(f"{row.layer:<34} {what:<40} {row.trainable_elements}/{row.total_elements}")
        trainable = sum(r.trainable_elements for r in self.layers)
        total = sum(r.total_elements for r in self.layers)
        lines += ["", f"trainable parameters: {trainable} of {total} ({100.0 * trainable / max(total, 1):.2f}%)",
                  "", f"{'per step':<28} {'full backprop':>16} {'this scheme':>16} {'saved':>8}"]
        rows = [("forward FLOPs", "forward_flops", _num), ("backward FLOPs", "backward_flops", _num),
                ("saved activations", "saved_activation_bytes", format_bytes),
                ("gradients", "gradient_bytes", format_bytes)]
        for label, key, fmt in rows:
            d, s = self.dense[key], self.sparse[key]
            ratio = f"{d / s:.1f}x" if s else "all"
            lines.append(f"{label:<28} {fmt(d):>16} {fmt(s):>16} {ratio:>8}")
        lines.append(f"{'optimizer state':<28} {'':>16} {format_bytes(self.optimizer_state_bytes):>16}")
        lines.append(f"{'parameters':<28} {format_bytes(self.param_bytes):>16} {format_bytes(self.param_bytes):>16}")
        lines += self._memory_lines()
        ops = ", ".join(f"{k.replace('relax.', '')} x{v}" for k, v in sorted(self.sparse["backward_ops"].items()))
        lines += ["", f"backward ops kept: {ops}"] + self._quantization_lines() + self.notes
        return "\n".join(lines)

    def _quantization_lines(self) -> list[str]:
        tensors = self.quantization.get("tensors", {})
        if not tensors:
            return []
        trained = [n for n, t in tensors.items() if t["trained"]]
        dtypes = ", ".join(sorted({t["dtype"] for n, t in tensors.items() if not t["trained"]}))
        return [f"int8 model: {len(tensors) - len(trained)} frozen tensors stay {dtypes} (integer kernels), "
                f"{len(trained)} train as float32 masters in integer units"
                + (f" ({', '.join(trained[:4])}{', ...' if len(trained) > 4 else ''})" if trained else "")
                + f"; {len(self.quantization.get('activation_scales', {}))} layer inputs quantized to int8 per tensor"]

    def _memory_lines(self) -> list[str]:
        if not self.planned:
            return []
        p = self.planned
        storage, scratch = p["train_step"], p.get("kernel_scratch", 0)
        peak = self.param_bytes + self.optimizer_state_bytes + storage + scratch
        lines = ["", "planned memory of one training step (static plan, nothing allocated at run time):",
                 f"  parameters         {format_bytes(self.param_bytes):>12}"
                 + (f"   ({format_bytes(p['folded_bytes'])} frozen, folded into the step as constants)"
                    if p.get("folded_bytes") else ""),
                 f"  optimizer state    {format_bytes(self.optimizer_state_bytes):>12}",
                 f"  step storage       {format_bytes(storage):>12}   (saved activations, gradients and "
                 f"intermediates, reused by liveness; forward alone: {format_bytes(p['forward'])})",
                 f"  kernel scratch     {format_bytes(scratch):>12}   (the largest one kernel needs)",
                 f"  peak               {format_bytes(peak):>12}"]
        if self.phases:
            keys = ["saved_activations", "gradients", "step_storage", "kernel_scratch", "peak"]
            lines += ["", f"{'after phase':<26}" + "".join(f"{k.replace('_', ' '):>19}" for k in keys)]
            lines += [f"{r['phase']:<26}" + "".join(f"{format_bytes(r[k]):>19}" for k in keys) for r in self.phases]
        return lines


def _num(value: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return str(value)


def format_bytes(value: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"

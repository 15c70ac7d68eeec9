"""Sparse update schemes: which parameters a training step updates, and how much of each.

A scheme is data. Rules select parameters by glob over source names (``features.1[5-7].*``) or by
module path (``classifier`` selects every parameter under it) and give each an update mode:
``full``, ``partial`` (the first ``ceil(ratio * C)`` input channels of a conv or linear weight, or
the first output channels of a depthwise weight) or ``frozen``. Shortcuts: ``bias`` (``"all"``,
``"none"`` or the last N layers) and ``norm_affine`` (BatchNorm, LayerNorm and RMSNorm weight and
bias). Later rules win. ``@role:attention`` / ``@role:mlp`` select the linear weights of a
transformer's attention or MLP layers (:data:`ROLES`), ``@norms`` every normalization's weight and
shift, and ``&`` joins selections (``model.layers.29&@role:mlp``: the MLP weights of that block). ``lora`` adds low-rank adapters beside the
selected linear weights (:class:`LoRA`); the adapters are trained, what else the rules say applies.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .frontend.model import ImportedModel

MODES = ("full", "partial", "frozen")

# role -> globs over layer names; a linear layer takes the first role that matches it. Hugging Face
# names: Llama ``self_attn.q_proj`` / ``mlp.up_proj``, BERT ``attention.self.query`` /
# ``attention.output.dense`` / ``intermediate.dense`` / ``output.dense``.
ROLES = {
    "attention": ("*attn*", "*attention*"),
    "mlp": ("*mlp*", "*intermediate*", "*.output.dense", "*feed_forward*", "*ffn*"),
}


@dataclass(frozen=True)
class LoRA:
    """Low-rank adapters (Hu et al., 2021; PEFT's defaults): ``y = x W^T + (alpha / rank) x A^T B^T``
    beside every linear weight ``select`` picks (a glob or ``@role:NAME``), ``A`` (rank, in)
    uniform in +-1/sqrt(in) from ``seed``, ``B`` (out, rank) zero, so the model starts unchanged."""

    rank: int = 8
    alpha: float = 16.0
    select: str = "@role:attention"
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _is_lora(value) -> bool:
    return isinstance(value, dict) and set(value) <= {"rank", "alpha", "select", "seed"} and \
        type(value.get("rank", 8)) is int and value.get("rank", 8) > 0 and \
        type(value.get("alpha", 16.0)) in (int, float) and isinstance(value.get("select", ""), str) and \
        type(value.get("seed", 0)) is int


def _is_bias(value) -> bool:
    return value in ("all", "none") or (type(value) is int and value >= 0)


def _is_ratio(value) -> bool:
    return type(value) in (int, float) and 0.0 < value <= 1.0


# preset name -> scheme (built when asked for: Scheme is defined below). CNN presets first, then
# transformer ones (``@role`` rules over Llama and BERT layer names)
PRESETS = {
    "full": lambda: Scheme("full", default="full", bias="all", norm_affine=True),
    "bias-only": lambda: Scheme("bias-only", bias="all"),
    # TTE-style sparse update for MobileNetV2: biases of the last 7 blocks, the classifier, and the
    # first pointwise conv of the last blocks with shrinking channel ratios
    "tte-mbv2": lambda: Scheme("tte-mbv2", bias=7, rules=[
        Rule("classifier", "full"),
        Rule("features.17.conv.0.0.weight", "partial", 0.5),
        Rule("features.16.conv.0.0.weight", "partial", 0.25),
        Rule("features.15.conv.0.0.weight", "partial", 0.125),
    ]),
    "bias-norm": lambda: Scheme("bias-norm", bias="all", norm_affine=True),
    "attention-only": lambda: Scheme("attention-only", rules=[Rule("@role:attention", "full")]),
    "mlp-only": lambda: Scheme("mlp-only", rules=[Rule("@role:mlp", "full")]),
    # the first quarter of the input channels of every MLP weight (TTE's partial channels)
    "mlp-partial": lambda: Scheme("mlp-partial", rules=[Rule("@role:mlp", "partial", 0.25)]),
    "lora": lambda: Scheme("lora", lora=LoRA()),
}
PRESET_NAMES = [*PRESETS, "last-k", "last-N"]


# field -> (check, what it accepts): the whole file format of a scheme, in one place
FIELDS = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "preset": (lambda v: isinstance(v, str), "a preset name: " + ", ".join(PRESET_NAMES)),
    "k": (lambda v: type(v) is int and v > 0, "a positive integer (blocks of the last-k preset)"),
    "bias": (_is_bias, '"all", "none" or a count of last layers (integer >= 0)'),
    "norm_affine": (lambda v: type(v) is bool, "true or false (not a string)"),
    "default": (lambda v: v in MODES, f"one of {', '.join(MODES)}"),
    "rules": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
              "a list of tables ([[rules]] in TOML)"),
    "lora": (_is_lora, "a table with rank (integer > 0), alpha (number), select (a glob or @role:NAME) "
                       "and seed (integer), each optional"),
}
RULE_FIELDS = {
    "select": (lambda v: isinstance(v, str) and v != "", "a glob over parameter names or a module path"),
    "mode": (lambda v: v in MODES, f"one of {', '.join(MODES)}"),
    "ratio": (_is_ratio, "a number in (0, 1] (not a string)"),
}


def _check_fields(data: dict, fields: dict, source: str, prefix: str) -> None:
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ValueError(f"Scheme {source}: unknown field '{prefix}{key}'{hint} (fields: {', '.join(fields)})")
        check, accepted = fields[key]
        if not check(value):
            raise ValueError(f"Scheme {source}: field '{prefix}{key}' must be {accepted}, got {value!r}")
    if fields is RULE_FIELDS and "select" not in data:
        raise ValueError(f"Scheme {source}: '{prefix}select' is missing (which parameters the rule applies to)")


@dataclass
class Rule:
    select: str
    mode: str = "full"
    ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Scheme: rule {self.select!r} has mode {self.mode!r}; use one of {MODES}")
        if self.mode == "partial" and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"Scheme: rule {self.select!r} needs 0 < ratio <= 1, got {self.ratio}")


@dataclass(frozen=True)
class Update:
    """The resolved update of one parameter: ``channels`` is set for a partial update."""

    mode: str
    axis: int = 1
    channels: int | None = None


@dataclass
class Scheme:
    name: str = "custom"
    rules: list[Rule] = field(default_factory=list)
    bias: str | int = "none"
    norm_affine: bool = False
    default: str = "frozen"
    lora: LoRA | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoRA(**self.lora)

    # ---- construction -------------------------------------------------------------------------
    @staticmethod
    def preset(name: str, k: int = 2) -> Scheme:
        """A name of :data:`PRESETS`; ``last-k`` updates the last ``k`` blocks (``last-3`` says it)."""
        if name in ("last-k", "last_k") or (name.startswith("last-") and name[5:].isdigit()):
            blocks = k if name in ("last-k", "last_k") else int(name.split("-")[1])
            return Scheme(f"last-{blocks}", rules=[Rule(f"@last-blocks:{blocks}", "full")])
        if name not in PRESETS:
            raise ValueError(f"Scheme: unknown preset {name!r}; choose {', '.join(PRESET_NAMES)}")
        return PRESETS[name]()

    @staticmethod
    def from_dict(data: dict, source: str = "scheme") -> Scheme:
        """A scheme from parsed TOML/JSON; every field is checked (:data:`FIELDS`, :data:`RULE_FIELDS`)
        and a wrong one is one error naming ``source``, the field and what it accepts."""
        _check_fields(data, FIELDS, source, "")
        rules = []
        for i, rule in enumerate(data.get("rules", [])):
            _check_fields(rule, RULE_FIELDS, source, f"rules[{i}].")
            rules.append(Rule(**rule))
        lora = LoRA(**data["lora"]) if "lora" in data else None
        if "preset" in data:
            base = Scheme.preset(data["preset"], int(data.get("k", 2)))
            base.rules += rules
            if lora is not None:
                base.lora = lora
            return base
        return Scheme(data.get("name", "custom"), rules, data.get("bias", "none"),
                      data.get("norm_affine", False), data.get("default", "frozen"), lora)

    @staticmethod
    def load(spec: str | Path | Scheme | None) -> Scheme:
        """A preset name, a ``.toml``/``.json`` file, or a Scheme; ``None`` means ``full``."""
        if spec is None:
            return Scheme.preset("full")
        if isinstance(spec, Scheme):
            return spec
        path = Path(spec)
        if path.suffix in (".toml", ".json"):
            if not path.exists():
                raise ValueError(f"Scheme: no such file '{path}'")
            text = path.read_text()
            try:
                data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
            except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"Scheme '{path}': not valid {path.suffix[1:].upper()}: {err}") from None
            if not isinstance(data, dict):
                raise ValueError(f"Scheme '{path}': the file must hold a table of fields (name, bias, rules, ...)")
            return Scheme.from_dict(data, f"'{path}'")
        return Scheme.preset(str(spec))

    def to_dict(self) -> dict:
        """The scheme as :meth:`from_dict` reads it (``lora`` only when set)."""
        data = asdict(self)
        if data["lora"] is None:
            del data["lora"]
        return data

    def to_toml(self) -> str:
        """The scheme as a ``.toml`` file that :meth:`load` reads back to an equal scheme."""
        lines = [f"name = {json.dumps(self.name)}", f"bias = {json.dumps(self.bias)}",
                 f"norm_affine = {json.dumps(self.norm_affine)}", f"default = {json.dumps(self.default)}"]
        for rule in self.rules:
            lines += ["", "[[rules]]", f"select = {json.dumps(rule.select)}", f"mode = {json.dumps(rule.mode)}"]
            if rule.mode == "partial":
                lines.append(f"ratio = {rule.ratio!r}")
        if self.lora is not None:
            lines += ["", "[lora]"] + [f"{key} = {json.dumps(value)}" for key, value in asdict(self.lora).items()]
        return "\n".join(lines) + "\n"

    # ---- resolution -----------------------------------------------------------------------------
    def resolve(self, model: ImportedModel) -> dict[str, Update]:
        """Resolve to an :class:`Update` for every trainable (non-buffer) parameter of ``model``."""
        params, kinds, layers = trainable_params(model)
        blocks = list(dict.fromkeys(block_of(layer) for layer in layers))
        result = {p.name: Update(self.default) for p in params}

        if self.bias != "none":
            biased = layers if self.bias == "all" else _last(layers, int(self.bias), "bias")
            for p in params:
                if kinds[p.name] in BIAS_KINDS and p.layer in biased:
                    result[p.name] = Update("full")
        if self.norm_affine:
            for p in params:
                if kinds[p.name] in NORM_KINDS:
                    result[p.name] = Update("full")

        for p in params:
            if kinds[p.name] == "adapter":
                result[p.name] = Update("full")
        for rule in self.rules:
            matched = select_params(rule.select, params, blocks, kinds)
            if not matched:
                names = [p.name for p in params] + layers
                close = difflib.get_close_matches(rule.select, names, n=5, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; layers are {', '.join(layers[:8])}, ..."
                raise ValueError(f"Scheme: rule {rule.select!r} matches no parameter{hint}")
            for p in matched:
                if rule.mode != "partial":
                    result[p.name] = Update(rule.mode)
                    continue
                result[p.name] = _partial(p, kinds[p.name], rule.ratio)
        return result


# parameter kinds (from the graph, never from names: ONNX files name biases ``conv1_b_0``) that
# ``bias`` and ``norm_affine`` select: an add of a 1-D tensor, a normalization's shift and scale
BIAS_KINDS = ("bias", "norm_bias")
NORM_KINDS = ("norm", "norm_bias")


def trainable_params(model: ImportedModel):
    """``(params, kinds, layers)``: the non-buffer parameters in forward order, each one's kind
    (:class:`pock_tvm.analysis.layers.ParamUse`: conv, depthwise, linear, embedding, norm, bias,
    other; ``adapter`` for LoRA's) by
    name, and the layers in forward order."""
    from .analysis.layers import param_uses  # (TVM: imported when a scheme meets a model)

    uses = param_uses(model.mod["forward"])
    params = [p for p in model.params if not p.is_buffer]
    params.sort(key=lambda p: uses[p.var_name].position if p.var_name in uses else 0)
    kinds = {p.name: "adapter" if p.adapter else uses[p.var_name].kind if p.var_name in uses else "other"
             for p in params}
    return params, kinds, list(dict.fromkeys(p.layer for p in params))


def blocks(model: ImportedModel) -> list[str]:
    """The blocks of ``model`` in forward order, as ``bias = N`` and ``last-N`` count them."""
    return list(dict.fromkeys(block_of(layer) for layer in trainable_params(model)[2]))


def block_of(layer: str) -> str:
    """``features.3.conv.0`` -> ``features.3``; ``layer4.1.conv1`` -> ``layer4.1``; ``fc`` -> ``fc``."""
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return layer


def _last(layers: list[str], n: int, what: str) -> list[str]:
    if n < 0:
        raise ValueError(f"Scheme: {what} needs a non-negative count, got {n}")
    blocks = list(dict.fromkeys(block_of(layer) for layer in layers))
    keep = set(blocks[len(blocks) - n:]) if n else set()
    return [layer for layer in layers if block_of(layer) in keep]


def role_of(layer: str) -> str | None:
    """The first role of :data:`ROLES` whose globs match ``layer``."""
    for role, globs in ROLES.items():
        if any(fnmatch.fnmatchcase(layer, g) for g in globs):
            return role
    return None


def select_params(pattern: str, params, blocks: list[str], kinds: dict[str, str]):
    """The parameters ``pattern`` selects: a glob over parameter or layer names, a module path,
    ``@role:NAME``, ``@last-blocks:N``, ``@norms`` (normalization weights and shifts), or several of
    these joined by ``&`` (the parameters every part selects: ``model.layers.29&@role:mlp``)."""
    if "&" in pattern:
        parts = [part.strip() for part in pattern.split("&")]
        if not all(parts):
            raise ValueError(f"Scheme: select {pattern!r} has an empty part around '&'")
        chosen = [{p.name for p in select_params(part, params, blocks, kinds)} for part in parts]
        return [p for p in params if all(p.name in c for c in chosen)]
    if pattern == "@norms":
        return [p for p in params if kinds[p.name] in NORM_KINDS]
    if pattern.startswith("@role:"):
        role = pattern.split(":", 1)[1]
        if role not in ROLES:
            raise ValueError(f"Scheme: unknown role {role!r} in {pattern!r}; roles are {', '.join(ROLES)}")
        return [p for p in params if kinds[p.name] == "linear" and role_of(p.layer) == role]
    if pattern.startswith("@last-blocks:"):
        n = int(pattern.split(":")[1])
        if n <= 0 or n > len(blocks):
            raise ValueError(f"Scheme: last-k needs 1 <= k <= {len(blocks)} (blocks: {', '.join(blocks)})")
        keep = set(blocks[-n:])
        return [p for p in params if block_of(p.layer) in keep]
    return [p for p in params if fnmatch.fnmatchcase(p.name, pattern)
            or p.name.startswith(pattern + ".") or fnmatch.fnmatchcase(p.layer, pattern)]


def _partial(param, kind: str, ratio: float) -> Update:
    shape = param.value.shape
    if kind in ("conv", "linear"):
        axis = 1
    elif kind == "depthwise":
        axis = 0
    else:
        raise ValueError(
            f"Scheme: partial update of {param.name!r} ({kind}, shape {tuple(shape)}) is not possible; "
            "partial-channel updates apply to conv, depthwise conv and linear weights"
        )
    channels = math.ceil(ratio * shape[axis])
    if channels >= shape[axis]:
        return Update("full")
    return Update("partial", axis, channels)


"""Checks of a bundle's ``manifest.json`` before anything it says is used: the manifest is
untrusted input (the C++ runner makes the same checks in ``runner/bundle.cc``)."""

from __future__ import annotations

import os
import re

import numpy as np

DTYPES = ("float32", "float64", "float16", "int64", "int32", "int8", "uint8")
ROLES = ("param", "step", "state")
LIBRARY_SUFFIXES = (".so", ".dylib")


class _Bad(ValueError):
    pass


def check_manifest(m: dict, where: str = "manifest.json") -> None:
    """Validate every field a reader relies on; one :class:`ValueError` naming the field and the fix."""
    try:
        _check_manifest(m)
    except _Bad as err:
        raise ValueError(f"{where}: {err}; the bundle is damaged or was edited by hand, write it again "
                         "with `pock-tvm compile -o` or Program.save") from None


def _field(obj, key, kind, where):
    if not isinstance(obj, dict) or key not in obj:
        raise _Bad(f"'{where}{key}' is missing")
    value = obj[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)) or \
            kind is not int and not isinstance(value, kind):
        raise _Bad(f"'{where}{key}' must be {getattr(kind, '__name__', kind)}, got {value!r}"[:300])
    return value


def plain_name(name, where: str) -> str:
    """A file name inside the bundle: no directory part, no ``..``, not hidden."""
    if not isinstance(name, str) or not name or name != os.path.basename(name) or "\\" in name \
            or name.startswith(".") or "\0" in name:
        raise _Bad(f"'{where}' must be a plain file name inside the bundle, got {name!r}")
    return name


def _check_manifest(m: dict) -> None:
    files = _field(m, "files", dict, "")
    for name, digest in files.items():
        plain_name(name, f"files[{name!r}]")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise _Bad(f"'files[{name!r}]' must be a SHA-256 hex digest")
    for key in ("library", "state_file"):
        name = plain_name(_field(m, key, str, ""), key)
        if name not in files:
            raise _Bad(f"'{key}' ({name}) is not listed in 'files', so it cannot be verified")
    if not m["library"].endswith(LIBRARY_SUFFIXES):
        raise _Bad(f"'library' must end in {' or '.join(LIBRARY_SUFFIXES)}, got {m['library']!r}")
    target = _field(m, "target", dict, "")
    for key in ("name", "arch", "os", "device"):
        _field(target, key, str, "target.")
    tensors = _field(m, "tensors", list, "")
    names = set()
    for i, e in enumerate(tensors):
        at = f"tensors[{i}]."
        name = _field(e, "name", str, at)
        if name in names:
            raise _Bad(f"'{at}name' ({name}) is used twice")
        names.add(name)
        if _field(e, "role", str, at) not in ROLES:
            raise _Bad(f"'{at}role' must be one of {ROLES}, got {e['role']!r}")
        shape = _field(e, "shape", list, at)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 or d > 1 << 40 for d in shape) \
                or len(shape) > 8:
            raise _Bad(f"'{at}shape' must be at most 8 non-negative integers, got {shape!r}"[:300])
        if _field(e, "dtype", str, at) not in DTYPES:
            raise _Bad(f"'{at}dtype' must be one of {DTYPES}, got {e['dtype']!r}")
        offset, nbytes = _field(e, "offset", int, at), _field(e, "nbytes", int, at)
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(e["dtype"]).itemsize
        if offset < 0 or nbytes != want:
            raise _Bad(f"'{at}offset' must be >= 0 and '{at}nbytes' equal {want} (shape {shape}, {e['dtype']}); "
                       f"got offset {offset}, nbytes {nbytes}")
        _field(e, "passed", bool, at)
        if "trainable" in e:
            _field(e, "trainable", bool, at)
    steps = [e for e in tensors if e["role"] == "step"]
    if len(steps) != 1 or steps[0]["shape"] != [] or steps[0]["dtype"] != "float32":
        raise _Bad("'tensors' must hold exactly one float32 scalar with role 'step'")
    layout = _layout(m)
    for spec in layout.inputs:
        if spec.bound is not None and (isinstance(spec.bound, bool) or not isinstance(spec.bound, int)
                                       or spec.bound <= 0 or spec.dtype not in ("int64", "int32")):
            raise _Bad(f"'layout.inputs' bound of '{spec.name}' must be a positive integer on an int64/int32 input, "
                       f"got {spec.bound!r} on {spec.dtype}")
    by_name = {e["name"]: e for e in tensors}
    for p in layout.params:
        e = by_name.get(p.var)
        if e is None or e["role"] != "param" or tuple(e["shape"]) != tuple(p.shape) or e["dtype"] != p.dtype \
                or e["passed"] == p.folded or bool(e.get("trainable")) != p.trainable:
            raise _Bad(f"'tensors' and 'layout.params' disagree about parameter '{p.var}'")
    for key in layout.state_keys():
        if by_name.get(key, {}).get("role") != "state":
            raise _Bad(f"optimizer state '{key}' of the layout is not among 'tensors'")
    if len(tensors) != len(layout.params) + 1 + len(layout.state_keys()):
        raise _Bad("'tensors' holds entries the layout does not name")
    lr = layout.optimizer.get("lr", 0.01)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 <= lr <= 3.0e38:
        raise _Bad(f"'layout.optimizer.lr' must be a finite number >= 0, got {lr!r}")
    want = _target_for_loss(layout)
    if want is not None and (tuple(layout.target.shape), layout.target.dtype) != want:
        raise _Bad(f"'layout.target' ({tuple(layout.target.shape)}, {layout.target.dtype}) does not fit the loss "
                   f"'{layout.loss}' of an output of shape {tuple(layout.output.shape)}")
    if m.get("calling") != layout.signatures():
        raise _Bad("'calling' does not match the layout (argument order of train_step/forward)")


def _target_for_loss(layout) -> tuple | None:
    """(shape, dtype) the target must have for the built-in losses (the runner checks the same)."""
    out = tuple(layout.output.shape)
    if layout.loss == "cross_entropy" and len(out) == 2:
        return (out[0],), "int64"
    if layout.loss == "next_token" and len(out) == 3:
        return out[:2], "int64"
    if layout.loss == "mse":
        return out, layout.output.dtype
    return None


def _layout(m: dict):
    from .layout import Layout

    try:
        return Layout.from_json(_field(m, "layout", dict, ""))
    except _Bad:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise _Bad(f"'layout' is malformed ({type(err).__name__}: {err})"[:300]) from None



"""TVM's tensor intrinsics imported without the cost of TVMScript's stack walks.

``tvm.s_tir.tensor_intrin`` (imported by MetaSchedule before it tunes and by every builder worker)
parses 250 TVMScript functions, each calling ``inspect.stack()``, which reads the source lines of
every frame on the stack; while modules are still being imported each look-up scans
``sys.modules``: 20 s on 2 cores. The parser reads the source of the innermost frames only (the
decorator's caller, to tell a class body) and the others' variables, so :func:`shallow_stack` gives
it those frames' source lines and every frame's variables, and skips the rest: 3 s.
"""

from __future__ import annotations

import contextlib
import inspect
import sys


@contextlib.contextmanager
def shallow_stack(keep: int = 3):
    """Within the block, ``inspect.stack``/``inspect.getouterframes`` read source lines for the
    ``keep`` innermost frames only (the others get ``code_context=None``). Restored on exit; for
    single-threaded use."""
    real = inspect.stack, inspect.getouterframes

    def outer(frame, context=1):
        frames = []
        while frame is not None:
            if len(frames) < keep:
                info = inspect.getframeinfo(frame, context)
                frames.append(inspect.FrameInfo(frame, *info[:5], positions=info.positions))
            else:
                frames.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno,
                                                frame.f_code.co_name, None, None, positions=None))
            frame = frame.f_back
        return frames

    inspect.stack = lambda context=1: outer(sys._getframe(1), context)
    inspect.getouterframes = outer
    try:
        yield
    finally:
        inspect.stack, inspect.getouterframes = real


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule imports it before it tunes and in every
    builder worker) in about 3 s instead of 20."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    with shallow_stack():
        import tvm.s_tir.tensor_intrin  # noqa: F401

"""Kernel scratch is what a kernel allocates after TIR's buffer compaction, not what it declares."""

import tvm
from tvm.script import tirx as T

from pock_tvm.analysis.memory import kernel_workspace


@T.prim_func(s_tir=True)
def row_at_a_time(a: T.Buffer((64, 16), "float32"), b: T.Buffer((64, 16), "float32")):
    # a 64x16 intermediate declared on the root block, but each row is consumed right after it is made
    tmp = T.sblock_alloc_buffer((64, 16))
    for i in range(64):
        for j in range(16):
            with T.sblock("double"):
                vi, vj = T.axis.remap("SS", [i, j])
                tmp[vi, vj] = a[vi, vj] * T.float32(2)
        for j in range(16):
            with T.sblock("inc"):
                vi, vj = T.axis.remap("SS", [i, j])
                b[vi, vj] = tmp[vi, vj] + T.float32(1)


@T.prim_func(s_tir=True)
def whole_buffer(a: T.Buffer((64, 16), "float32"), b: T.Buffer((64, 16), "float32")):
    tmp = T.sblock_alloc_buffer((64, 16))
    for i, j in T.grid(64, 16):
        with T.sblock("double"):
            vi, vj = T.axis.remap("SS", [i, j])
            tmp[vi, vj] = a[vi, vj] * T.float32(2)
    for i, j in T.grid(64, 16):
        with T.sblock("flip"):
            vi, vj = T.axis.remap("SS", [i, j])
            b[vi, vj] = tmp[63 - vi, vj] + T.float32(1)


def test_scratch_counts_the_region_a_kernel_allocates_after_compaction():
    mod = tvm.IRModule({"row_at_a_time": row_at_a_time, "whole_buffer": whole_buffer})
    assert kernel_workspace(tvm.IRModule({"k": row_at_a_time})) == {"peak": 16 * 4, "kernel": "k"}
    assert kernel_workspace(mod) == {"peak": 64 * 16 * 4, "kernel": "whole_buffer"}

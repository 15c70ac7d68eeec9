"""A target's conv_layout: the step compiles its convs in that layout, and numbers do not change."""

from dataclasses import replace

import numpy as np
import torch
import tvm

import pock_tvm
from pock_tvm.models import SmallCNN
from pock_tvm.targets import PRESETS


def _conv_input_shapes(program) -> set[tuple]:
    shapes = set()
    for gvar, func in program.ir.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and "conv2d" in gvar.name_hint and "transpose" not in gvar.name_hint:
            shapes |= {tuple(int(d) for d in p.shape) for p in func.params}
    return shapes


def test_nhwc_target_compiles_convs_in_nhwc_and_trains_the_same():
    torch.manual_seed(0)
    model, x, y = SmallCNN(), torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    runs = {}
    for layout in ("NCHW", "NHWC"):
        target = replace(PRESETS["host"], conv_layout=layout)
        program = pock_tvm.compile(model, (x,), scheme="full", optimizer=pock_tvm.SGD(lr=0.1, momentum=0.9),
                                   target=target, tuning_database=False)
        runs[layout] = ([program.step(x.numpy(), y.numpy()) for _ in range(3)], program.state_dict(),
                        _conv_input_shapes(program))
        assert f"convs compiled in {layout}" in str(program.report())
    assert (2, 3, 16, 16) in runs["NCHW"][2] and (2, 16, 16, 3) not in runs["NCHW"][2]
    assert (2, 16, 16, 3) in runs["NHWC"][2]  # the first conv reads its input channels-last
    np.testing.assert_allclose(runs["NHWC"][0], runs["NCHW"][0], rtol=1e-5)
    for name, value in runs["NCHW"][1].items():
        np.testing.assert_allclose(runs["NHWC"][1][name], value, rtol=1e-4, atol=1e-6, err_msg=name)

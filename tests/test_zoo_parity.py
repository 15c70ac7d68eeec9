"""Differential parity over the architecture zoo (``pock_tvm.models.zoo``): the forward pass against
ONNX Runtime or PyTorch, one SGD step against float64 PyTorch autograd (``pock_tvm.check_parity``).

The default run checks a slice of one case per kind of structure; ``-m slow`` (CI's ``make test-all``)
checks every case full at O3 and batch 8 and with its sparse scheme at O0 and batch 1. The full table, both
schemes at O0 and O3, batch 1 and 8: ``benchmarks/zoo_parity.py``.
"""

import pytest
import torch

import pock_tvm
from pock_tvm.compiler.parity import FORWARD_RTOL, UPDATE_RTOL, check_parity
from pock_tvm.models.zoo import BY_NAME, CASES

# one case per kind of structure (residual blocks: caffe2_resnet-onnx9; the torch ResNets, 20 s
# each at O3, run under -m slow)
SLICE = ["convnext", "alexnet-onnx7", "caffe2_resnet-onnx9", "gpt2", "bert"]


def _check(name: str, scheme: str, options: str, batch: int):
    case = BY_NAME[name]
    if case.family == "hf":
        pytest.importorskip("transformers")
    if case.family == "onnx":
        pytest.importorskip("onnxruntime")
    result = check_parity(**case.build(batch), scheme=case.sparse if scheme == "sparse" else scheme, options=options,
                          tuning_database=False)
    assert result.trained > 0
    assert result.forward <= FORWARD_RTOL and result.loss <= FORWARD_RTOL, result
    assert result.update <= UPDATE_RTOL, f"{result.worst}: {result.update:.2g} (torch float32: {result.torch_float32:.2g})"


@pytest.mark.parametrize("name", SLICE)
def test_a_slice_of_the_zoo_matches_the_references(name):
    _check(name, "full", "O3", 2)


@pytest.mark.slow
@pytest.mark.parametrize("scheme,options,batch", [("full", "O3", 8), ("sparse", "O0", 1)])
@pytest.mark.parametrize("name", [c.name for c in CASES if c.name not in SLICE])
def test_every_zoo_case_matches_the_references(name, scheme, options, batch):
    _check(name, scheme, options, batch)


def test_the_zoo_has_thirty_architectures_of_three_kinds():
    assert len(CASES) >= 30 and {c.family for c in CASES} == {"cnn", "onnx", "hf"}


def test_a_model_that_computes_something_else_fails_the_check():
    # the reference is another model: the check must see it (it is not a test that cannot fail)
    case = BY_NAME["caffe2_resnet-onnx9"]
    args = case.build(2)
    other = case.make()
    with torch.no_grad():
        other.fc.bias.add_(0.5)
    result = check_parity(**{**args, "torch_model": other}, tuning_database=False)
    assert not result.ok and result.loss > 1e-3 and result.update > 1e-2  # (the forward is ONNX Runtime's: right)


def test_an_onnx_model_needs_its_torch_module():
    case = BY_NAME["caffe2_resnet-onnx9"]
    args = case.build(1)
    with pytest.raises(ValueError, match="torch_model="):
        pock_tvm.check_parity(args["model"], args["example_inputs"], args["target"])

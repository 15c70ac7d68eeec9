"""What the search can choose: options per group, ratios deduplicated, a choice as a scheme."""

import pytest
import torch

from pock_tvm.frontend import import_model
from pock_tvm.models import SmallCNN
from pock_tvm.scheme import Scheme, Update
from pock_tvm.search import Option, options_for, scheme_of


@pytest.fixture(scope="module")
def imported():
    return import_model(SmallCNN().eval(), (torch.zeros(2, 3, 16, 16),))


def test_options_are_bias_depths_then_weight_ratios_in_forward_order(imported):
    keys = [o.key for o in options_for(imported)]
    assert keys[:4] == ["bias:last-1", "bias:last-2", "bias:last-3", "bias:last-4"]  # 3 conv blocks + classifier
    # 3 input channels: ratios 1/4 and 1/8 both give 1 channel, so 1/8 is left out
    assert keys[4:7] == ["features.0.0.weight@1", "features.0.0.weight@0.5", "features.0.0.weight@0.25"]
    assert keys[7:11] == [f"features.1.0.weight@{r}" for r in ("1", "0.5", "0.25", "0.125")]
    assert keys[-4:] == [f"classifier.weight@{r}" for r in ("1", "0.5", "0.25", "0.125")]
    assert not any("bias" in k and "@" in k for k in keys)  # biases only through the bias group


def test_a_choice_is_the_scheme_that_applies_it(imported):
    options = {o.key: o for o in options_for(imported)}
    scheme = scheme_of([options["bias:last-2"], options["features.2.0.weight@0.25"], options["classifier.weight@1"]])
    updates = scheme.resolve(imported)
    assert updates["features.2.0.weight"] == Update("partial", 1, 4)  # 4 of 16 input channels
    assert updates["classifier.weight"] == Update("full")
    assert updates["classifier.bias"] == Update("full") and updates["features.2.1.bias"] == Update("full")
    assert updates["features.1.1.bias"] == Update("frozen") and updates["features.1.0.weight"] == Update("frozen")


def test_two_choices_in_one_group_are_refused():
    with pytest.raises(ValueError, match="choose twice in one group"):
        scheme_of([Option("fc.weight", ratio=1.0), Option("fc.weight", ratio=0.5)])


def test_scheme_toml_reads_back_equal(tmp_path):
    scheme = Scheme("searched", rules=scheme_of([Option("bias", blocks=3), Option("a.weight", ratio=0.25),
                                                 Option("b.weight")]).rules, bias=3)
    path = tmp_path / "s.toml"
    path.write_text(scheme.to_toml())
    assert Scheme.load(path) == scheme

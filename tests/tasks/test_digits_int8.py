"""QAS on the demo task: the int8 model fine-tunes like the float one with QAS, and lags without it."""

import pytest
import pock_tvm
from pock_tvm.tasks.digits_int8 import compare


@pytest.mark.slow  # make test-all; the feature keeps a faster test in make test
def test_int8_fine_tune_keeps_up_with_float_only_with_qas():
    rows = compare(pock_tvm.SGD(lr=0.01, momentum=0.9), epochs=10)
    accuracy = {name: row["test_accuracy"] for name, row in rows.items()}
    assert accuracy["float"] > 0.4  # the fine-tune works (chance is 0.1, before it 0.04)
    assert abs(accuracy["int8 qas"] - accuracy["float"]) <= 0.03
    assert accuracy["int8 no qas"] < accuracy["float"] - 0.3
    assert rows["int8 qas"]["weight_bytes"] < 0.7 * rows["float"]["weight_bytes"]

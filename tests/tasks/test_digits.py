"""The demo's task: real digits, a new sensor that breaks the pretrained model, reproducible splits."""

import numpy as np
import torch

from pock_tvm.tasks import digits


def test_splits_are_disjoint_reproducible_and_standardized():
    task, again = digits.load_task(), digits.load_task()
    assert task.source[0].shape == (digits.SOURCE, 1, 24, 24) and task.labelled[0].shape == (300, 1, 24, 24)
    assert task.test[0].shape == (1797 - digits.SOURCE - 300, 1, 24, 24)
    assert all(a.dtype == np.float32 for a in (task.source[0], task.labelled[0], task.test[0]))
    assert task.labelled[1].dtype == np.int64 and set(task.labelled[1]) == set(range(10))
    for a, b in zip(task.labelled + task.test, again.labelled + again.test):
        assert np.array_equal(a, b)
    per_image = task.test[0].reshape(len(task.test[0]), -1)
    np.testing.assert_allclose(per_image.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(per_image.std(1), 1, atol=1e-2)


def test_the_sensor_inverts_and_rotates():
    clean = digits._torch_images(np.eye(8, dtype="float32")[None] * 16)  # one diagonal stroke
    seen = digits.through_sensor(clean, digits.Sensor(noise_sigma=0.0))
    plain = digits.through_sensor(clean, digits.Sensor(rotation_deg=0.0, contrast=1.0, noise_sigma=0.0,
                                                       inverted=False))
    assert float(seen[0, 0, 12, 12]) < 0 < float(plain[0, 0, 12, 12])  # the stroke is dark now
    corner = digits.through_sensor(clean, digits.Sensor(inverted=False, noise_sigma=0.0))
    assert float((corner * plain).mean()) < 0.9  # rotated: no longer the same picture


def test_the_pretrained_model_knows_the_source_not_the_sensor(tmp_path):
    task = digits.load_task()
    model = digits.pretrained(tmp_path)
    with torch.no_grad():
        source = (model(torch.from_numpy(task.source[0])).argmax(1).numpy() == task.source[1]).mean()
        target = (model(torch.from_numpy(task.test[0])).argmax(1).numpy() == task.test[1]).mean()
        cached = digits.pretrained(tmp_path)  # from the checkpoint this time
        same = torch.equal(cached(torch.from_numpy(task.test[0][:8])), model(torch.from_numpy(task.test[0][:8])))
    assert source > 0.9 and target < 0.3
    assert same and len(list(tmp_path.glob("digits_cnn-*.pt"))) == 1

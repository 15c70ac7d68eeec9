"""The compile cache: a second compile of the same step loads the library built before (same
numbers), another step is another entry, the cache trims itself and is safe to delete or switch off."""

import numpy as np
import pytest
import torch

import pock_tvm
from pock_tvm import cache
from pock_tvm.models import MLP


@pytest.fixture
def compile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POCK_TVM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("POCK_TVM_COMPILE_CACHE", "1")
    return tmp_path / "cache" / "compiled"


def _compile(model):  # (last-2: fc1 frozen, folded into the library)
    return pock_tvm.compile(model, (torch.zeros(4, 32),), scheme="last-2", baseline=False)


def test_a_repeated_compile_loads_the_cached_library_and_computes_the_same(compile_cache, tmp_path):
    torch.manual_seed(0)
    model = MLP()
    x, y = np.random.default_rng(0).standard_normal((4, 32)).astype("float32"), np.array([0, 1, 2, 3])
    first = _compile(model)
    assert first.library_source is None and len(list(compile_cache.glob("*.so"))) == 1
    second = _compile(model)
    assert second.library_source is not None and second.library_source.parent == compile_cache
    assert first.step(x, y) == second.step(x, y)
    assert np.array_equal(first.predict(x), second.predict(x))
    reloaded = pock_tvm.load(second.save(tmp_path / "bundle"))  # a cached step saves like any other
    assert np.array_equal(reloaded.predict(x), second.predict(x))


def test_other_frozen_weights_are_another_entry(compile_cache):
    """Frozen weights are folded into the library: the same architecture with other weights must
    not load the first one's library."""
    torch.manual_seed(0)
    a = MLP()
    torch.manual_seed(1)
    b = MLP()
    x = np.random.default_rng(0).standard_normal((4, 32)).astype("float32")
    _compile(a)
    compiled_b = _compile(b)
    assert compiled_b.library_source is None and len(list(compile_cache.glob("*.so"))) == 2
    with torch.no_grad():
        np.testing.assert_allclose(compiled_b.predict(x), b.eval()(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_the_cache_is_bounded_safe_to_delete_and_can_be_switched_off(compile_cache, monkeypatch):
    import shutil

    torch.manual_seed(0)
    model = MLP()
    _compile(model)
    shutil.rmtree(compile_cache)  # deleted between runs: the next compile builds again
    assert _compile(model).library_source is None and len(list(compile_cache.glob("*.so"))) == 1
    monkeypatch.setattr(cache, "COMPILE_CACHE_BYTES", 1)  # smaller than any library: only the newest stays
    torch.manual_seed(1)
    _compile(MLP())
    assert len(list(compile_cache.glob("*.so"))) <= 1
    monkeypatch.setenv("POCK_TVM_COMPILE_CACHE", "0")
    shutil.rmtree(compile_cache)
    assert _compile(model).library_source is None and not compile_cache.exists()

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


@pytest.fixture
def builds(monkeypatch):
    """The number of code generations (``tvm.compile`` calls) so far."""
    import tvm

    count, compile_ = [0], tvm.compile

    def counted(*args, **kwargs):
        count[0] += 1
        return compile_(*args, **kwargs)

    monkeypatch.setattr(tvm, "compile", counted)
    return lambda: count[0]


def _compile(model):  # (last-2: fc1 frozen, folded into the library)
    return pock_tvm.compile(model, (torch.zeros(4, 32),), scheme="last-2", baseline=False)


def test_a_repeated_compile_loads_the_cached_library_and_computes_the_same(compile_cache, tmp_path, builds):
    torch.manual_seed(0)
    model = MLP()
    x, y = np.random.default_rng(0).standard_normal((4, 32)).astype("float32"), np.array([0, 1, 2, 3])
    first = _compile(model)
    # the first compile builds, stores, and runs the stored library (no second code generation by a JIT)
    assert builds() == 1 and len(list(compile_cache.glob("*.so"))) == 1
    assert first.library_source == next(compile_cache.glob("*.so"))
    second = _compile(model)
    assert builds() == 1 and second.library_source == first.library_source
    assert first.step(x, y) == second.step(x, y)
    assert np.array_equal(first.predict(x), second.predict(x))
    reloaded = pock_tvm.load(second.save(tmp_path / "bundle"))  # a cached step saves like any other
    assert np.array_equal(reloaded.predict(x), second.predict(x))


def test_other_frozen_weights_are_another_entry(compile_cache, builds):
    """Frozen weights are folded into the library: the same architecture with other weights must
    not load the first one's library."""
    torch.manual_seed(0)
    a = MLP()
    torch.manual_seed(1)
    b = MLP()
    x = np.random.default_rng(0).standard_normal((4, 32)).astype("float32")
    _compile(a)
    compiled_b = _compile(b)
    assert builds() == 2 and len(list(compile_cache.glob("*.so"))) == 2
    with torch.no_grad():
        np.testing.assert_allclose(compiled_b.predict(x), b.eval()(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_the_cache_is_bounded_safe_to_delete_and_can_be_switched_off(compile_cache, monkeypatch, builds):
    import shutil

    torch.manual_seed(0)
    model = MLP()
    _compile(model)
    shutil.rmtree(compile_cache)  # deleted between runs: the next compile builds again
    _compile(model)
    assert builds() == 2 and len(list(compile_cache.glob("*.so"))) == 1
    monkeypatch.setattr(cache, "COMPILE_CACHE_BYTES", 1)  # smaller than any library: only the newest stays
    torch.manual_seed(1)
    x = np.random.default_rng(0).standard_normal((4, 32)).astype("float32")
    newest = _compile(MLP())
    assert [p.name for p in compile_cache.glob("*.so")] == [newest.library_source.name]
    assert np.isfinite(newest.predict(x)).all()
    monkeypatch.setenv("POCK_TVM_COMPILE_CACHE", "0")
    shutil.rmtree(compile_cache)
    off = _compile(model)
    assert builds() == 4 and off.library_source is None and not compile_cache.exists()
    assert np.isfinite(off.predict(x)).all()

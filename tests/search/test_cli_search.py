"""``pock-tvm search``: writes a scheme the compiler plans within the budget; clear errors."""

import pytest
import numpy as np

from pock_tvm.cli.main import main
from pock_tvm.frontend import import_model
from pock_tvm.compiler.step import plan_step
from pock_tvm.search.scheme_search import parse_ms, parse_size
from pock_tvm.scheme import Scheme


def _data(path, n=64):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, n)
    x = rng.standard_normal((n, 32)).astype("float32") * 0.3
    x[np.arange(n), y] += 2.0
    np.savez(path, x=x, y=y)
    return path


def test_search_writes_a_scheme_within_the_budget_and_a_second_search_plans_nothing(tmp_path, capsys, monkeypatch):
    import torch

    from pock_tvm.models import MLP

    data = _data(tmp_path / "d.npz")
    out = tmp_path / "scheme.toml"
    args = ["search", "mlp", "--data", str(data), "--budget", "60KiB", "--epochs", "10", "--input-shape", "8,32",
            "--cache", str(tmp_path / "cache"), "-o", str(out)]
    torch.manual_seed(0)  # the reference model's weights (the second search must see the same model)
    assert main(args) == 0
    shown = capsys.readouterr().out
    assert "planned training memory" in shown and "budget 60.00 KiB" in shown
    scheme = Scheme.load(out)
    planned = plan_step(import_model(MLP(), (torch.zeros(8, 32),)), scheme=scheme, baseline=False,
                        optimizer="adam")
    assert any(u.mode != "frozen" for u in scheme.resolve(import_model(MLP(), (torch.zeros(8, 32),))).values())
    assert planned.report.training_bytes() <= 60 * 1024

    # the same search again: the analysis and the checked choice come from the cache, nothing is planned
    from pock_tvm.compiler import step

    def refuse(*_args, **_kwargs):
        raise AssertionError("planned although the search is cached")

    again = tmp_path / "again.toml"
    monkeypatch.setattr(step, "plan_step", refuse)
    monkeypatch.setattr(step, "build", refuse)
    torch.manual_seed(0)
    assert main([*args[:-1], str(again)]) == 0
    assert again.read_text() == out.read_text()


@pytest.mark.slow  # make test-all; the feature keeps a faster test in make test
def test_a_budget_nothing_fits_is_an_error_naming_the_smallest_scheme(tmp_path, capsys):
    data = _data(tmp_path / "d.npz")
    args = ["search", "mlp", "--data", str(data), "--budget", "1KB", "--input-shape", "8,32",
            "--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "s.toml")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pock-tvm search: error: search: no scheme fits a budget of 1000 B: the smallest," in err
    assert "biases of the last 1 block (bias:last-1)" in err and "raise the budget to at least" in err
    assert not (tmp_path / "s.toml").exists()


def test_bad_budget_latency_and_data_are_named(tmp_path, capsys):
    for text in ("2 parsecs", "-1MB", ""):
        try:
            parse_size(text)
        except ValueError as err:
            assert "is not a size; write e.g. 2MB" in str(err)
        else:
            raise AssertionError(f"{text!r} parsed")
    assert parse_size("2MB") == 2_000_000 and parse_size("1.5KiB") == 1536 and parse_ms("0.5s") == 500.0
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 32)))
    args = ["search", "mlp", "--data", str(tmp_path / "bad.npz"), "--budget", "1MB", "-o", str(tmp_path / "s.toml")]
    assert main(args) == 2
    assert "needs arrays 'x' (inputs) and 'y' (labels), or 'input_ids' (token data); it has ['images']" in capsys.readouterr().err

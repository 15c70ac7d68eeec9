"""Federated fine-tuning on Flower's Deployment Engine: SuperLink and SuperNodes as processes on loopback."""

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

import pock_tvm  # noqa: E402
from pock_tvm.fleet.federation import Federation  # noqa: E402
from pock_tvm.fleet.node import NodeData, evaluate_round, read_node_data, train_round, write_node_data  # noqa: E402
from pock_tvm.fleet.records import from_record, problems, to_record  # noqa: E402
from pock_tvm.fleet.strategy import sparse_fedavg  # noqa: E402
from pock_tvm.scheme import Rule, Scheme  # noqa: E402
from helpers import needs_cmake  # noqa: E402

HERE = Path(__file__).parent
SIZES = (48, 80, 64)  # training samples per node: unequal, so the average is weighted


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A bundle whose scheme trains the head only, and three nodes' data (each its own shift)."""
    root = tmp_path_factory.mktemp("fleet")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    scheme = Scheme("head", rules=[Rule("2", "full")])
    program = pock_tvm.compile(model, (torch.randn(8, 16),), scheme=scheme, optimizer=pock_tvm.Adam(lr=1e-2))
    program.save(root / "bundle")
    centers = np.random.default_rng(0).standard_normal((4, 16)).astype("float32") * 2
    nodes = []
    for i, n in enumerate(SIZES):
        rng = np.random.default_rng(i + 1)
        y = rng.integers(0, 4, n + 32)
        x = (centers[y] + 0.3 * i + rng.standard_normal((n + 32, 16))).astype("float32")
        nodes.append(write_node_data(root / f"node{i}.npz", NodeData(x[:n], y[:n], x[n:], y[n:])))
    return root, nodes


def test_only_the_trained_tensors_travel(fleet):
    root, _ = fleet
    program = pock_tvm.load(root / "bundle")
    sent = program.trained_tensors()
    assert sorted(sent) == sorted(p.var for p in program.layout.params if p.trainable)
    assert len(sent) < len(program.state_dict()), "the frozen first layer stays on the node"


def test_problems_name_what_is_wrong():
    expected = {"w": (2, 3), "b": (3,)}
    ok = {"w": np.zeros((2, 3), "float32"), "b": np.zeros(3, "float32")}
    assert problems(ok, expected) == []
    assert problems({**ok, "b": np.array([0, np.nan, 0], "float32")}, expected) == ["'b' holds 1 non-finite values"]
    assert problems({"w": ok["w"]}, expected) == ["missing tensors ['b']"]
    assert problems({**ok, "x": ok["b"]}, expected) == ["unexpected tensors ['x']"]
    assert problems({**ok, "w": np.zeros((3, 2), "float32")}, expected) == ["'w' has shape (3, 2), expected (2, 3)"]


@pytest.fixture
def server_identity(monkeypatch):
    """What Flower sets in a ServerApp process before messages are made (a run, a node, a task)."""
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)


def _reply(node: int, tensors: dict, examples: int):
    from flwr.app import Message, MetricRecord, RecordDict

    request = Message(RecordDict({"arrays": to_record(tensors)}), dst_node_id=node, message_type="train")
    return Message(RecordDict({"arrays": to_record(tensors), "metrics": MetricRecord({"num-examples": examples})}),
                   reply_to=request)


def test_strategy_rejects_a_non_finite_reply_and_averages_the_others(caplog, server_identity):
    strategy = sparse_fedavg({"w": (2,)}, min_available_nodes=1)
    replies = [_reply(1, {"w": np.array([1.0, 2.0], "float32")}, 30),
               _reply(2, {"w": np.array([np.nan, 0.0], "float32")}, 50),
               _reply(3, {"w": np.array([3.0, 6.0], "float32")}, 10)]
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(from_record(arrays)["w"], [(30 * 1 + 10 * 3) / 40, (30 * 2 + 10 * 6) / 40], rtol=1e-6)
    assert strategy.rounds[1]["nodes"] == 2 and strategy.rounds[1]["bytes_up"] == 16
    assert strategy.rounds[1]["rejected"] == [{"node": 2, "reason": "'w' holds 1 non-finite values"}]
    assert "rejected the reply of node 2: 'w' holds 1 non-finite values" in caplog.text


def test_program_refuses_bad_trained_tensors(fleet):
    root, _ = fleet
    program = pock_tvm.load(root / "bundle")
    good = program.trained_tensors()
    name = sorted(good)[0]
    with pytest.raises(ValueError, match=f"'{name}' holds non-finite"):
        program.load_trained_tensors({**good, name: np.full_like(good[name], np.nan)})
    with pytest.raises(ValueError, match="missing tensors"):
        program.load_trained_tensors({name: good[name]})
    state = program.optimizer_state()
    program.load_optimizer_state(state)
    with pytest.raises(ValueError, match="are not this program's"):
        program.load_optimizer_state({})


def test_node_data_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--node-config 'data="):
        read_node_data(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", x_train=np.zeros(1))
    with pytest.raises(ValueError, match="lacks"):
        read_node_data(tmp_path / "bad.npz")


@needs_cmake
def test_one_round_on_two_nodes_is_fedavg_of_what_each_node_trains(fleet, tmp_path, host_runner):
    """The federated model after one round equals the sample-weighted mean of the two nodes'
    fine-tunes, each replayed here with the node's seed; the nodes sent only the trained tensors.
    Node 1 is a device node: the C++ runner trains and tests its own copy of the bundle."""
    import shutil

    root, nodes = fleet
    shutil.copytree(root / "bundle", tmp_path / "device")
    with Federation(tmp_path / "fed") as fed:
        fed.add_node(0, nodes[0])
        fed.add_node(1, nodes[1], bundle=tmp_path / "device", runner=host_runner / "pock_runner")
        result = fed.run(root / "bundle", tmp_path / "out", rounds=1, local_epochs=2, min_nodes=2,
                         evaluate_on_nodes=True, timeout=240)
    start = pock_tvm.load(root / "bundle").trained_tensors()
    trained = [train_round(pock_tvm.load(root / "bundle"), read_node_data(nodes[i]), start, None, epochs=2,
                           seed=1000 * 1 + i) for i in range(2)]
    total = sum(t.samples for t in trained)
    expected = {k: sum(t.samples / total * t.tensors[k] for t in trained) for k in start}
    got = pock_tvm.load(tmp_path / "out" / "model").trained_tensors()
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=1e-5)
    (row,) = result["rounds"]
    assert row["nodes"] == 2 and row["failed"] == 0 and row["rejected"] == []
    assert row["bytes_up"] == 2 * result["trained_bytes"]
    # node 1 (the runner) tests whole batches of the compiled 8 only
    tests = [read_node_data(p) for p in nodes[:2]]
    count = len(tests[1].y_test) - len(tests[1].y_test) % 8
    tests[1] = NodeData(tests[1].x_train, tests[1].y_train, tests[1].x_test[:count], tests[1].y_test[:count])
    accuracies = [evaluate_round(pock_tvm.load(tmp_path / "out" / "model"), t, got) for t in tests]
    weighted = sum(a * n for a, n in accuracies) / sum(n for _, n in accuracies)
    assert row["accuracy"] == pytest.approx(weighted, abs=1e-6)


@pytest.mark.slow  # about 30 s of Flower processes; the strategy's rejection is unit-tested above in make test
def test_a_poisoned_node_is_rejected_with_its_reason(fleet, tmp_path):
    root, nodes = fleet
    with Federation(tmp_path / "fed") as fed:
        fed.add_node(0, nodes[0])
        fed.add_node(1, nodes[1])
        fed.node_settings[1]["config"]["poison"] = True
        fed.kill_node(1)
        fed.restart_node(1)
        result = fed.run(root / "bundle", tmp_path / "out", app=HERE / "poisoned_app", rounds=1, min_nodes=2,
                         timeout=240)
    (row,) = result["rounds"]
    assert row["nodes"] == 1 and len(row["rejected"]) == 1 and "non-finite" in row["rejected"][0]["reason"]
    got = pock_tvm.load(tmp_path / "out" / "model").trained_tensors()
    assert all(np.all(np.isfinite(v)) for v in got.values())
    assert "rejected the reply of node" in (tmp_path / "fed" / "logs" / "run.log").read_text()


def _when_logged(path: Path, text: str, action, timeout: float = 120.0) -> threading.Thread:
    """Run ``action`` (in a thread) as soon as ``path`` contains ``text``."""
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and text in path.read_text(errors="replace"):
                action()
                return
            time.sleep(0.05)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow  # about 80 s, mostly waiting out a round's timeout
def test_a_node_killed_mid_round_does_not_stop_it_and_rejoins_after_a_restart(fleet, tmp_path):
    """Node 2 dies (SIGKILL) as its first training message arrives: round 1 goes on with the two
    others once its timeout passes; node 2 is started again and trains in a later round (round 2,
    or round 3 when a loaded machine registers it after round 2 has picked its nodes). The round's
    timeout leaves a live node room to answer on a loaded CI machine: at 15 s, one of them missed it
    there (a ClientApp process starts, imports TVM and trains)."""
    root, nodes = fleet
    with Federation(tmp_path / "fed") as fed:
        for i in range(3):
            fed.add_node(i, nodes[i])

        def kill_and_restart():
            fed.kill_node(2)
            fed.restart_node(2)

        watcher = _when_logged(tmp_path / "fed" / "logs" / "node2.log", "Receiving: train message", kill_and_restart)
        start = time.monotonic()
        result = fed.run(root / "bundle", tmp_path / "out", rounds=3, min_nodes=2, expected_nodes=3,
                         evaluate_on_nodes=False, round_timeout=45.0, timeout=300)
        watcher.join(timeout=5)
    first, *later = result["rounds"]
    assert first["nodes"] == 2, first  # the round was not stopped by the dead node
    assert max(r["nodes"] for r in later) == 3, later  # the restarted node trained again
    assert time.monotonic() - start < 300


def test_update_state_replaces_tensors_and_refuses_bad_ones(fleet, tmp_path):
    import shutil

    from pock_tvm.runtime.bundle import update_state

    root, _ = fleet
    shutil.copytree(root / "bundle", tmp_path / "b")
    program = pock_tvm.load(tmp_path / "b")
    new = {k: v + 1.0 for k, v in program.trained_tensors().items()}
    update_state(tmp_path / "b", new)
    got = pock_tvm.load(tmp_path / "b").trained_tensors()
    assert all(np.array_equal(got[k], new[k]) for k in new)
    name = sorted(new)[0]
    with pytest.raises(ValueError, match="non-finite"):
        update_state(tmp_path / "b", {name: np.full_like(new[name], np.nan)})
    with pytest.raises(ValueError, match="has no tensors"):
        update_state(tmp_path / "b", {"nope": new[name]})
    assert all(np.array_equal(pock_tvm.load(tmp_path / "b").trained_tensors()[k], new[k]) for k in new)


@needs_cmake
def test_a_device_node_trains_with_the_runner_as_the_host_program_does(fleet, tmp_path, host_runner):
    """A node with ``runner``: the C++ runner trains its own bundle; the tensors it sends equal what
    the host Program trains from the same tensors, data and seed, and its bundle keeps them."""
    import shutil

    from pock_tvm.fleet.device import evaluate_round_on_device, train_round_on_device

    root, nodes = fleet
    shutil.copytree(root / "bundle", tmp_path / "device")
    data = read_node_data(nodes[0])
    start = {k: v * 0.5 for k, v in pock_tvm.load(root / "bundle").trained_tensors().items()}
    on_device = train_round_on_device(host_runner / "pock_runner", tmp_path / "device", data, start, epochs=2, seed=7)
    on_host = train_round(pock_tvm.load(root / "bundle"), data, start, None, epochs=2, seed=7)
    for k in start:
        np.testing.assert_allclose(on_device.tensors[k], on_host.tensors[k], rtol=1e-4, atol=1e-5)
    assert on_device.loss == pytest.approx(on_host.loss, rel=1e-4)
    acc, count = evaluate_round_on_device(host_runner / "pock_runner", tmp_path / "device", data, on_device.tensors)
    assert count == len(data.y_test) - len(data.y_test) % 8  # whole batches of the compiled 8
    first = NodeData(data.x_train, data.y_train, data.x_test[:count], data.y_test[:count])
    assert acc == pytest.approx(evaluate_round(pock_tvm.load(root / "bundle"), first, on_device.tensors)[0])

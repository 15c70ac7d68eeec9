"""The scheme search on transformers (tiny Llama and BERT configs): the options and what they
select, their costs against the compiler's plan, the shared fine-tune against the option's own
compile, the depth-shared knapsack against brute force, determinism, budget and time-budget errors,
and ``pock-tvm search --loss next_token``."""

import itertools

import numpy as np
import pytest
import torch

import pock_tvm
from pock_tvm.compiler.step import compile as compile_step, plan_step
from pock_tvm.frontend import from_torch
from pock_tvm.search import AnalysisSettings, analyze, options_for, scheme_of
from pock_tvm.search.contribution import Analysis, OptionRow
from pock_tvm.search.search import cost, exact, items, search
from pock_tvm.search.scheme_search import search_scheme
from pock_tvm.scheme import LoRA
from pock_tvm.search.space import Option
from pock_tvm.training.finetune import fit, next_token_loss

transformers = pytest.importorskip("transformers")

from tiny_text import BATCH, SEQ, SETTINGS, tokens


def trained(model, option):
    return sorted(n for n, u in scheme_of([option]).resolve(model).items() if u.mode != "frozen")


def test_options_per_block_and_part_select_what_they_say(llama):
    options = {o.key: o for o in options_for(llama, lora_ranks=(4, 8))}
    assert list(options) == [
        *(f"lm.model.layers.{i}:{part}" for i in range(2) for part in
          ("attention@1", "mlp@1", "mlp@0.5", "mlp@0.25", "norms@1")),
        "lm.model.norm:norms@1", "lora:attention:r4", "lora:attention:r8", "lora:mlp:r4", "lora:mlp:r8"]
    layer1 = "lm.model.layers.1."
    assert trained(llama, options["lm.model.layers.1:attention@1"]) == [
        f"{layer1}self_attn.{p}_proj.weight" for p in "koqv"]
    assert trained(llama, options["lm.model.layers.1:norms@1"]) == [
        f"{layer1}input_layernorm.weight", f"{layer1}post_attention_layernorm.weight"]
    partial = scheme_of([options["lm.model.layers.1:mlp@0.25"]]).resolve(llama)
    assert {n: (u.mode, u.channels) for n, u in partial.items() if u.mode != "frozen"} == {
        f"{layer1}mlp.gate_proj.weight": ("partial", 8), f"{layer1}mlp.up_proj.weight": ("partial", 8),
        f"{layer1}mlp.down_proj.weight": ("partial", 16)}
    assert [o.reach for o in options.values()] == [1] * 5 + [2] * 5 + [3] + [1] * 4
    assert scheme_of([options["lora:mlp:r8"]]).lora == LoRA(rank=8, alpha=16.0, select="@role:mlp")
    assert [o.key for o in options_for(llama, last_blocks=1, lora_ranks=())] == ["lm.model.norm:norms@1"]
    with pytest.raises(ValueError, match="empty part around '&'"):
        pock_tvm.Scheme("x", rules=[pock_tvm.scheme.Rule("lm.model.layers.1&", "full")]).resolve(llama)
    with pytest.raises(ValueError, match="matches no parameter"):  # attention weights that are MLP weights
        pock_tvm.Scheme("x", rules=[pock_tvm.scheme.Rule("@role:attention&@role:mlp", "full")]).resolve(llama)


def test_an_encoder_classifier_has_a_head_option():
    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=16)
            self.bert = transformers.BertModel(config, add_pooling_layer=False)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, ids):
            return self.head(self.bert(input_ids=ids).last_hidden_state[:, 0])

    model = from_torch(Classifier().eval(), torch.zeros(1, 4, dtype=torch.int64))
    keys = [o.key for o in options_for(model, lora_ranks=())]
    assert keys == ["bert.embeddings.LayerNorm:norms@1", "bert.encoder.layer.0:attention@1",
                    "bert.encoder.layer.0:mlp@1", "bert.encoder.layer.0:mlp@0.5", "bert.encoder.layer.0:mlp@0.25",
                    "bert.encoder.layer.0:norms@1", "head:head@1"]
    head = next(o for o in options_for(model, lora_ranks=()) if o.group == "head:head")
    assert trained(model, head) == ["head.bias", "head.weight"]


def test_each_option_costs_what_the_compiler_plans_for_it(llama, analysis):
    assert len(analysis.rows) == len(options_for(llama, lora_ranks=(4,)))
    for key in ("lm.model.layers.0:mlp@0.5", "lm.model.layers.1:norms@1", "lora:attention:r4"):
        row = analysis.row(key)
        report = plan_step(llama, scheme=scheme_of([row.option]), loss="next_token", optimizer=SETTINGS.optimizer,
                           baseline=False).report
        assert (row.memory, row.backward_flops) == (report.training_bytes(), report.sparse["backward_flops"]), key
    # the backward pass goes deeper for an earlier block: more FLOPs for the same part
    assert analysis.row("lm.model.layers.0:norms@1").backward_flops > analysis.row("lm.model.layers.1:norms@1").backward_flops
    assert analysis.seconds > 0


def test_the_shared_fine_tune_of_an_option_is_its_own(llama, analysis):
    """The analysis fine-tunes every option on one program training all of them, setting the rest
    back after each step; compiled alone, the option reaches the same validation loss."""
    from pock_tvm.search.contribution import split

    (ids, mask), labels = tokens()
    train_x, train_y, val_x, val_y = split((ids, mask), labels, SETTINGS)
    for key in ("lm.model.layers.0:mlp@0.5", "lm.model.layers.1:attention@1"):
        program = compile_step(llama, scheme=scheme_of([analysis.row(key).option]), loss="next_token",
                               optimizer=SETTINGS.optimizer)
        fit(program, train_x, train_y, SETTINGS.epochs, SETTINGS.seed)
        alone = -next_token_loss(program, val_x, val_y)
        assert abs(alone - analysis.row(key).accuracy) < 1e-4, key
    assert analysis.row("lm.model.layers.1:mlp@1").gain(analysis.baseline_accuracy) > 0.01


def test_next_token_loss_is_torch_cross_entropy(llama):
    (ids, mask), labels = tokens(4)
    labels[0, 5:] = -100
    program = compile_step(llama, scheme=pock_tvm.Scheme.preset("bias-norm"), loss="next_token")
    logits = torch.from_numpy(np.stack([program.predict(ids[i:i + 2], mask[i:i + 2]) for i in (0, 2)]).reshape(
        4, SEQ, -1))
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 torch.from_numpy(labels[:, 1:]).reshape(-1), ignore_index=-100)
    assert next_token_loss(program, (ids, mask), labels) == pytest.approx(float(expected), rel=1e-5)


def _item_rows(spec):
    """A synthetic analysis: ``spec`` = [(key, reach, memory increment, gain)], inference 1000 bytes."""
    rows = [OptionRow(Option(key.split("@")[0], reach=reach), 1000 + memory, 0, 0.1 + gain)
            for key, reach, memory, gain in spec]
    return Analysis("k", AnalysisSettings(), 1000, rows, baseline_accuracy=0.1, forward_ms=1.0)


def test_options_of_one_depth_share_its_cost_and_exact_matches_brute_force():
    # reach 2 costs 100 to reach, reach 1 costs 300; each option's own part on top
    spec = [("b2:norms@1", 2, 100, 0.01), ("b2:mlp@1", 2, 160, 0.05), ("b2:attention@1", 2, 140, 0.03),
            ("b1:norms@1", 1, 300, 0.02), ("b1:mlp@1", 1, 380, 0.06), ("b1:attention@1", 1, 350, 0.04)]
    analysis = _item_rows(spec)
    groups = list(items(analysis, False).values())
    flat = [i for g in groups for i in g]
    assert {i.option.group: (i.depth_memory, i.memory) for i in flat}["b2:mlp"] == (100, 60)
    assert cost([i for i in flat if i.option.group.startswith("b2")])[0] == 100 + 0 + 60 + 40
    for limit in (150, 200, 260, 400, 500, 700):
        best = max(sum(i.gain for i in subset) for n in range(len(flat) + 1)
                   for subset in itertools.combinations(flat, n) if cost(list(subset))[0] <= limit)
        picked = exact(groups, limit, None)
        assert cost(picked)[0] <= limit and sum(i.gain for i in picked) == pytest.approx(best), limit
    # summed alone-costs (the CNN estimate) would fit only one of the two block-2 options in 260
    assert {i.option.group for i in exact(groups, 260, None)} == {"b2:norms", "b2:mlp", "b2:attention"}


def test_the_search_is_deterministic_and_checked_by_the_compiler(llama, analysis, cache):
    budget = analysis.row("lm.model.layers.1:mlp@1").memory + (64 << 10)
    first = search_scheme(llama, *tokens(), batch=BATCH, budget=budget, settings=SETTINGS, cache_dir=cache)
    again = search_scheme(llama, *tokens(), batch=BATCH, budget=budget, settings=SETTINGS, cache_dir=cache)
    assert first.choice.options == again.choice.options and first.planned_bytes <= budget
    evolved = [search(analysis, budget, method="evolutionary", seed=3).options for _ in range(2)]
    assert evolved[0] == evolved[1]
    planned = plan_step(llama, scheme=first.scheme, loss="next_token", optimizer=SETTINGS.optimizer, baseline=False)
    assert planned.report.training_bytes() == first.planned_bytes


def test_budget_errors_name_the_smallest_option_and_the_time_budget(llama, analysis, tmp_path):
    smallest = min(analysis.rows, key=lambda r: r.memory)
    with pytest.raises(ValueError, match=f"no scheme fits.*{smallest.option.key}.*raise the budget"):
        search(analysis, smallest.memory - 1)
    with pytest.raises(ValueError, match="time budget of 1e-09 s ended before any option was planned"):
        analyze(llama, *tokens(), batch=BATCH, settings=AnalysisSettings(loss="next_token", time_budget_s=1e-9),
                cache_dir=tmp_path)
    with pytest.raises(ValueError, match="lora_ranks must be positive integers"):
        AnalysisSettings(lora_ranks=(0,))


def test_a_time_budget_stops_the_analysis_and_a_second_run_goes_on(llama, tmp_path):
    settings = AnalysisSettings(epochs=1, loss="next_token", last_blocks=2, lora_ranks=(), time_budget_s=1.5)
    first = analyze(llama, *tokens(), batch=BATCH, settings=settings, cache_dir=tmp_path)
    assert len(first.rows) < 6 or first.unmeasured()
    unlimited = AnalysisSettings(epochs=1, loss="next_token", last_blocks=2, lora_ranks=())
    second = analyze(llama, *tokens(), batch=BATCH, settings=unlimited, cache_dir=tmp_path)
    assert len(second.rows) == 6 and not second.unmeasured()
    assert second.seconds > first.seconds  # the same cache file, its time added to


@pytest.mark.slow  # about 20 s: its own analysis (make test covers the search on the fixture's)
def test_search_command_on_a_causal_lm_writes_its_scheme(tmp_path):
    from pock_tvm.cli.main import main

    factory = tmp_path / "tiny.py"
    factory.write_text("import sys\nsys.path.insert(0, %r)\nimport torch\nfrom helpers import tiny_llama\n\n"
                       "def model():\n    torch.manual_seed(0)\n    return tiny_llama()\n" % str(_tests_dir()))
    (ids, mask), _ = tokens()
    np.savez(tmp_path / "text.npz", input_ids=ids, attention_mask=mask)
    out = tmp_path / "scheme.toml"
    args = ["search", f"{factory}:model", "--data", str(tmp_path / "text.npz"), "--loss", "next_token",
            "--budget", "8MB", "--batch", "2", "--epochs", "2", "--lr", "0.01", "--last-blocks", "2", "--lora-ranks", "none",
            "--cache", str(tmp_path / "cache"), "-o", str(out)]
    assert main(args) in (0, None)
    scheme = pock_tvm.Scheme.load(out)
    assert scheme.rules or scheme.lora is not None
    np.savez(tmp_path / "bad.npz", input_ids=ids)
    assert main([*args[:3], str(tmp_path / "bad.npz"), "--budget", "8MB", "-o", str(out)]) == 2


def test_search_command_data_and_rank_errors(tmp_path, capsys):
    from pock_tvm.cli.main import main

    (ids, _), _ = tokens()
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    base = ["search", "mobilenetv2", "--budget", "8MB", "-o", str(tmp_path / "s.toml")]
    assert main([*base, "--data", str(tmp_path / "ids.npz")]) == 2
    assert "token data but no 'labels'" in capsys.readouterr().err
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 3, 8, 8), "float32"), y=np.zeros(4, "int64"))
    assert main([*base, "--data", str(tmp_path / "x.npz"), "--loss", "next_token"]) == 2
    assert "--loss next_token needs token data" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "x.npz"), "--lora-ranks", "4,x"]) == 2
    assert "--lora-ranks '4,x' is not a list of ranks" in capsys.readouterr().err


def _tests_dir():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def test_a_classifier_can_be_scored_by_its_held_out_loss():
    """metric='loss': a classifier's score is minus its cross-entropy, as torch computes it."""
    from pock_tvm.search.contribution import score

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4)).eval()
    x = np.random.default_rng(0).normal(size=(10, 6)).astype("float32")
    y = np.arange(10) % 4
    program = compile_step(model, (torch.zeros(5, 6),), scheme="full")
    expected = float(torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)))
    assert -score(program, x, y, AnalysisSettings(metric="loss")) == pytest.approx(expected, rel=1e-5)
    assert score(program, x, y, AnalysisSettings()) == float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    with pytest.raises(ValueError, match="metric must be 'accuracy' or 'loss'"):
        AnalysisSettings(loss="next_token", metric="accuracy")


def test_when_tightened_searches_keep_missing_the_budget_options_are_dropped_until_the_plan_fits(analysis):
    """The depth-shared estimate can miss what options cost together; after the retries the choice
    loses its options of least gain per byte, one by one, each step checked by the (here faked) plan."""
    from pock_tvm.search.scheme_search import _shrink
    from pock_tvm.search.search import Choice

    keys = ("lm.model.layers.1:mlp@1", "lm.model.layers.1:norms@1", "lm.model.norm:norms@1")
    choice = Choice(tuple(analysis.row(k).option for k in keys), 0.0, 0, None, "exact")
    fits_two = lambda options: 100 if len(options) <= 2 else 101  # noqa: E731
    shrunk, memory = _shrink(analysis, choice, 100, fits_two)
    base = analysis.baseline_accuracy
    per_byte = {k: analysis.row(k).gain(base) / analysis.row(k).memory for k in keys}
    assert memory == 100 and shrunk.method == "exact+shrunk"
    assert {o.key for o in shrunk.options} == set(keys) - {min(per_byte, key=per_byte.get)}
    with pytest.raises(ValueError, match="dropping options one by one"):
        _shrink(analysis, choice, 100, lambda options: 101)

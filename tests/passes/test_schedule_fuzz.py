"""Every default schedule computes what the kernel computes unscheduled, on random shapes.

Seeded random training-step kernels (``kernel_fuzz``: convs with groups, depthwise, strides 1-4,
windows 1-11, dilation, asymmetric padding, odd channel counts, batch 1-16; their input and weight
gradients and fused updates; matmuls; pools and their backward; reductions; softmax and layer norm)
are scheduled by ``ScheduleForCPU`` and run against their unscheduled form. ``--fuzz-seed N`` explores
other shapes, ``--fuzz-cases N`` sets the cases per kind (CI: seed 0, the slice below).
"""

from collections import Counter

import pytest
import tvm

from kernel_fuzz import KINDS, cases, fused_kernels, training_module
from pock_tvm.analysis.kernel_check import compare
from pock_tvm.passes import ScheduleForCPU
from pock_tvm.passes.cpu_rules import REDUCTION_RULES, SPATIAL_RULES
from pock_tvm.targets import load_target
from pock_tvm.targets.toolchain import tvm_target

# cases per kind in make test (~1 s each): convs get the most, they have the most rules; make
# test-all (CI) also runs a second seed with twice as many (test_a_second_seed_...)
CI_CASES = {"conv2d": 16, "matmul": 6, "wide_matmul": 3, "pool": 8, "reduction": 8, "norm": 4}
# every rule of the ordered lists: a new rule is held to the fuzz suite by being listed there
RULES = tuple(rule.name for rule in (*REDUCTION_RULES, *SPATIAL_RULES))


@pytest.fixture(scope="module")
def target():
    return tvm_target(load_target("host"))


def check_case(case, target, rules_seen: Counter, frozen: bool = False) -> list[str]:
    """What is wrong with the kernels of ``case`` (empty: nothing), counting the rules used.
    ``frozen``: every input of a kernel is marked as a constant (``layout_free_buffers``, as
    ``MarkFrozenOperands`` marks frozen weights), so the rules take their prepacking branch."""
    wrong = []
    for name, func in fused_kernels(training_module(case)).items():
        if frozen:
            func = func.with_attr("layout_free_buffers", list(range(len(func.params) - 1)))
        with target:
            scheduled = ScheduleForCPU().schedule(func)
        if scheduled is None:
            continue
        rules_seen.update(str(scheduled.attrs["pock_tvm.schedule_rules"]).split(","))
        check = compare(name, func, scheduled, target)
        if check is not None and not check.ok:
            wrong.append(f"{case}: {check.describe()}")
    return wrong


# the tests that count the rules they schedule, and the test that reads the count, run in one
# worker under `make test`'s xdist (`--dist loadgroup`); spread over workers, a rule scheduled on
# another worker looked unexercised
RULE_COUNT = pytest.mark.xdist_group("schedule-fuzz-rules")


@pytest.fixture(scope="module")
def rules_seen():
    return Counter()


@RULE_COUNT
@pytest.mark.parametrize("kind", KINDS)
def test_scheduled_kernels_compute_what_unscheduled_ones_do(kind, target, rules_seen, request):
    seed = request.config.getoption("--fuzz-seed")
    count = request.config.getoption("--fuzz-cases") or CI_CASES[kind]
    wrong, unsupported = [], []
    for case in cases(seed, count, [kind]):
        try:
            wrong += check_case(case, target, rules_seen)
        except Exception as err:  # noqa: BLE001 (a case that cannot build is listed, not hidden)
            unsupported.append(f"{case}: {str(err).splitlines()[-1][:160]}")
    assert not wrong, f"seed {seed}: {len(wrong)} kernels compute wrong numbers:\n" + "\n".join(wrong)
    assert not unsupported, f"seed {seed}: cases that do not build:\n" + "\n".join(unsupported)


@RULE_COUNT
@pytest.mark.parametrize("kind", ["matmul", "wide_matmul", "conv2d"])
def test_schedules_of_frozen_operands_compute_what_unscheduled_kernels_do(kind, target, rules_seen, request):
    """The branch that packs a constant operand in a stage of its own (split off and folded at
    compile time by PrepackFrozenWeights) computes the same numbers."""
    seed = request.config.getoption("--fuzz-seed")
    wrong = []
    for case in cases(seed + 7, request.config.getoption("--fuzz-cases") or 3, [kind]):
        wrong += check_case(case, target, rules_seen, frozen=True)
    assert not wrong, f"seed {seed + 7}: {len(wrong)} kernels compute wrong numbers:\n" + "\n".join(wrong)


@pytest.mark.slow  # make test-all (CI): more shapes than make test's slice
@pytest.mark.parametrize("kind", KINDS)
def test_a_second_seed_of_twice_the_cases_computes_what_unscheduled_kernels_do(kind, target):
    seed = 1000
    wrong = []
    for case in cases(seed, 2 * CI_CASES[kind], [kind]):
        wrong += check_case(case, target, Counter())
    assert not wrong, f"seed {seed}: {len(wrong)} kernels compute wrong numbers:\n" + "\n".join(wrong)


# another ISA's row of cpu_rules.ISAS, where this CPU runs its code (an AVX-512 CPU runs AVX2 code):
# the rows differ in the channel-vectorized rule's vector and tile, so the conv cases
OTHER_ISAS = {"avx": "haswell", "avx512f": "skylake-avx512"}


@pytest.mark.parametrize("feature", sorted(OTHER_ISAS))
def test_another_isas_schedules_compute_what_unscheduled_kernels_do(feature, target, request):
    from pock_tvm.passes.cpu_rules import CPU
    from pock_tvm.targets.toolchain import system_cpu_features

    other = tvm.target.Target({"kind": "llvm", "mcpu": OTHER_ISAS[feature]})
    if feature not in system_cpu_features() or CPU.of(other) == CPU.of(target):
        pytest.skip(f"this CPU does not run {feature} code, or it is this CPU's own row (tested above)")
    seed = request.config.getoption("--fuzz-seed")
    wrong = []
    for case in cases(seed, request.config.getoption("--fuzz-cases") or 6, ["conv2d"]):
        wrong += check_case(case, other, Counter())
    assert not wrong, f"seed {seed}, {feature}: {len(wrong)} kernels compute wrong numbers:\n" + "\n".join(wrong)


@RULE_COUNT
def test_the_fuzz_cases_exercise_every_rule(rules_seen, request):
    if not rules_seen:
        pytest.skip("runs after the fuzz tests of this module")
    missing = [r for r in RULES if not rules_seen[r]]
    assert not missing, f"no fuzz case was scheduled by {missing}; rules used: {dict(rules_seen)}"


# Regressions: shapes where a rule computed wrong numbers (tiles of rows fused that straddled rows:
# their write-back overwrote the neighbouring tile's outputs with stale sums)
@pytest.mark.parametrize("params", [
    # AlexNet's conv3 (3x3, 256 -> 384) over 12x12 maps at 224x224 (channel-vectorized, 16 of 144)
    dict(batch=1, cin=32, h=12, w=12, cout=48, kernel=(3, 3), stride=1, dilation=1, padding=(1, 1, 1, 1),
         groups=1, bias=True, relu=True),
    # a grouped 3x3 conv whose asymmetric padding leaves rows of 9 (tiles of 15 over 90)
    dict(batch=16, cin=27, h=10, w=10, cout=48, kernel=(3, 3), stride=1, dilation=1, padding=(1, 1, 1, 0),
         groups=3, bias=False, relu=True),
    # a 1x1 conv over 14x14 maps (ResNet-50's stage 4 at 224x224; register tile of 4 over rows of 14)
    dict(batch=1, cin=16, h=14, w=14, cout=32, kernel=(1, 1), stride=1, dilation=1, padding=(0, 0, 0, 0),
         groups=1, bias=False, relu=False),
    # the input gradient of a 3x3 conv over 2x2 maps at batch 8 (GoogLeNet's 4a at 32x32): the tile
    # took every loop, none was left to accumulate under (an IndexError that stopped the compile)
    dict(batch=8, cin=2, h=2, w=2, cout=6, kernel=(3, 3), stride=1, dilation=1, padding=(1, 1, 1, 1),
         groups=1, bias=False, relu=True),
])
def test_tiles_over_rows_of_a_map_keep_the_numbers(params, target):
    from kernel_fuzz import Case

    assert check_case(Case("conv2d", params), target, Counter()) == []


def test_a_tail_that_pads_its_producer_is_not_computed_inside_the_producers_loop(target):
    # a 3x3 stride-2 max pool over 16x16 maps reads 15 rows: its gradient is a transposed conv over
    # 15x15 padded to 16x16; computed per tile of the conv, the pad's last row was never written
    from kernel_fuzz import Case

    case = Case("pool", dict(op="max", batch=8, c=8, h=16, w=16, kernel=3, stride=2, padding=(0, 0, 0, 0),
                             ceil_mode=False, count_include_pad=True))
    assert check_case(case, target, Counter()) == []

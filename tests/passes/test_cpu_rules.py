"""cpu_rules: the target facts the schedule rules read (a table by ISA) and the rule lists."""

import pytest
import tvm

from pock_tvm.passes import ScheduleForCPU
from pock_tvm.passes.cpu_rules import CPU, FALLBACK_REDUCTION_RULES, ISAS, REDUCTION_RULES, SPATIAL_RULES, CPURule


@pytest.mark.parametrize("target, feature", [
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, "avx512f"),
    ({"kind": "llvm", "mcpu": "haswell"}, "avx"),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}, "neon"),
    ({"kind": "llvm", "mtriple": "arm64-apple-macos", "mcpu": "apple-m1"}, "neon"),
])
def test_the_vector_registers_come_from_the_targets_isa(target, feature):
    isa = next(i for i in ISAS if i.feature == feature)
    cpu = CPU.of(tvm.target.Target(target))
    assert (cpu.lanes, cpu.vector_bytes, cpu.registers, cpu.tile_vectors) == \
        (isa.lanes, isa.vector_bytes, isa.registers, isa.tile_vectors)


def test_the_current_target_is_read_and_overrides_win():
    with tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}):
        assert CPU.of().vector_bytes == 32
        assert ScheduleForCPU(lanes=4).cpu().lanes == 4
        assert ScheduleForCPU().cpu().registers == 16
    assert CPU.of() == CPU()  # no target: the default row (the rules' tested defaults)
    assert CPU.of(tvm.target.Target({"kind": "cuda", "arch": "sm_87"})) == CPU()


@pytest.mark.parametrize("vector_bytes, registers, width, rows", [
    (64, 32, 16, 8),  # AVX-512: one register a row of 16 lanes, 8 rows (the limit)
    (32, 16, 16, 6),  # AVX2: two registers a row, (16 - 4) / 2
    (32, 16, 8, 8),
    (16, 32, 16, 7),  # NEON: four registers a row, (32 - 4) / 4
    (64, 32, 48, 8),  # AVX-512, a row of 3 vectors: (32 - 4) / 3 = 9, the limit 8 (24 accumulators)
    (64, 32, 32, 8),  # 2 vectors: 14, the limit
])
def test_register_tile_rows_leave_room_for_a_loaded_vector_and_a_broadcast(vector_bytes, registers, width, rows):
    assert CPU(vector_bytes=vector_bytes, registers=registers).tile_rows(width) == rows


def test_vector_lanes_divide_the_loop_and_keep_rows_whole():
    cpu = CPU(lanes=16)
    assert cpu.vector_lanes(12) == 12  # short: all of it
    assert cpu.vector_lanes(48) == 16
    assert cpu.vector_lanes(40) == 8
    assert cpu.vector_lanes(13 * 13) is None  # nothing divides it
    assert cpu.vector_lanes(144, align=12) == 4  # rows of 12 fused: 16 and 8 would straddle rows
    assert CPU(lanes=8).vector_lanes(40) == 8 and CPU(lanes=8).vector_lanes(12) == 4


def test_rules_are_units_with_unique_names_in_explicit_lists():
    rules = [*REDUCTION_RULES, *SPATIAL_RULES]
    assert all(isinstance(r, CPURule) for r in rules)
    assert len({r.name for r in rules}) == len(rules)
    assert REDUCTION_RULES[-1].name == "plain_reduction"  # applies to any reduction: last
    assert [r.name for r in FALLBACK_REDUCTION_RULES] == ["plain_reduction"]

"""scripts/bench_overhead.py: the floor arm follows the engine, the ratios are paired."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_overhead.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_overhead", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ratios_are_medians_of_rounds(bench: ModuleType,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    # the machine's speed changes between rounds: the medians of each arm would
    # say 1100/1500 = 0.733 for traced; the rounds say 1.1, 0.9 and 0.5
    plain = [(1000.0, 2.0, 100.0), (1500.0, 4.0, 200.0), (2000.0, 1.0, 50.0)]
    traced = [(1100.0, 2.2, 110.0), (1350.0, 4.4, 220.0), (1000.0, 1.1, 55.0)]
    floor = [(990.0, 2.0, 101.0), (1485.0, 4.0, 202.0), (1980.0, 1.0, 50.5)]
    bench.report(plain, traced, floor, True)
    out = capsys.readouterr().out
    assert "traced/untraced (median of 3 rounds): 0.900" in out
    assert "p99 latency ratio traced/untraced (median): 1.100" in out
    assert "CPU per transaction traced/untraced (median): 1.100" in out
    assert "throughput ratio 0.990, CPU per transaction 1.010" in out


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")
def test_floor_attaches_where_the_engine_does(bench: ModuleType) -> None:
    """The empty programs sit on exactly the raw tracepoints the engine's programs use."""
    from pgtrace.collect.loader import ProgramConfig, compile_program, import_bcc

    engine = compile_program(ProgramConfig())
    try:
        engine_tps = set(engine.raw_tracepoint_fds)
    finally:
        engine.cleanup()
    floor = import_bcc().BPF(text=bench.floor_program())
    try:
        floor_tps = set(floor.raw_tracepoint_fds)
    finally:
        floor.cleanup()
    assert engine_tps and floor_tps == engine_tps


def test_read_scale_is_the_ratio_of_shared_buffers(bench: ModuleType) -> None:
    # ~15 MB of pgbench_accounts and its index per unit of scale
    assert bench.read_scale(32, 8) == 18  # 8 x 32 MB = 256 MB -> 17.07, rounded up
    assert bench.read_scale(32, 8) * bench.PGBENCH_MB_PER_SCALE >= 8 * 32
    assert bench.read_scale(128, 4) == 35
    assert bench.read_scale(1, 0.1) == 1  # never below 1


def test_per_txn_divides_by_the_runs_transactions(bench: ModuleType) -> None:
    assert bench.per_txn(3000.0, 100.0, 10) == 3.0  # 1000 transactions
    assert bench.per_txn(5.0, 0.0, 10) == 5.0  # no transaction: no division by zero

"""The benchmarks' shared timing loop: no step always runs first (benchmarks are not tests; their helper is)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any


def bench_common() -> Any:
    """bench/common.py, loaded by path: bench/ is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).parents[2] / "bench" / "common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_round_starts_one_step_later() -> None:
    interleaved = bench_common().interleaved
    ran: list[str] = []
    steps = {name: (lambda name=name: ran.append(name)) for name in ("peer", "subject", "third")}
    samples = interleaved(steps, 4, before=lambda: ran.append("-"))
    assert [r for r in ran if r != "-"] == [
        *("peer", "subject", "third"),
        *("subject", "third", "peer"),
        *("third", "peer", "subject"),
        *("peer", "subject", "third"),
    ]
    assert ran.count("-") == 12 and {k: len(v) for k, v in samples.items()} == {"peer": 4, "subject": 4, "third": 4}
    assert interleaved({}, 3) == {}

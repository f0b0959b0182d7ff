"""Audit log rotation: rotating by rename during a burst of writes from several processes loses no line and
writes none into a deleted file, because write_audit opens the file with O_APPEND for every record."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import time
from pathlib import Path

from hostguard.host.audit import write_audit
from tests.testbed.prereq import require_tool

LOGROTATE_CONF = Path(__file__).resolve().parents[2] / "hostguard" / "data" / "hostguard.logrotate"
WRITERS = 4
RECORDS = 400
PACE = 0.003  # seconds between one writer's records: the burst lasts ~1 s, long enough for several rotations


def _writer(path: str, writer: int, start: float) -> None:
    while time.monotonic() < start:
        pass
    for seq in range(RECORDS):
        write_audit(Path(path), {"domain": f"w{writer}", "seq": seq, "verdict": "allow"}, to_syslog=False)
        time.sleep(PACE)


def burst(log: Path, rotate: object) -> None:
    """Run the writers; call `rotate()` over and over until they are done."""
    ctx = multiprocessing.get_context("fork")
    start = time.monotonic() + 0.2
    procs = [ctx.Process(target=_writer, args=(str(log), w, start)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    rotations = 0
    while any(p.is_alive() for p in procs):
        time.sleep(0.005)
        if log.exists():
            rotate()  # type: ignore[operator]
            rotations += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert rotations >= 3, "the burst ended before it could be rotated: make it longer"


def records_by_file(directory: Path) -> dict[str, list[tuple[str, int]]]:
    out = {}
    for path in sorted(directory.glob("audit.jsonl*")):
        # json.loads fails on a torn or interleaved line
        out[path.name] = [(r["domain"], r["seq"]) for r in map(json.loads, path.read_bytes().splitlines())]
    return out


def assert_complete(directory: Path) -> None:
    files = records_by_file(directory)
    seen = [rec for recs in files.values() for rec in recs]
    assert len(seen) == len(set(seen)) == WRITERS * RECORDS
    # The rotations really split the burst, and each file holds, per writer, one unbroken run of its records:
    # a writer never went back to a file that had been rotated away (what a long-lived descriptor would do).
    assert sum(1 for recs in files.values() if recs) >= 3
    for recs in files.values():
        for w in range(WRITERS):
            mine = [seq for name, seq in recs if name == f"w{w}"]
            assert mine == list(range(mine[0], mine[0] + len(mine))) if mine else True


def test_rename_rotation_during_a_burst_of_writers_loses_no_line(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    generation = [0]

    def rotate() -> None:
        generation[0] += 1
        os.rename(log, tmp_path / f"audit.jsonl.{generation[0]:05d}")

    burst(log, rotate)
    assert_complete(tmp_path)


def test_shipped_logrotate_config_during_a_burst_loses_no_line(tmp_path: Path) -> None:
    logrotate = require_tool("logrotate")
    text = LOGROTATE_CONF.read_text()
    assert "copytruncate" not in re.sub(r"#.*", "", text), "copytruncate loses lines"
    log = tmp_path / "audit.jsonl"
    # The shipped stanza, pointed at the temp file; `create` as this user (a test may run without root).
    conf = tmp_path / "logrotate.conf"
    body = text.replace("/var/log/hostguard/audit.jsonl /var/log/hostguard/hook.log", str(log))
    body = body.replace("create 0640 root adm", "create 0640").replace("rotate 52", "rotate 100000")
    conf.write_text(body.replace("\tcompress\n", "\tnocompress\n"))  # count lines without gunzip
    state = tmp_path / "logrotate.state"

    def rotate() -> None:
        subprocess.run([logrotate, "-f", "-s", str(state), str(conf)], check=True, capture_output=True)

    burst(log, rotate)
    assert_complete(tmp_path)
    assert len(list(tmp_path.glob("audit.jsonl.*"))) >= 3


def test_shipped_logrotate_config_parses() -> None:
    logrotate = require_tool("logrotate")
    done = subprocess.run([logrotate, "-d", str(LOGROTATE_CONF)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "error" not in done.stderr.lower(), done.stderr

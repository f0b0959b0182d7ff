"""Shared helpers for the verification and hook benchmarks: interleaved timing against a peer command measured
in the same run, machine context, random test files, page-cache control and a signed image.

Every comparison runs the peer and the subject alternately, round after round, so that load from other work
on the machine hits both alike; the ratio reported is of medians (the minimums are printed as well).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
HOSTGUARD = str(Path(PY).with_name("hostguard"))
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}  # what libvirtd gives a hook

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- timing ---------------------------------------------------------------------------------------------------

Step = Callable[[], None]


def command(argv: Sequence[str], *, stdin: bytes | None = None, env: Mapping[str, str] | None = None,
            expect: int = 0) -> Step:  # fmt: skip
    """A step that runs `argv` and fails the benchmark on an unexpected exit code."""

    def run() -> None:
        proc = subprocess.run(list(argv), input=stdin, capture_output=True, env=env, check=False)
        if proc.returncode != expect:
            raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-800:]}")

    return run


def interleaved(steps: Mapping[str, Step], rounds: int, *, before: Step | None = None) -> dict[str, list[float]]:
    """Wall seconds of each step, `rounds` times; each round starts one step later than the one before, so no
    step always runs first (a cold cache) or always after the same one (`before` is untimed)."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps.items())
    for r in range(rounds if order else 0):
        for name, step in order[r % len(order) :] + order[: r % len(order)]:
            if before is not None:
                before()
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
    return samples


def stats(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "min": ordered[0],
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1],
    }


def compare(samples: Mapping[str, Sequence[float]], subject: str, peer: str, target: float) -> dict[str, object]:
    """Medians, minimums and the ratios subject/peer, with the verdict against `target`."""
    s, p = stats(samples[subject]), stats(samples[peer])
    ratio = s["median"] / p["median"]
    return {
        "subject": subject,
        "peer": peer,
        "subject_ms": {k: round(v * 1000, 2) if k != "n" else v for k, v in s.items()},
        "peer_ms": {k: round(v * 1000, 2) if k != "n" else v for k, v in p.items()},
        "ratio_median": round(ratio, 3),
        "ratio_min": round(s["min"] / p["min"], 3),
        "target": target,
        "met": ratio <= target,
    }


def show(title: str, result: Mapping[str, object]) -> None:
    s, p = result["subject_ms"], result["peer_ms"]
    assert isinstance(s, dict) and isinstance(p, dict)
    mark = "MET" if result["met"] else "NOT MET"
    print(f"\n## {title}")
    print(
        f"  {result['subject']}: median {s['median']:.1f} ms, min {s['min']:.1f} ms, p90 {s['p90']:.1f} ms (n={s['n']})"
    )
    print(f"  {result['peer']}: median {p['median']:.1f} ms, min {p['min']:.1f} ms, p90 {p['p90']:.1f} ms (n={p['n']})")
    print(f"  ratio (medians) {result['ratio_median']:.2f}x, (minimums) {result['ratio_min']:.2f}x; "
          f"target <= {result['target']}x: {mark}")  # fmt: skip


# --- machine ----------------------------------------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "unavailable"


def machine_context(paths: Sequence[Path] = ()) -> dict[str, object]:
    cpu = "unknown"
    flags: set[str] = set()
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    with open("/proc/meminfo") as fh:
        mem_kib = int(fh.readline().split()[1])
    import sqlite3

    context: dict[str, object] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "sha_ni": "sha_ni" in flags,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "openssl": _first_line(["openssl", "version"]),
        "sqlite": sqlite3.sqlite_version,
        "libvirt": _first_line(["libvirtd", "--version"]),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "loadavg_at_start": os.getloadavg(),
        "env_PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
    }
    for path in paths:
        context[f"filesystem_of_{path}"] = _first_line(["findmnt", "-no", "SOURCE,FSTYPE", "--target", str(path)])
    return context


def compile_package() -> None:
    """What scripts/setup.sh does: bytecode for the package, so no run pays for compiling it."""
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "hostguard")], check=True, capture_output=True)


# --- files ----------------------------------------------------------------------------------------------------


def random_file(path: Path, size: int) -> None:
    """`size` bytes of AES-CTR keystream under a random key: incompressible, not sparse, generated fast."""
    key = os.urandom(16).hex()
    with path.open("wb") as out:
        zero = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        enc = ["openssl", "enc", "-aes-128-ctr", "-nosalt", "-K", key, "-iv", "0" * 32]
        subprocess.run(enc, stdin=zero.stdout, stdout=out, check=True)
        assert zero.stdout is not None
        zero.stdout.close()
        if zero.wait() != 0:
            raise RuntimeError("head failed")
    if path.stat().st_size != size:
        raise RuntimeError(f"{path}: expected {size} bytes")


def drop_from_page_cache(*paths: Path) -> None:
    """Evict these files' clean pages (only theirs: the rest of the machine keeps its cache)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(*paths: Path) -> None:
    for path in paths:
        with path.open("rb") as fh:
            while fh.read(1 << 22):
                pass


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


# --- a signed image -------------------------------------------------------------------------------------------


class SignedImage:
    """A test PKI and trust directory, and an image signed as NAME v1 (optionally with boot files)."""

    def __init__(self, workdir: Path, image: Path, *, fmt: str = "raw", kernel: Path | None = None,
                 initrd: Path | None = None, name: str = "bench") -> None:  # fmt: skip
        from hostguard.cli import main
        from tests.testbed.pki import TestPKI

        pki = TestPKI()
        self.trust = pki.write_trust_dir(workdir / "trust", crls=[pki.crl()])
        cert, key = pki.leaf.write(workdir / "keys", "leaf")
        chain = workdir / "keys" / "chain.pem"
        chain.write_bytes(pki.intermediate.pem)
        manifest = workdir / "manifest.json"
        create = ["manifest", "create", str(image), "--name", name, "--version", "1", "--format", fmt]
        if kernel is not None and initrd is not None:
            create += ["--kernel", str(kernel), "--initrd", str(initrd)]
        if main([*create, "--reader", "none", "--quiet", "-o", str(manifest)]) != 0:
            raise RuntimeError("manifest create failed")
        self.envelope = Path(f"{image}.hgsig")
        sign = ["sign", str(manifest), "--key", str(key), "--cert", str(cert), "--chain", str(chain)]
        if main([*sign, "-o", str(self.envelope)]) != 0:
            raise RuntimeError("sign failed")
        self.image = image


def write_report(path: Path | None, report: Mapping[str, object]) -> None:
    text = json.dumps(report, indent=1, default=str)
    if path is not None:
        path.write_text(text + "\n")
        log(f"report written to {path}")

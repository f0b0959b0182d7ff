"""Benchmark `hostguard library pull` from a loopback registry against `curl` + `openssl dgst`, side by side.

    .venv/bin/python bench/bench_oci.py [--rounds 3] [--size-gib 2] [--small-mib 256] [--json FILE]

Subject: `hostguard library pull oci://127.0.0.1:PORT/bench/img@sha256:… --insecure --json` into an empty
library (download + layer check + disk digest + envelope verification + library add; the disk is unpacked from
the layer as it streams; push's own layer is checked by its signed layout, ADR 0034, which the output names).
Peer: `curl -o FILE` of the same layer blob from the same registry, then `openssl dgst -sha256 FILE`.
Target: median within 1.1x. Peak memory (maximum resident set of the pull process) is measured for the 2 GiB
image and for a --small-mib one: flat means about the same.

The registry is Debian's docker-registry (tests/testbed/registry.py), its storage and the images in --workdir
(default /var/tmp), all removed at the end; the libvirt pool the library makes is undefined.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    HOSTGUARD,
    SignedImage,
    compare,
    compile_package,
    free_bytes,
    interleaved,
    log,
    machine_context,
    random_file,
    show,
    write_report,
)

from tests.testbed.registry import LocalRegistry


def run_measured(argv: list[str]) -> tuple[int, bytes]:
    """Run argv; return its peak resident set in KiB and its output (fails the benchmark on a non-zero exit)."""
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        output.seek(0)
        out = output.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {err.decode(errors='replace')[-800:]}")
    return int(usage.ru_maxrss), out


class Setup:
    """A signed image of `size` bytes pushed to the registry, and a host config whose library starts empty."""

    def __init__(self, work: Path, registry: LocalRegistry, size: int, tag: str) -> None:
        self.work = work
        work.mkdir()
        image = work / "image.raw"
        log(f"generating {size / 2**20:.0f} MiB of random data, signing it, pushing it")
        random_file(image, size)
        self.signed = SignedImage(work, image, name=f"bench{tag}")
        out = subprocess.run(
            [HOSTGUARD, "library", "push", str(image), str(self.signed.envelope), registry.url(f"bench/img:{tag}"),
             "--insecure", "--json"], capture_output=True, text=True, check=True,
        )  # fmt: skip
        pushed = json.loads(out.stdout)
        self.ref = f"{registry.url('bench/img')}@{pushed['digest']}"
        self.blob_url = f"http://{registry.host}/v2/bench/img/blobs/{pushed['layer']}"
        self.pool = f"hg-bench-oci-{os.getpid()}-{tag}"
        self.library = work / "library"
        self.config = work / "hostguard.toml"
        self.config.write_text(
            f'[trust]\ndir = "{self.signed.trust}"\n[state]\ndir = "{work / "state"}"\n'
            f'[library]\ndir = "{self.library}"\npool = "{self.pool}"\n'
            f'[audit]\nlog = "{work / "audit.jsonl"}"\nsyslog = false\n'
        )
        image.unlink()  # only the registry's copy is needed from here on
        self.name = f"bench{tag}-v1"
        self.peak_kib: list[int] = []
        self.checked_by: set[str] = set()

    def pull(self) -> None:
        argv = [HOSTGUARD, "library", "pull", self.ref, "--insecure", "--json", "--config", str(self.config)]
        peak, out = run_measured(argv)
        self.peak_kib.append(peak)
        self.checked_by.add(json.loads(out)["layer_checked_by"])

    def empty_library(self) -> None:
        if (self.library / f"{self.name}.raw").exists():
            subprocess.run([HOSTGUARD, "library", "remove", self.name, "--force", "--config", str(self.config)],
                           check=True, capture_output=True)  # fmt: skip

    def close(self) -> None:
        for cmd in (["virsh", "pool-destroy", self.pool], ["virsh", "pool-undefine", self.pool]):
            subprocess.run(cmd, capture_output=True, check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--small-mib", type=int, default=256, help="second image, for peak memory vs size")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()

    size = int(args.size_gib * 2**30)
    if free_bytes(args.workdir) < 4 * size + 2**30:
        log(f"not enough space in {args.workdir}: registry copy, library copy and curl's copy of {size} bytes")
        return 2
    compile_package()
    work = Path(tempfile.mkdtemp(prefix="hostguard-bench-oci-", dir=args.workdir))
    report: dict[str, object] = {"machine": machine_context([work])}
    setups: list[Setup] = []
    try:
        with LocalRegistry(work) as registry:
            big = Setup(work / "big", registry, size, "big")
            small = Setup(work / "small", registry, args.small_mib * 2**20, "small")
            setups += [big, small]
            fetched = work / "curl.blob"

            def peer() -> None:
                subprocess.run(["curl", "-sf", "-o", str(fetched), big.blob_url], check=True)
                subprocess.run(["openssl", "dgst", "-sha256", str(fetched)], check=True, capture_output=True)

            def before() -> None:
                fetched.unlink(missing_ok=True)
                big.empty_library()

            log(f"{args.rounds} interleaved rounds: pull vs curl + openssl dgst")
            samples = interleaved(
                {"curl + openssl dgst -sha256": peer, "hostguard library pull": big.pull}, args.rounds, before=before
            )
            result = compare(samples, "hostguard library pull", "curl + openssl dgst -sha256", 1.1)
            show(f"pull of a {args.size_gib:g} GiB image from a loopback registry", result)
            for name, values in samples.items():
                print(f"  {name}, each round: " + ", ".join(f"{v * 1000:.0f}" for v in values) + " ms")
            print(f"  the pulled layer was vouched for by: {', '.join(sorted(big.checked_by))}")
            report["pull"] = {
                **result,
                "command": "hostguard library pull oci://HOST/bench/img@DIGEST --insecure",
                "layer_checked_by": sorted(big.checked_by),
            }
            for _ in range(args.rounds):
                small.empty_library()
                small.pull()
            peaks = {"big": max(big.peak_kib) / 1024, "small": max(small.peak_kib) / 1024}
            print(f"  peak memory of the pull: {peaks['big']:.1f} MiB ({args.size_gib:g} GiB image), "
                  f"{peaks['small']:.1f} MiB ({args.small_mib} MiB image)")  # fmt: skip
            report["peak_rss_mib"] = peaks
            fetched.unlink(missing_ok=True)
            for s in setups:
                s.empty_library()
    finally:
        for s in setups:
            s.close()
        subprocess.run(["chattr", "-R", "-i", str(work)], capture_output=True, check=False)  # library files
        shutil.rmtree(work, ignore_errors=True)
        log(f"removed {work}")
    report["loadavg_at_end"] = os.getloadavg()
    print(f"\nmachine: {report['machine']}")
    print(f"load average at end: {report['loadavg_at_end']}")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

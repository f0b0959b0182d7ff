"""What the pre-boot overlay content check (issue 14, hostguard.preboot.overlays) costs in `decide`.

    .venv/bin/python bench/bench_overlay.py [--rounds 5] [--data-mib 100]

Set-up (no libvirt): the test bed's Debian 12 minbase image (600 MB ext4, cached by tests/testbed/debian.py),
signed with a full file inventory; three qcow2 overlays on it, written through QEMU's qemu-io:
  fresh  — just created (what most starts see),
  used   — DATA MiB of new non-executable data in /var/cache (the guest wrote logs and caches): allowed,
  tamper — the same plus an executable planted in /usr/local/bin: denied.
Each is decided in-process (`hostguard.preboot.decide.decide`, the hook's decision), warm caches (verdict,
digests, parse) and, for the used overlays, first with no base index (built and cached by the first check)
then with the cached index and an empty in-memory memo, as a fresh hook process has it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostguard.cli import main as hostguard_main
from hostguard.errors import VerificationError
from hostguard.host.config import Config
from hostguard.imagefs import overlayview
from hostguard.preboot.decide import decide
from tests.testbed.debian import debian_image
from tests.testbed.pki import TestPKI
from tests.unit.diskcheck_images import debugfs, overlay_with
from tests.unit.inventory_images import run

WORK = Path("/var/tmp/hostguard-bench-overlay")


def xml(disk: Path) -> bytes:
    return (
        "<domain type='qemu'><name>bench</name><uuid>3f1c2b4a-5d6e-4f70-8a9b-0c1d2e3f4a5b</uuid>"
        "<memory unit='MiB'>128</memory><os><type arch='x86_64'>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>"
    ).encode()


def timed(config: Config, disk: Path, *, clear_index: bool = False) -> tuple[float, str]:
    overlayview._memo.items.clear()  # a new hook process has no in-memory index
    if clear_index:
        shutil.rmtree(config.state_dir / overlayview.INDEX_DIR, ignore_errors=True)
    started = time.perf_counter()
    try:
        decision = decide(xml(disk), config, time.time())
        outcome = next((n for n in decision.notes if "overlay content" in n), "allow (no overlay read)")
    except VerificationError as exc:
        outcome = f"deny: {str(exc)[:140]}"
    return (time.perf_counter() - started) * 1000, outcome


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--data-mib", type=int, default=100)
    args = ap.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    pki = TestPKI()
    trust = pki.write_trust_dir(WORK / "trust", crls=[pki.crl()])
    cert, key = pki.leaf.write(WORK / "keys", "leaf")
    (WORK / "keys" / "chain.pem").write_bytes(pki.intermediate.pem)
    base = WORK / "base.qcow2"
    shutil.copyfile(debian_image().qcow2, base)
    create = ["manifest", "create", str(base), "--name", "debian", "--version", "1", "--format", "qcow2"]
    assert hostguard_main([*create, "--reader", "fast", "--quiet", "-o", str(WORK / "m.json")]) == 0
    sign = ["sign", str(WORK / "m.json"), "--key", str(key), "--cert", str(cert), "--chain"]
    assert hostguard_main([*sign, str(WORK / "keys" / "chain.pem"), "-o", f"{base}.hgsig"]) == 0
    config = Config({"trust": {"dir": str(trust)}, "state": {"dir": str(WORK / "state")}}, WORK / "hostguard.toml")

    raw = WORK / "base.raw"
    run("qemu-img", "convert", "-O", "raw", base, raw)
    blob = WORK / "blob"
    blob.write_bytes(os.urandom(args.data_mib << 20))
    used_raw, tamper_raw = WORK / "used.raw", WORK / "tamper.raw"
    shutil.copyfile(raw, used_raw)
    debugfs(used_raw, [f"write {blob} /var/cache/blob"])
    shutil.copyfile(used_raw, tamper_raw)
    debugfs(tamper_raw, ["write /usr/bin/true /usr/local/bin/evil", "sif /usr/local/bin/evil mode 0100755"])
    fresh = WORK / "fresh.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, fresh)
    used = overlay_with(base, raw, used_raw, WORK / "used.qcow2", unit=65536)
    tamper = overlay_with(base, raw, tamper_raw, WORK / "tamper.qcow2", unit=65536)
    for p in (raw, used_raw, tamper_raw, blob):
        p.unlink()

    timed(config, fresh)  # warm the verdict, digest and parse caches
    for name, disk in (("fresh", fresh), ("used", used), ("tamper", tamper)):
        if name != "fresh":
            ms, outcome = timed(config, disk, clear_index=True)
            print(f"{name:6} no index yet : {ms:8.1f} ms  {outcome}")
        runs = [timed(config, disk) for _ in range(args.rounds)]
        median = statistics.median(ms for ms, _ in runs)
        print(f"{name:6} warm (median of {args.rounds}): {median:8.1f} ms  {runs[-1][1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

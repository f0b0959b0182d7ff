"""Benchmark `hostguard verify` against its peers, measured side by side in the same run.

    .venv/bin/python bench/bench_verify.py [--rounds 40] [--digest-rounds 3] [--size-gib 2] [--json FILE]

1. Cached re-verification — `hostguard verify ENVELOPE --trust DIR --image IMG --state DIR` with the verdict
   and the image digest cached — against the bare interpreter start `.venv/bin/python -c pass`.
   Target: median within 1.5x.
2. First-time digest of a 2 GiB image of random data — `hostguard verify` with an empty state directory (so
   the image is hashed and the signature, chain and CRL are checked) — against `openssl dgst -sha256` on the
   same file. Target: median within 1.1x. Measured with the file in the page cache and, separately, with its
   pages dropped before every run of either tool (POSIX_FADV_DONTNEED on that file only).

3. Re-verification of an image the digest cache may not trust (docs/adr/0007-cache-trust.md): the same image
   owned by a non-root user (what libvirt's dynamic ownership does while a domain runs), so every start hashes
   it although the verdict is cached — against `openssl dgst -sha256`, page cache warm. This is the cost of
   "hash at every start" for writable images; immutable (library) and root-owned images with no writer keep 1.
   Needs root (chown); skipped otherwise.

The image is generated once per run in --workdir (default /var/tmp; real random data, never sparse) and
removed at the end with everything else the run made.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    HOSTGUARD,
    PY,
    SignedImage,
    command,
    compare,
    compile_package,
    drop_from_page_cache,
    free_bytes,
    interleaved,
    log,
    machine_context,
    random_file,
    show,
    warm_page_cache,
    write_report,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40, help="rounds for the cached re-verification (default 40)")
    ap.add_argument("--digest-rounds", type=int, default=5, help="rounds for the first-time digest (default 5)")
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()

    size = int(args.size_gib * 2**30)
    if free_bytes(args.workdir) < size + 2**30:
        log(f"not enough space in {args.workdir} for a {args.size_gib} GiB image")
        return 2
    compile_package()
    work = Path(tempfile.mkdtemp(prefix="hostguard-bench-verify-", dir=args.workdir))
    report: dict[str, object] = {"machine": machine_context([work])}
    try:
        image = work / "image.raw"
        log(f"generating {args.size_gib} GiB of random data in {image}")
        random_file(image, size)
        log("signing it (manifest create hashes it once)")
        signed = SignedImage(work, image)
        state = work / "state"
        verify = [HOSTGUARD, "verify", str(signed.envelope), "--trust", str(signed.trust), "--image", str(image)]

        # 1. cached re-verification vs the bare interpreter
        command([*verify, "--state", str(state)])()  # warms the verdict and digest caches
        cached = {
            "python -c pass": command([PY, "-c", "pass"]),
            "hostguard verify (cached)": command([*verify, "--state", str(state)]),
        }
        log(f"cached re-verification: {args.rounds} interleaved rounds")
        samples = interleaved(cached, args.rounds)
        result = compare(samples, "hostguard verify (cached)", "python -c pass", 1.5)
        show("cached re-verification vs bare interpreter start", result)
        report["cached_verify"] = {**result, "command": " ".join([*verify, "--state", "STATE"])}

        # 2. first-time digest vs openssl, page cache warm and cold
        counter = iter(range(10**6))

        def fresh_state() -> list[str]:
            return ["--state", str(work / f"fresh-{next(counter)}")]

        def first_verify() -> None:
            command([*verify, *fresh_state()])()

        openssl = command(["openssl", "dgst", "-sha256", str(image)])
        for label, before in (("page cache warm", lambda: warm_page_cache(image)),
                              ("page cache dropped", lambda: drop_from_page_cache(image))):  # fmt: skip
            log(f"first-time digest, {label}: {args.digest_rounds} interleaved rounds")
            samples = interleaved(
                {"openssl dgst -sha256": openssl, "hostguard verify (empty state)": first_verify},
                args.digest_rounds,
                before=before,
            )
            result = compare(samples, "hostguard verify (empty state)", "openssl dgst -sha256", 1.1)
            show(f"first-time digest of {args.size_gib:g} GiB, {label}", result)
            report[f"first_digest_{label.replace(' ', '_')}"] = result
            for old in work.glob("fresh-*"):
                shutil.rmtree(old)

        # 3. an image the digest cache may not trust: hashed at every start, verdict cached
        if os.geteuid() == 0:
            os.chown(image, 65534, 65534)
            writable = "hostguard verify (user-owned image, verdict cached)"
            command([*verify, "--state", str(state)])()
            log(f"re-verification of a user-owned image: {args.digest_rounds} interleaved rounds")
            samples = interleaved(
                {"openssl dgst -sha256": openssl, writable: command([*verify, "--state", str(state)])},
                args.digest_rounds,
                before=lambda: warm_page_cache(image),
            )
            result = compare(samples, writable, "openssl dgst -sha256", 1.1)
            show(f"re-verification of a {args.size_gib:g} GiB user-owned image, page cache warm", result)
            report["writable_image_reverify"] = result
        else:
            log("not root: the user-owned image measurement is skipped")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        log(f"removed {work}")
    report["loadavg_at_end"] = os.getloadavg()
    print(f"\nmachine: {report['machine']}")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

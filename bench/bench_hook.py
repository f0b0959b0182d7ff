"""Benchmark the installed libvirt hook at `prepare begin`, side by side with its peers in the same run.

    .venv/bin/python bench/bench_hook.py [--rounds 30] [--cold-rounds 3] [--virsh-rounds 10] [--size-gib 2]
                                         [--parts ABCD] [--json FILE]

Set-up: a GuardedHost (test PKI, trust store, hostguard.toml, the hook installed into the running libvirtd),
a 2 GiB raw image of random data signed with the busybox guest's kernel and initrd and made immutable (as the
image library does, so libvirt's relabelling leaves its ctime alone), and a TCG domain booting it through a
qcow2 overlay. The host-wide test-bed lock is held for the whole run (other test runs wait). The kernel and
initrd are relabelled by libvirt on every start and stop; the hook re-hashes them at `release end`.

A. the installed hook file run as libvirtd runs it (clean environment, the domain's XML with a live id on
   stdin), warm caches, against `.venv/bin/python -c pass` in the same environment. Target: median <= 1.5x.
B. the same with cold caches (state database removed before each run: the hook parses the XML with lxml,
   verifies signature, chain and CRL, and hashes the image, the kernel and the initrd) against
   `openssl dgst -sha256` over the same three files. Target: median <= 1.1x.
C. through a real `virsh start` (libvirt's own spawn of the hook): shell hooks 48/49 and 51 around
   50-hostguard stamp the time; 51-start minus 49-end is the hook's wall time plus libvirt's spawn of the
   next script, and 49-end minus 48-end measures that spawn overhead alone (a trivial script).
D. ten domains started at once (threads, one connection each), warm and cold: the slowest hook.
E. a Nova-shaped start (issue 15 item 3): a 2 GiB raw `_base/<sha1>` (root-owned 0644, not immutable), no
   sidecar (its envelope found by digest in `envelope_index_dirs`), a qcow2 overlay with backing_fmt raw,
   `[policy] profile = "nova"`, and a real hostguardd keeping the base's digest (`[daemon] image_dirs`). Each
   round `utime()`s the base first, as Nova does at every spawn (untimed), then runs the installed hook, against
   `python -c pass`. Target: median <= 1.5x. Then what a start costs when no cached digest can be trusted
   (hostguardd stopped: the base is hashed at every start) against `openssl dgst -sha256` of the base, and how
   long a writer's open(O_RDWR) waits on the daemon's lease (it is broken and released) against the same open
   of an unleased file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CLEAN_ENV,
    PY,
    ROOT,
    Step,
    command,
    compare,
    compile_package,
    interleaved,
    log,
    machine_context,
    random_file,
    show,
    stats,
    warm_page_cache,
    write_report,
)

QEMU_D = Path("/etc/libvirt/hooks/qemu.d")
STAMP = """#!/bin/sh
# hostguard benchmark timing hook ({when}); removed when bench/bench_hook.py ends
{first}
[ "$2" = prepare ] && [ "$3" = begin ] && date +%s%N >> "{dir}/$1.{tag}"
{last}
exit 0
"""


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """chattr +i, as the image library does: libvirt's relabelling cannot change the file's ctime then."""
    import subprocess

    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@contextlib.contextmanager
def stamp_hooks(directory: Path) -> Iterator[None]:
    """48 and 49 stamp when they end, 51 when it starts (each drains the XML libvirt writes to it)."""
    scripts = {
        "48-hgbench-stamp": STAMP.format(when="end", first="cat >/dev/null", last="", dir=directory, tag="48"),
        "49-hgbench-stamp": STAMP.format(when="end", first="cat >/dev/null", last="", dir=directory, tag="49"),
        "51-hgbench-stamp": STAMP.format(when="start", first="", last="cat >/dev/null", dir=directory, tag="51"),
    }
    try:
        for name, text in scripts.items():
            (QEMU_D / name).write_text(text)
            (QEMU_D / name).chmod(0o755)
        yield
    finally:
        for name in scripts:
            (QEMU_D / name).unlink(missing_ok=True)


def stamps(directory: Path, domain: str) -> list[tuple[float, float]]:
    """(spawn overhead, hook) in seconds for each start of `domain`."""
    read = {t: [int(x) for x in (directory / f"{domain}.{t}").read_text().split()] for t in ("48", "49", "51")}
    return [((b - a) / 1e9, (c - b) / 1e9) for a, b, c in zip(read["48"], read["49"], read["51"], strict=True)]


def clear_stamps(directory: Path) -> None:
    for path in directory.glob("*.4[89]"):
        path.unlink()
    for path in directory.glob("*.51"):
        path.unlink()


def stop(dom: Any) -> None:
    """Destroy, unless the guest already stopped itself (the random-data disk makes its kernel panic)."""
    import libvirt

    try:
        dom.destroy()
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
            raise


def live_xml(dom: Any, domain_id: int) -> bytes:
    """The domain's XML as libvirt hands it to the hook at `prepare begin` (with the new start's id)."""
    xml: str = dom.XMLDesc(0)
    head = "<domain type='qemu'>"
    assert xml.startswith(head), xml[:80]
    return (f"<domain type='qemu' id='{domain_id}'>" + xml[len(head) :]).encode()


def forget_caches(state: Path) -> None:
    for path in [*state.glob("state.db*"), state / "state.created"]:  # a deleted database is refused otherwise
        path.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--cold-rounds", type=int, default=3)
    ap.add_argument("--virsh-rounds", type=int, default=10)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--parts", default="ABCDE", help="which parts to run (default ABCDE)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", type=Path, help="also write import times and a cProfile of one warm hook run here")
    args = ap.parse_args()

    from hostguard.cli import main as hostguard
    from tests.testbed.guarded import GuardedHost
    from tests.testbed.guests import busybox_guest
    from tests.testbed.libvirt_env import LibvirtEnv, host_exclusive

    compile_package()
    guest = busybox_guest()
    stamp_dir = Path(tempfile.mkdtemp(prefix="hostguard-bench-hook-", dir="/var/tmp"))
    report: dict[str, object] = {"machine": machine_context([Path("/var/lib/libvirt/images")])}
    log("waiting for the test bed's host-wide lock")
    try:
        with (
            host_exclusive(),
            GuardedHost() as host,
            LibvirtEnv() as env,
            stamp_hooks(stamp_dir),
            contextlib.ExitStack() as stack,
        ):
            base = host.library / "bench.raw"
            log(f"generating {args.size_gib:g} GiB of random data in {base}")
            random_file(base, int(args.size_gib * 2**30))
            base.chmod(0o644)
            manifest = host.dir / "bench.manifest.json"
            create = ["manifest", "create", str(base), "--name", "bench", "--version", "1", "--format", "raw"]
            create += ["--kernel", str(guest.kernel), "--initrd", str(guest.initrd), "--reader", "none"]
            assert hostguard([*create, "--quiet", "-o", str(manifest)]) == 0
            sign = ["sign", str(manifest), "--key", str(host.key), "--cert", str(host.cert), "--chain"]
            assert hostguard([*sign, str(host.chain), "-o", f"{base}.hgsig"]) == 0
            stack.enter_context(immutable(base))

            top = env.overlay(base, "bench-top.qcow2", backing_format="raw")
            dom = env.define_guest("bench", guest, disk_path=top, memory_mib=96)
            name = dom.name()
            xml = live_xml(dom, 41)
            hook = command([str(host.installed_hook()), name, "prepare", "begin", "-"], stdin=xml, env=CLEAN_ENV)
            bare = command([PY, "-c", "pass"], env=CLEAN_ENV)
            isolated = command([PY, "-IS", "-c", "pass"], env=CLEAN_ENV)
            kernel, initrd = env.path("boot-0-" + guest.kernel.name), env.path("boot-1-" + guest.initrd.name)
            hashed = [base, kernel, initrd]
            assert all(p.exists() for p in hashed), hashed

            hook()
            if args.profile is not None:
                profile_hook(args.profile, [str(host.installed_hook()), name, "prepare", "begin", "-"], xml)
            bare_median = 0.0
            if "A" in args.parts:
                bare_median = part_a(report, hook, bare, isolated, args.rounds)
            if "B" in args.parts:
                part_b(report, hook, hashed, host.state, args.cold_rounds)
            if "C" in args.parts:
                part_c(report, dom, stamp_dir, host, args.virsh_rounds, bare_median)
            if "D" in args.parts:
                report["ten_at_once"] = ten_at_once(env, guest, base, host, stamp_dir)
            if "E" in args.parts:
                report["nova_touched"] = part_e(env, guest, host, args)
    finally:
        shutil.rmtree(stamp_dir, ignore_errors=True)
    report["loadavg_at_end"] = os.getloadavg()
    print(f"\nmachine: {report['machine']}")
    write_report(args.json, report)
    return 0


PROFILED_RUN = """
import cProfile, os, sys
sys.argv = sys.argv[1:]
exec(open(sys.argv[0]).read(), {"__name__": "installed_hook"})  # its prelude (config path), without run()
from hostguard.hook import main  # imports are profiled separately (-X importtime)
out = os.environ.pop("HOSTGUARD_PROFILE_OUT")
cProfile.run("main(sys.argv[1:])", out)
"""


def profile_hook(out: Path, argv: list[str], xml: bytes) -> None:
    """Where a warm `prepare` spends its time: `-X importtime` of the installed hook and a cProfile of main()."""
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    shebang = Path(argv[0]).read_text().split("\n", 1)[0].split()[1:]  # the hook's own interpreter flags
    proc = subprocess.run(
        [PY, *shebang, "-X", "importtime", *argv], input=xml, capture_output=True, env=CLEAN_ENV, check=False
    )
    (out / "importtime.txt").write_bytes(proc.stderr)
    env = {**CLEAN_ENV, "HOSTGUARD_PROFILE_OUT": str(out / "hook.pstats")}
    subprocess.run([PY, *shebang, "-c", PROFILED_RUN, *argv], input=xml, env=env, check=True, capture_output=True)
    log(f"profile: {out}/importtime.txt and {out}/hook.pstats (python -m pstats)")


def part_a(report: dict[str, object], hook: Step, bare: Step, isolated: Step, rounds: int) -> float:
    """A. the installed hook run directly, warm caches, against the bare interpreter. Returns its median (ms).

    The hook runs as `python -IS` (see hostguard.commands.hook_cmd.render_shim), so the same interpreter with the
    same flags is shown too: that ratio is hostguard's own cost, with no site-packages processing on either side."""
    log(f"A. installed hook, warm caches: {rounds} interleaved rounds")
    steps = {"python -c pass": bare, "python -IS -c pass": isolated, "installed hook (warm)": hook}
    samples = interleaved(steps, rounds)
    result = compare(samples, "installed hook (warm)", "python -c pass", 1.3)
    show("A. installed hook at prepare begin, warm caches, vs bare interpreter start", result)
    own = compare(samples, "installed hook (warm)", "python -IS -c pass", 3.0)
    show("A'. the same, vs the interpreter with the hook's own flags (hostguard's own cost; informational)", own)
    report["hook_warm"] = result
    report["hook_warm_vs_isolated_interpreter"] = own
    peer = result["peer_ms"]
    assert isinstance(peer, dict)
    return float(peer["median"])


def part_b(report: dict[str, object], hook: Step, hashed: list[Path], state: Path, rounds: int) -> None:
    """B. cold caches: the hook parses, verifies and hashes everything; openssl hashes the same files."""
    openssl = command(["openssl", "dgst", "-sha256", *map(str, hashed)])
    log(f"B. installed hook, cold caches: {rounds} interleaved rounds")

    def prepare_round() -> None:
        forget_caches(state)
        warm_page_cache(*hashed)

    result = compare(
        interleaved(
            {"openssl dgst -sha256 (image, kernel, initrd)": openssl, "installed hook (cold)": hook},
            rounds,
            before=prepare_round,
        ),
        "installed hook (cold)",
        "openssl dgst -sha256 (image, kernel, initrd)",
        1.1,
    )
    size_gib = hashed[0].stat().st_size / 2**30
    show(f"B. installed hook, cold caches, {size_gib:g} GiB image, vs openssl dgst", result)
    report["hook_cold"] = result


def part_c(report: dict[str, object], dom: Any, stamp_dir: Path, host: Any, rounds: int, bare_ms: float) -> None:
    """C. through `virsh start`: the shell hooks around 50-hostguard time it as libvirt runs it."""
    name = dom.name()
    clear_stamps(stamp_dir)
    dom.create()  # the XML libvirt really passes, into the parse cache
    stop(dom)
    clear_stamps(stamp_dir)
    log(f"C. virsh start, warm caches: {rounds} starts")
    for _ in range(rounds):
        dom.create()
        stop(dom)
    timed = stamps(stamp_dir, name)
    spawn = stats([s for s, _ in timed])
    hook_s = stats([h for _, h in timed])
    audit = [float(str(r["duration_ms"])) for r in host.audit_records() if r.get("domain") == name]
    virsh: dict[str, object] = {
        "hook_ms": {k: round(v * 1000, 2) if k != "n" else v for k, v in hook_s.items()},
        "spawn_overhead_ms": {k: round(v * 1000, 2) if k != "n" else v for k, v in spawn.items()},
        "in_process_ms": stats(audit[-rounds:]),
    }
    print(
        f"\n## C. virsh start, warm caches ({hook_s['n']} starts)\n"
        f"  hook (49 end -> 51 start): median {hook_s['median'] * 1000:.1f} ms, min {hook_s['min'] * 1000:.1f} ms;"
        f" in-process (audit duration_ms) median {stats(audit[-rounds:])['median']:.1f} ms;"
        f" libvirt's spawn of a trivial script: median {spawn['median'] * 1000:.1f} ms"
    )
    if bare_ms:
        virsh["ratio_median_vs_bare_start"] = round(hook_s["median"] * 1000 / bare_ms, 3)
        virsh["ratio_median_minus_spawn_vs_bare_start"] = round(
            (hook_s["median"] - spawn["median"]) * 1000 / bare_ms, 3
        )
        print(
            f"  vs bare interpreter start {bare_ms:.1f} ms (part A): {virsh['ratio_median_vs_bare_start']:.2f}x "
            f"({virsh['ratio_median_minus_spawn_vs_bare_start']:.2f}x without the spawn overhead)"
        )
    clear_stamps(stamp_dir)
    for _ in range(2):
        forget_caches(host.state)
        dom.create()
        stop(dom)
    cold = [h for _, h in stamps(stamp_dir, name)]
    virsh["cold_hook_ms"] = [round(h * 1000, 1) for h in cold]
    print(f"  cold caches through virsh start: {', '.join(f'{h * 1000:.0f} ms' for h in cold)}")
    report["virsh_start"] = virsh


def ten_at_once(env: Any, guest: Any, base: Path, host: Any, stamp_dir: Path) -> dict[str, object]:
    import libvirt

    doms = [
        env.define_guest(f"ten-{i}", guest, disk_path=env.overlay(base, f"ten-{i}.qcow2", "raw"), memory_mib=96)
        for i in range(10)
    ]
    names = [d.name() for d in doms]

    def start(name: str) -> float:
        conn = libvirt.open("qemu:///system")
        try:
            began = time.monotonic()
            conn.lookupByName(name).create()
            return time.monotonic() - began
        finally:
            conn.close()

    def burst(label: str) -> dict[str, object]:
        clear_stamps(stamp_dir)
        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            creates = list(pool.map(start, names))
        for d in doms:
            stop(d)
        hooks = [h for n in names for _, h in stamps(stamp_dir, n)]
        audit = [
            float(str(r["duration_ms"]))
            for r in host.audit_records()
            if r.get("domain") in names and r.get("operation") == "prepare"
        ][-10:]
        out: dict[str, object] = {
            "slowest_hook_ms": round(max(hooks) * 1000, 1),
            "median_hook_ms": round(stats(hooks)["median"] * 1000, 1),
            "slowest_in_process_ms": max(audit),
            "slowest_virsh_start_s": round(max(creates), 2),
        }
        print(f"  {label}: slowest hook {out['slowest_hook_ms']} ms (median {out['median_hook_ms']} ms), "
              f"slowest start {out['slowest_virsh_start_s']} s")  # fmt: skip
        return out

    print("\n## D. ten domains started at once")
    for d in doms:  # each domain's own XML into the parse cache first
        d.create()
        stop(d)
    warm = burst("warm caches")
    forget_caches(host.state)
    cold = burst("cold caches (each hook hashes the 2 GiB image)")
    return {"warm": warm, "cold": cold}


def part_e(env: Any, guest: Any, host: Any, args: argparse.Namespace) -> dict[str, object]:
    """E. Nova-shaped start of a touched 2 GiB base: kept digest (hostguardd running) vs python -c pass; the
    start when nothing cached can be trusted vs openssl; a writer's wait on the daemon's lease."""
    import hashlib
    import json
    import subprocess

    from hostguard.cli import main as hostguard

    base_dir = env.path("_base")
    base_dir.mkdir(mode=0o755)
    base = base_dir / hashlib.sha1(b"bench image id").hexdigest()
    log(f"E. generating {args.size_gib:g} GiB of random data in {base}")
    random_file(base, int(args.size_gib * 2**30))
    base.chmod(0o644)
    index = env.path("envelopes")
    index.mkdir(mode=0o755)
    manifest = host.dir / "nova.manifest.json"
    create = ["manifest", "create", str(base), "--name", "bench", "--version", "1", "--format", "raw"]
    create += ["--kernel", str(guest.kernel), "--initrd", str(guest.initrd), "--reader", "none"]
    assert hostguard([*create, "--quiet", "-o", str(manifest)]) == 0
    digest = json.loads(manifest.read_text())["disks"][0]["sha256"]
    sign = ["sign", str(manifest), "--key", str(host.key), "--cert", str(host.cert), "--chain", str(host.chain)]
    assert hostguard([*sign, "-o", str(index / f"{digest}.hgsig")]) == 0
    host.write_config(envelope_index_dirs=json.dumps([str(index)]), profile='"nova"')
    text = host.config.read_text().replace("[daemon]\n", f"[daemon]\nimage_dirs = {json.dumps([str(base_dir)])}\n")
    host.config.write_text(text)
    dom = env.define_guest("bench-nova", guest, disk_path=env.overlay(base, "nova-disk", "raw"), memory_mib=96)
    xml = live_xml(dom, 43)
    hook = command([str(host.installed_hook()), dom.name(), "prepare", "begin", "-"], stdin=xml, env=CLEAN_ENV)
    bare = command([PY, "-c", "pass"], env=CLEAN_ENV)

    def audit_from() -> str:
        record = [r for r in host.audit_records() if r.get("domain") == dom.name()][-1]
        return str(next(d["from"] for d in record["digests"] if d["path"] == str(base)))

    out: dict[str, object] = {}
    row = host.state / "kept" / f"{base.stat().st_dev}-{base.stat().st_ino}"
    daemon_log = (host.dir / "bench-daemon.log").open("ab")
    daemon = subprocess.Popen([PY, "-m", "hostguard.cli", "daemon", "--config", str(host.config)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=daemon_log)  # fmt: skip
    try:
        began = time.monotonic()
        while not row.exists():
            if daemon.poll() is not None or time.monotonic() - began > 600:
                raise RuntimeError("hostguardd kept no digest of the base (see bench-daemon.log)")
            time.sleep(0.1)
        out["daemon_hash_ahead_s"] = round(time.monotonic() - began, 2)
        print(f"\n## E. Nova-shaped start, base touched before each run\n  hostguardd hashed the base ahead in "
              f"{out['daemon_hash_ahead_s']} s (from its start)")  # fmt: skip
        hook()
        log(f"E. installed hook on a touched kept base: {args.rounds} interleaved rounds")
        touched = compare(
            interleaved(
                {"python -c pass": bare, "installed hook (touched base, kept)": hook},
                args.rounds,
                before=lambda: os.utime(base),
            ),
            "installed hook (touched base, kept)",
            "python -c pass",
            1.5,
        )
        assert audit_from() == "kept", "the last start did not use the kept digest"
        show(f"E. installed hook, Nova-shaped start of a touched {args.size_gib:g} GiB base, vs bare interpreter",
             touched)  # fmt: skip
        out["touched_kept"] = touched

        def open_for_writing() -> None:
            os.close(os.open(base, os.O_RDWR))

        plain = base_dir / "unleased"
        plain.write_bytes(b"x" * 4096)

        def open_unleased() -> None:
            os.close(os.open(plain, os.O_RDWR))

        waits: list[float] = []
        for _ in range(5):
            while not row.exists():  # kept again (re-hashed) after the last writer closed
                time.sleep(0.05)
            start = time.perf_counter()
            open_for_writing()
            waits.append(time.perf_counter() - start)
        unleased = interleaved({"open O_RDWR, unleased": open_unleased}, 5)["open O_RDWR, unleased"]
        out["writer_open_ms"] = {"kept": stats([w * 1000 for w in waits]),
                                 "unleased": stats([w * 1000 for w in unleased])}  # fmt: skip
        print(f"  a writer's open(O_RDWR) of the kept base: median {stats(waits)['median'] * 1000:.2f} ms "
              f"(max {max(waits) * 1000:.2f} ms) vs {stats(unleased)['median'] * 1000:.3f} ms unleased")  # fmt: skip

        # libvirt (remember_owner = 1, its default) opens each image it labels O_RDWR for its metadata lock, at
        # start and at stop: the daemon drops the digest and hashes the base again once libvirt has closed it.
        def row_bytes() -> bytes | None:
            try:
                data: bytes = row.read_bytes()
            except FileNotFoundError:
                return None
            return data

        def rekept_after(action: Step) -> float | None:
            """Seconds from `action` until a new row (a new lease and hash) is there; None after 120 s."""
            deadline = time.monotonic() + 120
            while row_bytes() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            before = row_bytes()
            action()
            began = time.monotonic()
            while row_bytes() in (None, before):
                if time.monotonic() - began > 120:
                    return None
                time.sleep(0.05)
            return round(time.monotonic() - began, 2)

        out["rekept_after_virsh_start_s"] = rekept_after(dom.create)
        # the random-data disk makes the guest's kernel panic: it may have stopped (and been relabelled) already
        out["rekept_after_virsh_destroy_s"] = rekept_after(lambda: stop(dom)) if dom.isActive() else None
        print(f"  kept again (re-hashed by hostguardd) {out['rekept_after_virsh_start_s']} s after a virsh start, "
              f"{out['rekept_after_virsh_destroy_s']} s after its destroy (libvirt's metadata lock)")  # fmt: skip
    finally:
        daemon.terminate()
        daemon.wait(30)
        daemon_log.close()
    log(f"E. no trusted cache (hostguardd stopped): {args.cold_rounds} interleaved rounds")
    openssl = command(["openssl", "dgst", "-sha256", str(base)])

    def touch_and_warm() -> None:
        os.utime(base)
        warm_page_cache(base)

    rehash = compare(
        interleaved(
            {"openssl dgst -sha256 (base)": openssl, "installed hook (touched base, hashed)": hook},
            args.cold_rounds,
            before=touch_and_warm,
        ),
        "installed hook (touched base, hashed)",
        "openssl dgst -sha256 (base)",
        1.1,
    )
    assert audit_from() == "hashed"
    show(f"E. the same start when no cached digest can be trusted ({args.size_gib:g} GiB hashed), vs openssl", rehash)
    out["touched_untrusted"] = rehash
    host.write_config()
    return out


if __name__ == "__main__":
    sys.exit(main())

"""Nova's layout through the installed hook and a real TCG boot (issue 15): a raw `_base/<sha1>` converted from
the signed qcow2, no sidecar (its envelope found by digest), a qcow2 overlay with backing_fmt raw, and fresh
ephemeral and swap bases and a config drive under `[policy] profile = "nova"`, the daemon beside it (the domain
started as the hook allowed it gets a passing post-start verdict: no false `unsigned-hotplug-disk`; an executable
then written into the ephemeral overlay through QEMU is an `executable-on-host-made-disk` finding). Nova's own
AMI-style XML with the daemon running: start paused then resume (checked again after the resume), hard reboot
on the used overlay, an overlay with pre-written executable clusters held through Nova's resume (sticky, ADR
0020), and the refusals Nova stores as the fault (a backing file outside `_base`, a swapped kernel, a wrongly
labelled or non-ISO config drive, an rbd disk whose fake monitor nothing connects to)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_daemon import DaemonProcess, wait_verdict
from tests.integration.test_daemon_disk import run_daemon_once, verdict_of, write_through_qemu
from tests.integration.test_daemon_sticky import running_daemon, tamper_at_first_resume, virsh, wait_state
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import Disk, LibvirtEnv
from tests.testbed.prereq import require_tool

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def allowed_notes(host: GuardedHost, dom: Any) -> str:
    """The notes of the hook's last decision on `dom`, which allowed it as the signed busybox image."""
    record = [r for r in host.audit_records() if r.get("domain") == dom.name() and r.get("operation") == "prepare"][-1]
    assert record["verdict"] == "allow", record
    assert record["images"][0]["image"] == "busybox"  # type: ignore[index]
    return " ".join(record["notes"])  # type: ignore[arg-type]


def nova_base(signed_base: Path, base: Path, index: Path) -> None:
    """What Nova's image cache holds for a signed qcow2: `base` (`_base/<sha1 of the image id>`, its directory made
    here) converted to raw, and its envelope only in the `index` directory, named by the raw content's digest."""
    base.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    run("qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(signed_base), str(base))
    base.chmod(0o644)
    index.mkdir(mode=0o755)
    shutil.copyfile(f"{signed_base}.hgsig", index / f"{hashlib.sha256(base.read_bytes()).hexdigest()}.hgsig")


def test_a_nova_shaped_guest_boots_through_the_installed_hook(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    for tool in ("qemu-img", "mkfs.ext4", "mkswap", "genisoimage"):
        require_tool(tool)
    base_dir = libvirt_env.path("_base")
    base = base_dir / hashlib.sha1(b"155d900f-4e14-4e4c-a73d-069cbf4541e6").hexdigest()
    index = libvirt_env.path("envelopes")
    nova_base(signed_base, base, index)
    ephemeral, swap = base_dir / "ephemeral_1_0706d66", base_dir / "swap_256"
    run("truncate", "-s", "16M", str(ephemeral))
    run("mkfs.ext4", "-q", "-F", "-L", "ephemeral0", str(ephemeral))
    run("truncate", "-s", "8M", str(swap))
    run("mkswap", "-q", str(swap))
    content = libvirt_env.path("config-drive")
    (content / "openstack" / "latest").mkdir(parents=True)
    (content / "openstack" / "latest" / "meta_data.json").write_text('{"uuid": "nova"}')
    config_drive = libvirt_env.path("disk.config")
    run("genisoimage", "-quiet", "-o", str(config_drive), "-V", "config-2", "-r", "-J", str(content))
    for f in (ephemeral, swap, config_drive):
        f.chmod(0o644)
    host.write_config(envelope_index_dirs=json.dumps([str(index)]), profile='"nova"')
    daemon = DaemonProcess(host, host.config)
    daemon.start()
    try:
        root = libvirt_env.overlay(base, "disk", backing_format="raw")
        extra = [
            Disk(libvirt_env.overlay(b, n, backing_format="raw"))
            for b, n in ((ephemeral, "disk.eph0"), (swap, "disk.swap"))
        ]
        dom = libvirt_env.define_guest("nova", busybox_guest, disk_path=root, extra_disks=extra)
        cdrom = (
            "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
            f"<source file='{config_drive}'/><target dev='sda' bus='sata'/><readonly/></disk>"
        )
        dom = libvirt_env.connection().defineXML(dom.XMLDesc(0).replace("</devices>", cdrom + "</devices>"))
        time.sleep(1.5)  # the daemon connected and listening for events
        t = time.time()
        dom.create()
        libvirt_env.wait_for_console(dom, busybox_guest.marker, timeout=180)
        notes = allowed_notes(host, dom)
        assert "Nova ephemeral base" in notes and "Nova swap base" in notes and "Nova config drive" in notes, notes
        # After start: the host-made disks are the hook's own admissions, not hot-plugs, nor unverified nodes.
        verdict = wait_verdict(host, dom, t)
        assert verdict["status"] == "pass", verdict
        assert {"hotplug", "block-graph"} <= set(verdict["stages_ms"]), verdict
        # The fresh ephemeral disk was read (nothing on it); swap and the ISO config drive are notes, not read.
        made = [n for n in verdict["notes"] if n["expected"] == "the host-made disk content check"]
        assert {(n["path"], n["found"].split(" not read: ")[0]) for n in made} == {
            ("vdc", "vdc (Nova swap base)"),
            ("sda", "sda (Nova config drive)"),
        }, verdict
        # An executable the guest's side writes into the ephemeral overlay (through QEMU) is a finding.
        daemon.kill()
        implanted = libvirt_env.path("eph-implanted.raw")
        shutil.copyfile(ephemeral, implanted)
        commands = b"write /usr/bin/true implant\nsif implant mode 0100755\n"
        subprocess.run(["debugfs", "-w", "-f", "-", str(implanted)], input=commands, check=True, capture_output=True)
        written = write_through_qemu(libvirt_env, dom, extra[0].path, ephemeral.read_bytes(), implanted.read_bytes())
        t = time.time()
        run_daemon_once(host)
        verdict = verdict_of(host, dom)
        found = [(f["kind"], f["path"]) for f in verdict["findings"]]
        assert found == [("executable-on-host-made-disk", "vdb:/implant")], verdict
        assert verdict["status"] == "fail" and verdict["action"] == "pause", verdict
        print(
            f"\nimplant: {written} bytes written through QEMU; check {verdict['duration_ms']} ms, "
            f"disk-content stage {verdict['stages_ms']['disk-content']} ms ({time.time() - t:.1f} s with start-up)"
        )
        dom.destroy()
        # A flipped byte in the base: no envelope is found by its digest, the start is refused.
        with base.open("r+b") as fh:
            fh.seek(1 << 20)
            byte = fh.read(1)
            fh.seek(1 << 20)
            fh.write(bytes([byte[0] ^ 0xFF]))
        import libvirt

        with pytest.raises(libvirt.libvirtError, match=r"hostguard: denied .* is not signed"):
            dom.create()
    finally:
        daemon.kill()
        host.write_config()


# --- Nova's own domain XML (tests/unit/data/stacks), its start path and refusals (issue 15 item 5) --------------

AMI_XML = REPO / "tests" / "unit" / "data" / "stacks" / "nova-domain-ami.xml"
AMI_INSTANCE = "db6daa43-4d5c-4712-bb94-60c7f995bf0a"
IMAGE_ID = "155d900f-4e14-4e4c-a73d-069cbf4541e6"


class NovaCompute:
    """Nova's instances directory in the test bed: `_base/<sha1 of the image id>` (the signed qcow2 converted to
    raw, its envelope only in the index by digest) and instances defined from Nova's AMI-style XML (direct kernel
    boot of `kernel`/`ramdisk` byte copies, a qcow2 `disk` overlay with backing_fmt raw, serial log console.log)."""

    def __init__(self, host: GuardedHost, signed_base: Path, env: LibvirtEnv, guest: Guest) -> None:
        require_tool("qemu-img")
        self.host, self.env, self.guest = host, env, guest
        self.instances = env.path("instances")
        self.base = self.instances / "_base" / hashlib.sha1(IMAGE_ID.encode()).hexdigest()
        index = env.path("envelopes")
        nova_base(signed_base, self.base, index)
        self.instances.chmod(0o755)
        host.write_config(envelope_index_dirs=json.dumps([str(index)]), profile='"nova"')

    def spawn(self, name: str, *, backing: Path | None = None) -> tuple[str, Path]:
        """The instance directory Nova makes before defineXML; returns (domain XML, instance dir)."""
        uuid = str(uuidlib.uuid4())
        here = self.instances / uuid
        here.mkdir(mode=0o755)
        backing = backing or self.base
        run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing), str(here / "disk"))
        shutil.copyfile(self.guest.kernel, here / "kernel")
        shutil.copyfile(self.guest.initrd, here / "ramdisk")
        for f in here.iterdir():
            f.chmod(0o644)
        full = self.env.domain_name(name)
        self.env.names.append(full)  # removed with the environment
        self.env.consoles[full] = here / "console.log"
        return self.xml(full, uuid), here

    def xml(self, full: str, uuid: str) -> str:
        """Nova's XML with its paths and ids here, as Nova regenerates it at every (hard re)boot. The tap
        interface is left out (no Neutron here)."""
        text = AMI_XML.read_text().replace("/var/lib/nova/instances", str(self.instances))
        text = text.replace(AMI_INSTANCE, uuid).replace("<name>instance-00000001</name>", f"<name>{full}</name>")
        return re.sub(r"<interface .*?</interface>\s*", "", text, flags=re.S)


@pytest.fixture
def nova(host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest) -> Iterator[NovaCompute]:
    try:
        yield NovaCompute(host, signed_base, libvirt_env, busybox_guest)
    finally:
        host.write_config()


@pytest.fixture
def nova_daemon(host: GuardedHost, nova: NovaCompute) -> Iterator[DaemonProcess]:
    with running_daemon(host) as d:  # reads the Nova profile written by the `nova` fixture
        yield d


def refusal(start: Any) -> str:
    """What libvirt returns for a start the hook denied: the text Nova stores as the instance's fault."""
    import libvirt

    with pytest.raises(libvirt.libvirtError) as info:
        start()
    return str(info.value.get_error_message())


def test_nova_start_paused_then_resume_is_checked_after_the_resume_and_a_hard_reboot_is_too(
    host: GuardedHost, nova: NovaCompute, nova_daemon: DaemonProcess, libvirt_env: LibvirtEnv
) -> None:
    xml, here = nova.spawn("nova-paused")
    dom = libvirt_env.connection().defineXML(xml)
    t = time.time()
    virsh("start", "--paused", dom.name())  # createWithFlags(VIR_DOMAIN_START_PAUSED) while Nova waits for VIFs
    first = wait_verdict(host, dom, t)
    assert first["status"] == "pass", first  # the overlay's content judged before a vCPU ran
    assert virsh("domstate", dom.name()) == "paused"
    prepare = [r for r in host.audit_records() if r.get("domain") == dom.name() and r.get("operation") == "prepare"]
    assert prepare[-1]["verdict"] == "allow" and prepare[-1]["images"][0]["image"] == "busybox"  # type: ignore[index]
    t = time.time()
    virsh("resume", dom.name())
    resumed = wait_verdict(host, dom, t, trigger="resumed")  # checked again once it runs
    assert resumed["status"] == "pass", resumed
    libvirt_env.wait_for_console(dom, nova.guest.marker, timeout=180)
    assert virsh("domstate", dom.name()) == "running"

    # Hard reboot: destroy, regenerate the XML, start again on the used overlay.
    dom.destroy()
    assert (here / "disk").stat().st_size > 0
    (here / "console.log").unlink(missing_ok=True)
    dom = libvirt_env.connection().defineXML(nova.xml(dom.name(), dom.UUIDString()))
    t = time.time()
    dom.create()
    again = wait_verdict(host, dom, t)
    assert again["status"] == "pass", again
    libvirt_env.wait_for_console(dom, nova.guest.marker, timeout=180)
    ops = [str(r.get("operation")) for r in host.audit_records() if r.get("uuid") == dom.UUIDString()]
    assert not [op for op in ops if op.startswith("held-")], ops


def test_an_executable_written_before_novas_resume_is_found_and_held_through_the_next_resume(
    host: GuardedHost, nova: NovaCompute, nova_daemon: DaemonProcess, libvirt_env: LibvirtEnv
) -> None:
    """An overlay already holding an executable is refused by the hook (tests/integration/test_preboot_content.py);
    one written while Nova waits for its VIFs (the domain paused, judged clean) is found at Nova's resume, and the
    next resume (Nova's `resume`/`unpause`) is undone: the hold is sticky (ADR 0020)."""
    xml, here = nova.spawn("nova-tampered")
    dom = libvirt_env.connection().defineXML(xml)
    t = time.time()
    virsh("start", "--paused", dom.name())
    assert wait_verdict(host, dom, t)["status"] == "pass"
    implant = ["write /usr/bin/true /usr/local/bin/implant", "sif /usr/local/bin/implant mode 0100755"]
    t = tamper_at_first_resume(libvirt_env, dom, here / "disk", nova.guest, implant)
    verdict = wait_verdict(host, dom, t, trigger="resumed")
    assert verdict["status"] == "fail" and verdict["action"] == "pause", verdict
    assert [(f["kind"], f["path"]) for f in verdict["findings"]] == [
        ("unexpected-executable", "/usr/local/bin/implant")
    ]
    wait_state(dom, "paused", 10)
    virsh("resume", dom.name())  # Nova's resume() or `nova unpause`
    took = wait_state(dom, "paused", 2.0)
    print(f"Nova's resume of a held instance undone in {took:.2f} s")
    ops = [str(r["operation"]) for r in host.audit_records() if r.get("uuid") == dom.UUIDString()]
    assert [op for op in ops if op.startswith("held-")] == ["held-domain-running", "held-domain-paused"], ops


def test_a_backing_file_outside_base_is_refused_with_hostguards_one_line_as_novas_fault(
    host: GuardedHost, nova: NovaCompute, libvirt_env: LibvirtEnv
) -> None:
    elsewhere = libvirt_env.path("elsewhere.raw")
    shutil.copyfile(nova.base, elsewhere)
    with elsewhere.open("r+b") as fh:  # not the signed content: a different image, outside _base
        fh.seek(1 << 20)
        fh.write(b"\x90" * 512)
    elsewhere.chmod(0o644)
    xml, _ = nova.spawn("nova-elsewhere", backing=elsewhere)
    dom = libvirt_env.connection().defineXML(xml)
    fault = refusal(lambda: dom.createWithFlags(0))
    # libvirt wraps the hook's stderr; what hostguard says is its one line at the end, no traceback.
    assert "\n" not in fault.strip() and "Traceback" not in fault, fault
    ours = fault[fault.index("hostguard: denied") :]
    assert re.fullmatch(r"hostguard: denied [^\n]*is not signed[^\n]*", ours.strip()), fault
    print(f"Nova's fault text: {fault}")
    assert not dom.isActive()


def test_a_swapped_kernel_is_refused(host: GuardedHost, nova: NovaCompute, libvirt_env: LibvirtEnv) -> None:
    xml, here = nova.spawn("nova-kernel")
    kernel = (here / "kernel").read_bytes()
    (here / "kernel").write_bytes(kernel[:-4096] + bytes(4096))  # another kernel in Nova's copy
    dom = libvirt_env.connection().defineXML(xml)
    fault = refusal(lambda: dom.createWithFlags(libvirt_start_paused()))
    assert "hostguard: denied" in fault and "kernel does not match the signed kernel of busybox v1" in fault, fault


NOVA_CDROM = (
    '<disk type="file" device="cdrom"><driver name="qemu" type="raw" cache="none"/>'
    '<source file="{path}"/><target dev="hda" bus="ide"/></disk>'
)  # as in ../shared/stacks/nova-domain-cfgdrive.xml


@pytest.mark.parametrize("kind", ["wrong-label", "not-iso"])
def test_a_wrongly_labelled_or_non_iso_config_drive_is_refused(
    kind: str, host: GuardedHost, nova: NovaCompute, libvirt_env: LibvirtEnv
) -> None:
    """Under the Nova profile a config drive is admitted only as exactly that: an ISO 9660 image labelled
    `config-2` (issue 15's test list; the unit tests in test_preboot_stacks.py decide on the same shapes)."""
    require_tool("genisoimage")
    xml, here = nova.spawn(f"nova-cd-{kind}")
    drive = here / "disk.config"
    if kind == "wrong-label":
        content = libvirt_env.path(f"cd-{kind}")
        (content / "openstack" / "latest").mkdir(parents=True)
        (content / "openstack" / "latest" / "meta_data.json").write_text('{"uuid": "nova"}')
        run("genisoimage", "-quiet", "-o", str(drive), "-V", "config-3", "-r", "-J", str(content))
        expected = "its volume label is 'config-3', not 'config-2'"
    else:
        run("truncate", "-s", "1M", str(drive))
        run("mkfs.ext4", "-q", "-F", "-L", "config-2", str(drive))  # the right label, not an ISO
        expected = "not an ISO 9660 image"
    drive.chmod(0o644)
    dom = libvirt_env.connection().defineXML(xml.replace("</devices>", NOVA_CDROM.format(path=drive) + "</devices>"))
    fault = refusal(lambda: dom.createWithFlags(0))
    assert "hostguard: denied" in fault and expected in fault and "Traceback" not in fault, fault
    assert not dom.isActive()


def test_an_rbd_disk_is_refused_before_qemu_connects_to_its_monitor(
    host: GuardedHost, nova: NovaCompute, libvirt_env: LibvirtEnv
) -> None:
    """Nova's rbd ephemeral disk shape pointing at a fake Ceph monitor on loopback: the hook refuses the start
    with the line that names the opt-in key (ADR on network disks), and nothing ever connects to the monitor."""
    import socket
    import threading

    monitor = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    monitor.bind(("127.0.0.1", 0))
    monitor.listen(8)
    monitor.settimeout(0.2)
    port = monitor.getsockname()[1]
    connections: list[Any] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                conn, peer = monitor.accept()
            except TimeoutError:
                continue
            connections.append(peer)
            conn.close()

    listener = threading.Thread(target=accept, daemon=True)
    listener.start()
    try:
        xml, here = nova.spawn("nova-rbd")
        rbd = (
            '<disk type="network" device="disk"><driver name="qemu" type="raw" cache="none"/>'
            f'<source protocol="rbd" name="vms/{here.name}_disk.eph0"><host name="127.0.0.1" port="{port}"/>'
            '</source><target dev="vdb" bus="virtio"/></disk>'
        )
        dom = libvirt_env.connection().defineXML(xml.replace("</devices>", rbd + "</devices>"))
        fault = refusal(lambda: dom.createWithFlags(0))
        assert "hostguard: denied" in fault and "rbd disks cannot be verified by hostguard" in fault, fault
        assert "[policy] allow_network" in fault, fault
        time.sleep(2)  # anything that would still try to reach the monitor
        assert not dom.isActive() and connections == [], connections
    finally:
        done.set()
        listener.join(timeout=5)
        monitor.close()


def libvirt_start_paused() -> int:
    import libvirt

    return int(libvirt.VIR_DOMAIN_START_PAUSED)


def test_a_touched_nova_base_starts_from_the_daemons_kept_digest_and_a_written_one_is_hashed(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    """Issue 15 item 3 through the installed hook and a real hostguardd: Nova `utime()`s its base at every spawn;
    the hook takes the digest the daemon keeps under its read lease ("kept" in the audit record) instead of
    hashing again. A store through a shared writable mapping, which leaves mtime and ctime alone, is never served
    from it: the base is hashed and the start refused."""
    import mmap
    import os
    import time

    import libvirt

    from hostguard.host.digest import FileIdentity, kept_digest, open_image
    from tests.integration.test_daemon import DaemonProcess, config_with

    require_tool("qemu-img")
    base_dir = libvirt_env.path("_base_kept")
    base = base_dir / hashlib.sha1(b"0b6a3a5e-4d84-4f55-9d8b-2f0a5d4b6c11").hexdigest()
    index = libvirt_env.path("kept-envelopes")
    nova_base(signed_base, base, index)
    host.write_config(envelope_index_dirs=json.dumps([str(index)]), profile='"nova"')
    config = config_with(host, "kept", "")
    config.write_text(
        config.read_text().replace("[daemon]\n", f"[daemon]\nimage_dirs = {json.dumps([str(base_dir)])}\n")
    )
    os.replace(config, host.config)  # the hook reads the same file
    daemon = DaemonProcess(host, host.config)
    daemon.start()
    try:
        row = host.state / "kept"
        deadline = time.monotonic() + 120
        while not (row.is_dir() and any(row.iterdir())):
            assert time.monotonic() < deadline, f"the daemon kept nothing: {daemon.log.read_text()[-2000:]}"
            time.sleep(0.2)
        dom = libvirt_env.define_guest("nova-kept", busybox_guest, disk_path=libvirt_env.overlay(base, "disk", "raw"))

        def start_from() -> str:
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)  # Nova's start path: paused, then resumed
            dom.resume()
            record = [r for r in host.audit_records() if r.get("domain") == dom.name()][-1]
            assert record["verdict"] == "allow", record
            digests = record["digests"]
            assert isinstance(digests, list)
            return str(next(d["from"] for d in digests if d["path"] == str(base)))

        def wait_kept() -> None:
            # libvirt (remember_owner = 1, the default) opens every image it labels O_RDWR for its metadata lock,
            # at start and at stop: an open for writing, so the daemon drops the digest and hashes the base again
            # once libvirt closed it (ADR 0021). The hook itself never hashes for a touch.
            deadline = time.monotonic() + 120
            while True:
                fd = open_image(base)
                try:
                    if kept_digest(host.state, fd, FileIdentity.from_stat(os.fstat(fd))) is not None:
                        return
                finally:
                    os.close(fd)
                assert time.monotonic() < deadline, f"not kept again: {daemon.log.read_text()[-2000:]}"
                time.sleep(0.1)

        assert start_from() == "kept"
        libvirt_env.wait_for_console(dom, busybox_guest.marker, timeout=180)
        dom.destroy()
        for _ in range(2):
            wait_kept()
            os.utime(base)  # what Nova does at every spawn
            assert start_from() == "kept"  # no re-hash while libvirt waits on the hook
            dom.destroy()

        fd = os.open(base, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        try:
            offset = 1 << 20
            mapping[offset : offset + 1] = mapping[offset : offset + 1]  # dirty the page: still the signed bytes
            times = (base.stat().st_mtime_ns, base.stat().st_ctime_ns)
            mapping[offset : offset + 4] = b"evil"  # the same page: mtime and ctime stay
            assert (base.stat().st_mtime_ns, base.stat().st_ctime_ns) == times
            with pytest.raises(libvirt.libvirtError, match=r"hostguard: denied .* is not signed"):
                dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
            record = [r for r in host.audit_records() if r.get("domain") == dom.name()][-1]
            assert record["verdict"] == "deny", record
        finally:
            mapping.close()
    finally:
        daemon.kill()
        host.write_config()

"""check-config and acquisition against libvirt's test:///default driver (no QEMU): XML edits, errors, cleanup."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostguard.errors import ConfigError, DomainError
from hostguard.memory.acquire import AcquisitionError, dump_dir, memory_dump
from hostguard.memory.checkconfig import add_vmcoreinfo, check_config
from tests.testbed.prereq import require_module, require_root

libvirt = require_module("libvirt")

DOMAIN = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory>
<os><type arch='x86_64'>hvm</type><kernel>/boot/vmlinuz</kernel></os>{features}<devices/></domain>"""


@pytest.fixture
def conn() -> Iterator[Any]:
    c = libvirt.open("test:///default")  # a private, in-memory driver state per connection
    yield c
    c.close()


def define(conn: Any, name: str, features: str = "<features><acpi/></features>") -> Any:
    return conn.defineXML(DOMAIN.format(name=name, features=features))


def test_missing_vmcoreinfo_is_reported_then_fixed(conn: Any) -> None:
    define(conn, "a")
    before = check_config(conn, "a")
    assert not before.ok and before.vmcoreinfo is False and before.live_vmcoreinfo is None
    assert "vmcoreinfo" in before.problems[0] and "--fix" in before.notes[0]
    fixed = check_config(conn, "a", fix=True)
    assert fixed.ok and fixed.fixed
    xml = conn.lookupByName("a").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "<vmcoreinfo state='on'/>" in xml and "<acpi/>" in xml and "/boot/vmlinuz" in xml
    assert check_config(conn, "a").ok and not check_config(conn, "a").fixed


def test_no_features_element_and_state_off_are_fixed(conn: Any) -> None:
    define(conn, "b", features="")
    assert check_config(conn, "b", fix=True).ok
    define(conn, "c", features="<features><vmcoreinfo state='off'/></features>")
    assert not check_config(conn, "c").ok
    assert check_config(conn, "c", fix=True).ok
    assert "<vmcoreinfo state='on'/>" in conn.lookupByName("c").XMLDesc(0)


def test_running_domain_is_told_that_a_cold_boot_is_needed(conn: Any) -> None:
    dom = define(conn, "d")
    dom.create()
    result = check_config(conn, "d", fix=True)
    assert result.ok and result.live_vmcoreinfo is False
    assert any("next cold boot" in n for n in result.notes)
    later = check_config(conn, "d")
    assert later.ok and any("running instance does not" in n for n in later.notes)


def test_lines_for_the_cli(conn: Any) -> None:
    define(conn, "e")
    assert check_config(conn, "e").lines()[0] == "e: not ready for memory introspection"


def test_unknown_domains_and_non_qemu_domains_are_errors(conn: Any) -> None:
    with pytest.raises(ConfigError, match="domain nope"):
        check_config(conn, "nope")
    with pytest.raises(DomainError, match="domain type"):
        check_config(conn, "test")  # the driver's own domain is type='test': not one hostguard manages


def test_add_vmcoreinfo_keeps_everything_else() -> None:
    xml = DOMAIN.format(name="x", features="<features><acpi/><apic/></features>").encode()
    out = add_vmcoreinfo(xml).decode()
    assert out.count("<features>") == 1 and "<apic/>" in out and '<vmcoreinfo state="on"/>' in out


def test_acquisition_failure_removes_the_file_and_resumes(conn: Any, tmp_path: Path) -> None:
    dom = conn.lookupByName("test")
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    with pytest.raises(AcquisitionError, match="memory dump of test failed"):  # noqa: SIM117
        with memory_dump(dom, tmp_path, suspend=True):
            pytest.fail("the test driver cannot make memory-only dumps")
    assert list((tmp_path / "dumps").iterdir()) == []
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # resumed after the failed dump
    assert (os.stat(tmp_path / "dumps").st_mode & 0o777) == 0o700


def test_acquisition_refuses_stopped_domains_and_foreign_dump_dirs(conn: Any, tmp_path: Path) -> None:
    dom = define(conn, "stopped")
    with pytest.raises(AcquisitionError, match="not running"), memory_dump(dom, tmp_path):
        pass
    require_root()
    foreign = tmp_path / "foreign"
    (foreign / "dumps").mkdir(parents=True)
    os.chown(foreign / "dumps", 12345, 12345)
    with pytest.raises(AcquisitionError, match="not owned"):
        dump_dir(foreign)


def test_in_place_needs_a_qemu_process_and_auto_falls_back_to_the_dump(conn: Any, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from hostguard.errors import UsageError
    from hostguard.memory.guestram import GuestRamError
    from hostguard.memory.inspect import inspect_domain_memory
    from hostguard.signed.manifest import DiskEntry, ImageId, Manifest

    now = datetime.now(UTC)
    manifest = Manifest(ImageId("t", 1), now, now + timedelta(days=1), (DiskEntry("0" * 64, 1),), ())
    with pytest.raises(GuestRamError, match="no QEMU process"):  # the test driver runs no QEMU
        inspect_domain_memory("test", manifest, None, tmp_path, conn=conn, method="in-place")
    with pytest.raises(AcquisitionError, match="memory dump of test failed"):  # auto: the dump is tried next
        inspect_domain_memory("test", manifest, None, tmp_path, conn=conn)
    assert conn.lookupByName("test").state()[0] == libvirt.VIR_DOMAIN_RUNNING
    with pytest.raises(UsageError, match="pause policy"):
        inspect_domain_memory("test", manifest, None, tmp_path, conn=conn, pause="sometimes")

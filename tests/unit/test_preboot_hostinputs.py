"""Issue 14's pre-boot bypasses, each reproduced against `hostguard.preboot.decide.decide` (the function the
installed hook runs) or the hook itself in a subprocess: what libvirt hands QEMU must be what was verified.

Where libvirt's reading matters (backing chains, verbatim paths), tests/integration/test_preboot_inputs.py
shows with `virsh domxml-to-native` that QEMU really would get the attacker's file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hostguard.cli import main
from hostguard.domain.xmlparse import parse_domain_xml
from hostguard.errors import ConfigError, DomainError
from hostguard.preboot.decide import decide
from hostguard.preboot.hostinputs import check_host_inputs
from tests.unit.test_preboot import UUID, Host, denied, host, host_template, qemu_img

__all__ = ["host", "host_template"]  # the fixtures, re-exported for pytest

STACKS = Path(__file__).parent / "data" / "stacks"  # domain XML written by Nova's libvirt driver (Nova 33)
HG = "xmlns:hostguard='https://hostguard.dev/xmlns/domain/1'"


def sign(host: Host, image: Path, name: str, version: int = 1, *, boot: bool = True) -> Path:
    """Sign `image` as NAME vVERSION with the host's test key (kernel and initrd too when `boot`)."""
    keys = host.tmp / "keys"
    manifest = host.tmp / f"{image.name}.m.json"
    create = ["manifest", "create", str(image), "--name", name, "--version", str(version), "--format", "qcow2"]
    if boot:
        create += ["--kernel", str(host.kernel), "--initrd", str(host.initrd)]
    assert main([*create, "--reader", "none", "--quiet", "-o", str(manifest)]) == 0
    envelope = Path(f"{image}.hgsig")
    sign_args = [
        "--key",
        str(keys / "leaf.key.pem"),
        "--cert",
        str(keys / "leaf.crt.pem"),
        "--chain",
        str(keys / "chain.pem"),
    ]
    assert main(["sign", str(manifest), *sign_args, "-o", str(envelope)]) == 0
    return envelope


def disk_xml(path: Path, inner: str = "", *, target: str = "vda", fmt: str = "qcow2") -> str:
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/><source file='{path}'/>{inner}"
        f"<target dev='{target}' bus='virtio'/></disk>"
    )


def backing(path: Path | str, fmt: str = "qcow2", inner: str = "<backingStore/>", kind: str = "file") -> str:
    return f"<backingStore type='{kind}'><format type='{fmt}'/><source file='{path}'/>{inner}</backingStore>"


def domain(host: Host, devices: str, *, os_extra: str = "", extra: str = "", name: str = "web1") -> bytes:
    return (
        f"<domain type='qemu'><name>{name}</name><uuid>{UUID}</uuid><memory unit='MiB'>128</memory>"
        f"<os><type arch='x86_64'>hvm</type><kernel>{host.kernel}</kernel><initrd>{host.initrd}</initrd>"
        f"{os_extra}</os><devices>{devices}</devices>{extra}</domain>"
    ).encode()


def unsigned_qcow2(host: Host, name: str = "evil.qcow2") -> Path:
    path = host.tmp / name
    qemu_img("create", "-q", "-f", "qcow2", str(path), "16M")
    return path


# --- 1. the XML's <backingStore> chain against the qcow2 headers --------------------------------------------


def test_xml_backing_store_naming_an_unsigned_image_under_a_signed_overlay_is_refused(host: Host) -> None:
    # The overlay's header names the signed base; libvirt would hand QEMU the XML's unsigned image instead.
    top, evil = host.overlay(), unsigned_qcow2(host)
    text = denied(host, host.xml(None, devices=disk_xml(top, backing(evil))), f"names file {evil} (qcow2)")
    assert f"image header chain has {host.base} (qcow2)" in text


def test_xml_backing_store_added_under_a_standalone_signed_image_is_refused(host: Host) -> None:
    # Every unallocated cluster of the signed image would read the attacker's backing file.
    evil = unsigned_qcow2(host)
    text = denied(host, host.xml(None, devices=disk_xml(host.base, backing(evil))), "adds a layer under")
    assert str(host.base) in text


def test_a_layer_inserted_in_the_middle_of_the_xml_chain_is_refused(host: Host) -> None:
    mid = host.overlay("mid.qcow2")
    top = host.tmp / "top3.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(mid), str(top))
    evil = unsigned_qcow2(host)
    inserted = backing(mid, inner=backing(evil, inner=backing(host.base)))
    denied(host, host.xml(None, devices=disk_xml(top, inserted)), f"<backingStore> #2 names file {evil}")


def test_a_backing_store_format_other_than_the_header_s_is_refused(host: Host) -> None:
    top = host.overlay()
    denied(host, host.xml(None, devices=disk_xml(top, backing(host.base, "raw"))), "(raw) but the image header")


def test_an_empty_backing_store_that_cuts_off_the_verified_base_is_refused(host: Host) -> None:
    # <backingStore/> means "no backing file" to libvirt: QEMU would open the overlay alone.
    top = host.overlay()
    denied(host, host.xml(None, devices=disk_xml(top, "<backingStore/>")), "ends the backing chain (<backingStore/>)")


def test_a_typeless_backing_store_with_content_is_refused_as_ambiguous(host: Host) -> None:
    # libvirt reads a <backingStore> without type as the terminator, whatever it contains.
    top = host.overlay()
    typeless = f"<backingStore><format type='qcow2'/><source file='{host.base}'/></backingStore>"
    with pytest.raises(DomainError, match="without type but with content"):
        host.decide(host.xml(None, devices=disk_xml(top, typeless)))


@pytest.mark.parametrize("terminated", [True, False])
def test_an_xml_chain_that_agrees_with_the_headers_is_allowed(host: Host, terminated: bool) -> None:
    # KubeVirt's shape: the overlay and its base spelled out in the XML, as the headers say.
    top = host.overlay()
    chain = backing(host.base, inner="<backingStore/>" if terminated else "")
    decision = host.decide(host.xml(None, devices=disk_xml(top, chain)))
    layers = decision.domain_record().disks[0].layers
    assert [x.path for x in layers] == [str(top), str(host.base)]


def test_a_standalone_signed_image_with_the_terminator_is_allowed(host: Host) -> None:
    assert host.decide(host.xml(None, devices=disk_xml(host.base, "<backingStore/>"))).outcomes


# --- 2. paths exactly as libvirt passes them ----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [" ", "\u00a0", "\u2028", "\u0085", "\n", "\t"])
def test_a_kernel_path_with_trailing_whitespace_is_refused_not_stripped(host: Host, suffix: str) -> None:
    # <kernel>/img/vmlinuz </kernel> used to verify /img/vmlinuz while libvirt boots the file "/img/vmlinuz ".
    (host.tmp / f"vmlinuz{suffix}").write_bytes(b"evil kernel")
    xml = host.xml(host.overlay()).replace(f"{host.kernel}<".encode(), f"{host.kernel}{suffix}<".encode())
    with pytest.raises(DomainError, match=r"has leading or trailing whitespace|invisible or control character"):
        host.decide(xml)


@pytest.mark.parametrize(
    ("os_extra", "what"),
    [
        ("<loader readonly='yes' type='pflash'> /usr/share/qemu/bios.bin</loader>", "loader"),
        ("<nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd </nvram>", "nvram"),
        ("<acpi><table type='slic'>/srv/slic.dat\u00a0</table></acpi>", "acpi table"),
    ],
)
def test_other_element_text_paths_with_whitespace_are_refused(host: Host, os_extra: str, what: str) -> None:
    with pytest.raises(DomainError, match=f"{what} path .* has leading or trailing whitespace"):
        host.decide(host.xml(host.overlay(), os_extra=os_extra))


@pytest.mark.parametrize("bad", ["\u200b", "\u202e", "\x7f", "\x85"])
def test_a_source_path_with_an_invisible_character_is_refused(host: Host, bad: str) -> None:
    top = host.overlay()
    with pytest.raises(DomainError, match="invisible or control character"):
        host.decide(host.xml(None, devices=disk_xml(Path(f"{top.parent}/{bad}{top.name}"))))


# --- 4. <emulator> ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "emulator",
    ["/tmp/qemu-wrapper.sh", "/usr/bin/qemu-system-x86_64/../../../tmp/w", "/usr/local/bin/qemu-system-x86_64"],
)
def test_an_emulator_wrapper_is_refused(host: Host, emulator: str) -> None:
    xml = host.xml(host.overlay(), devices=f"<emulator>{emulator}</emulator>")
    assert "[policy] emulators" in denied(host, xml, f"emulator {emulator} is not a known QEMU binary")


def test_the_distribution_s_qemu_and_a_policy_named_emulator_are_allowed(host: Host) -> None:
    top = host.overlay()
    assert host.decide(host.xml(top, devices="<emulator>/usr/bin/qemu-system-x86_64</emulator>")).outcomes
    wrapped = host.xml(top, devices="<emulator>/opt/qemu/bin/qemu-system-x86_64</emulator>")
    assert host.decide(wrapped, emulators=["/opt/qemu/bin/qemu-system-*"]).outcomes


# --- 5. mix-and-match of signed images ----------------------------------------------------------------------


def other_image(host: Host, name: str, version: int = 1) -> tuple[Path, Path]:
    image = host.tmp / f"{name}-v{version}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), f"{16 + version}M")
    return image, sign(host, image, name, version, boot=False)


def test_a_kernel_from_one_signed_image_and_a_disk_from_another_is_refused(host: Host) -> None:
    # The domain-wide envelope (web) vouches for the kernel; the disk verifies under data's own envelope.
    data, data_env = other_image(host, "data")
    meta = f"<metadata><hostguard:image {HG} envelope='{host.base}.hgsig'>"
    meta += f"<hostguard:disk target='vda' envelope='{data_env}'/></hostguard:image></metadata>"
    xml = domain(host, disk_xml(data), extra=meta)
    text = denied(host, xml, "the domain mixes signed images (data v1, web v1); the kernel comes from web v1")
    assert "[policy] allow_image_combinations" in text
    assert host.decide(xml, allow_image_combinations=[["web", "data"]]).outcomes


def test_two_versions_of_one_image_never_mix_even_when_the_names_are_allowed(host: Host) -> None:
    _, v2_env = other_image(host, "web", 2)
    v2 = host.tmp / "web-v2.qcow2"
    meta = f"<metadata><hostguard:image {HG} envelope='{host.base}.hgsig'>"
    meta += f"<hostguard:disk target='vdb' envelope='{v2_env}'/></hostguard:image></metadata>"
    xml = domain(host, disk_xml(host.overlay()) + disk_xml(v2, target="vdb"), extra=meta)
    denied(host, xml, "mixes versions of one image (web v1, web v2)", allow_image_combinations=[["web"]])


# --- 6. policy globs ----------------------------------------------------------------------------------------


def block_disk(dev: str) -> str:
    source = f"<source dev='{dev}'/><target dev='vdb'/>"
    return f"<disk type='block' device='disk'><driver name='qemu' type='raw'/>{source}</disk>"


@pytest.mark.parametrize("dev", ["/dev/vg0/../sda", "/dev/vg0/./../sda", "/dev/vg0//lv", "/dev/vg0/lv/../../sda"])
def test_a_block_device_glob_cannot_be_walked_out_of(host: Host, dev: str) -> None:
    xml = host.xml(host.overlay(), devices=block_disk(dev))
    denied(host, xml, "is not allowed by policy", allow_block_devices=["/dev/vg0/*"])


def test_a_block_device_the_glob_names_is_allowed(host: Host) -> None:
    decision = host.decide(
        host.xml(host.overlay(), devices=block_disk("/dev/vg0/lv")), allow_block_devices=["/dev/vg0/*"]
    )
    assert any("disk vdb (disk, block) allowed unverified" in n for n in decision.notes)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("allow_block_devices", ["/dev/vg0/../*"]),
        ("allow_block_devices", ["dev/vg0/*"]),
        ("firmware_dirs", ["/usr/share/./OVMF"]),
        ("emulators", ["/usr/bin/qemu-system-* "]),
        ("nvram_dirs", ["/var/lib/libvirt/qemu//nvram"]),
    ],
)
def test_a_policy_glob_with_normalisation_tricks_is_refused_at_load(host: Host, key: str, value: list[str]) -> None:
    with pytest.raises(ConfigError, match=f"\\[policy\\] {key} entry"):
        host.config(**{key: value})


# --- 7. exemptions on the exact name ------------------------------------------------------------------------


def run_hook(host: Host, xml: bytes, *args: str, **policy: Any) -> subprocess.CompletedProcess[str]:
    """The hook as libvirt runs it: a subprocess, XML on stdin, our configuration."""
    lines = [f'[trust]\ndir = "{host.trust}"\n[state]\ndir = "{host.state}"\n[policy]']
    lines += [f"{key} = {json.dumps(value)}" for key, value in policy.items()]
    lines += [f'[audit]\nlog = "{host.tmp / "audit.jsonl"}"\nsyslog = false']
    config = host.tmp / "hostguard.toml"
    config.write_text("\n".join(lines) + "\n")
    env = {"PATH": "/usr/bin:/bin", "HOSTGUARD_CONFIG": str(config), "HOSTGUARD_HOOK_LOG": str(host.tmp / "hook.log")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    code = "import sys; from hostguard.hook import run; run(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args], input=xml.decode(), capture_output=True, text=True, env=env, check=False
    )


def test_an_exemption_does_not_cover_a_lookalike_name(host: Host) -> None:
    unsigned = unsigned_qcow2(host)
    exact = run_hook(
        host, domain(host, disk_xml(unsigned), name="scratch"), "scratch", "prepare", "begin", "-", exempt=["scratch"]
    )
    assert exact.returncode == 0, exact.stderr
    lookalike = domain(host, disk_xml(unsigned), name="scratch\u00a0")
    result = run_hook(host, lookalike, "scratch\u00a0", "prepare", "begin", "-", exempt=["scratch"])
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "has leading or trailing whitespace" in result.stderr


def test_a_name_with_a_zero_width_character_is_not_exempt(host: Host) -> None:
    xml = domain(host, disk_xml(unsigned_qcow2(host)), name="scr\u200batch")
    with pytest.raises(DomainError, match="U\\+200B"):
        decide(xml, host.config(exempt=["scr*"]), time.time())


# --- the kernel command line --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cmdline",
    [
        "console=ttyS0 init=/bin/sh",
        "rdinit=/evil",
        "console=ttyS0 systemd.run=/bin/evil",
        "module.sig_enforce=0",
        "console=ttyS0 -- /bin/sh",
        "console=ttyS0\u00a0init=/bin/sh",  # the kernel splits on the byte 0xA0
        'console="ttyS0 init=/bin/sh"',
        "console=ttyS0\tinit=/bin/sh",
    ],
)
def test_a_host_chosen_kernel_command_line_is_refused(host: Host, cmdline: str) -> None:
    xml = host.xml(host.overlay(), os_extra=f"<cmdline>{cmdline}</cmdline>")
    denied(host, xml, "kernel command line")


def test_console_and_root_parameters_and_policy_named_ones_are_allowed(host: Host) -> None:
    top = host.overlay()
    nova = "root=/dev/vda console=tty0 console=ttyS0 console=hvc0 no_timer_check"
    assert host.decide(host.xml(top, os_extra=f"<cmdline>{nova}</cmdline>")).outcomes
    extra = host.xml(top, os_extra="<cmdline>console=ttyS0 hostguard.rw=1</cmdline>")
    denied(host, extra, "parameter 'hostguard.rw=1' is not signed and not in [policy] allow_cmdline_params")
    assert host.decide(extra, allow_cmdline_params=["console=*", "hostguard.*"]).outcomes


# --- SMBIOS OEM strings and fw_cfg for systemd --------------------------------------------------------------


def smbios(*oem: str) -> str:
    entries = "".join(f"<entry>{s}</entry>" for s in oem)
    return f"<sysinfo type='smbios'><oemStrings>{entries}</oemStrings></sysinfo>"


@pytest.mark.parametrize(
    "oem",
    [
        "io.systemd.credential:passwd.hashed-password.root=$6$x",
        "io.systemd.credential.binary:ssh.authorized_keys.root=c3NoLWVk",
        "io.systemd.stub.kernel-cmdline-extra=init=/bin/sh",
        "io.systemd.boot.kernel-cmdline-extra=rd.break",
    ],
)
def test_systemd_credentials_in_smbios_oem_strings_are_refused(host: Host, oem: str) -> None:
    xml = host.xml(host.overlay(), os_extra="<smbios mode='sysinfo'/>", extra=smbios("hgowner1:shared-secret", oem))
    denied(host, xml, "hands systemd credentials or kernel parameters to the guest")


def test_systemd_credentials_in_fw_cfg_are_refused_even_when_fw_cfg_is_allowed(host: Host) -> None:
    entry = "<sysinfo type='fwcfg'><entry name='opt/io.systemd.credentials/root.pw'>x</entry></sysinfo>"
    denied(host, host.xml(host.overlay(), extra=entry), "opt/io.systemd.credentials/root.pw", allow_fwcfg=True)


def test_hostguard_s_own_boot_channel_token_is_allowed(host: Host) -> None:
    token = "hgowner1:no-secrets:sha256:" + "ab" * 32
    assert host.decide(host.xml(host.overlay(), os_extra="<smbios mode='sysinfo'/>", extra=smbios(token))).outcomes


# --- boot order ---------------------------------------------------------------------------------------------

NIC = "<interface type='user'><model type='virtio'/>{inner}</interface>"


@pytest.mark.parametrize(
    ("os_extra", "devices", "match"),
    [
        ("<boot dev='network'/><boot dev='hd'/>", "", "network boot (<boot dev='network'/>) comes before"),
        ("<boot dev='network'/>", "", "network boot"),
        ("", NIC.format(inner="<boot order='1'/>"), "interface #0 boots (order 1) before any signed disk"),
        (
            "",
            NIC.format(inner="<rom file='/usr/share/qemu/pxe-virtio.rom'/><boot order='1'/>"),
            "interface #0 boots (order 1)",
        ),
    ],
)
def test_network_boot_ahead_of_the_signed_disk_is_refused(host: Host, os_extra: str, devices: str, match: str) -> None:
    top = host.overlay()
    disk = disk_xml(top, "<boot order='2'/>") if devices else disk_xml(top)
    denied(host, host.xml(None, os_extra=os_extra, devices=disk + devices), match)


def test_network_boot_after_the_disk_is_allowed(host: Host) -> None:
    top = host.overlay()
    assert host.decide(host.xml(top, os_extra="<boot dev='hd'/><boot dev='network'/>")).outcomes
    devices = disk_xml(top, "<boot order='1'/>") + NIC.format(inner="<boot order='2'/>")
    assert host.decide(host.xml(None, devices=devices)).outcomes


# --- firmware, nvram, shmem ---------------------------------------------------------------------------------


def test_an_attacker_nvram_outside_libvirt_s_nvram_directory_is_refused(host: Host, tmp_path: Path) -> None:
    evil = tmp_path / "evil_VARS.fd"
    evil.write_bytes(b"\0" * 4096)
    os_extra = f"<loader readonly='yes' type='pflash'>/usr/share/qemu/bios.bin</loader><nvram>{evil}</nvram>"
    text = denied(host, host.xml(host.overlay(), os_extra=os_extra), f"UEFI variable store {evil} is not a file")
    assert "[policy] nvram_dirs" in text


def test_an_nvram_symlink_inside_the_nvram_directory_is_refused(host: Host, tmp_path: Path) -> None:
    nvram_dir = tmp_path / "nvram"
    nvram_dir.mkdir()
    (tmp_path / "evil_VARS.fd").write_bytes(b"\0" * 4096)
    (nvram_dir / "web1_VARS.fd").symlink_to(tmp_path / "evil_VARS.fd")
    xml = host.xml(host.overlay(), os_extra=f"<nvram>{nvram_dir}/web1_VARS.fd</nvram>")
    denied(host, xml, "UEFI variable store", nvram_dirs=[str(nvram_dir)])
    (nvram_dir / "web1_VARS.fd").unlink()
    assert host.decide(xml, nvram_dirs=[str(nvram_dir)]).outcomes  # libvirt will create it from the template


@pytest.mark.parametrize("readonly", ["", " readonly='no'"])
def test_a_writable_pflash_loader_on_a_shared_firmware_file_is_refused(host: Host, readonly: str) -> None:
    os_extra = f"<loader type='pflash'{readonly}>/usr/share/qemu/bios.bin</loader>"
    denied(host, host.xml(host.overlay(), os_extra=os_extra), "would be opened writable")
    ok = "<loader type='pflash' readonly='yes'>/usr/share/qemu/bios.bin</loader>"
    assert host.decide(host.xml(host.overlay("ok.qcow2"), os_extra=ok)).outcomes


def test_shared_memory_is_refused_by_default(host: Host) -> None:
    shmem = "<shmem name='evil'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>"
    text = denied(host, host.xml(host.overlay(), devices=shmem), "shared memory device 'evil'")
    assert "[policy] allow_shmem = true" in text
    assert host.decide(host.xml(host.overlay("s.qcow2"), devices=shmem), allow_shmem=True).outcomes


@pytest.mark.parametrize("where", ["loader", "rom"])
def test_a_symlink_into_a_firmware_directory_is_refused(host: Host, tmp_path: Path, where: str) -> None:
    # realpath passes, but libvirt opens the link, which its owner can re-aim after the check.
    link = tmp_path / "fw.bin"
    link.symlink_to("/usr/share/qemu/kvmvapic.bin")
    if where == "loader":
        xml = host.xml(host.overlay(), os_extra=f"<loader type='rom'>{link}</loader>")
    else:
        xml = host.xml(host.overlay(), devices=NIC.format(inner=f"<rom file='{link}'/>"))
    denied(host, xml, "is not in a firmware directory")


# --- restore and incoming migration -------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "key"), [("restore", "allow_restore"), ("migrate", "allow_incoming_migration")])
def test_restore_and_incoming_migration_are_refused_unless_policy_allows(host: Host, op: str, key: str) -> None:
    xml = host.xml(host.overlay())
    result = run_hook(host, xml, "web1", op, "begin", "-")
    assert result.returncode == 1 and result.stdout == "" and result.stderr.count("\n") == 1
    assert f"(set [policy] {key} = true to allow)" in result.stderr
    allowed = run_hook(host, xml, "web1", op, "begin", "-", **{key: True})
    assert (allowed.returncode, allowed.stdout) == (0, ""), allowed.stderr
    with pytest.raises(DomainError, match="no check has seen"):
        decide(xml, host.config(), time.time(), operation=op)


# --- legitimate shapes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nova-domain-cfgdrive.xml", "nova-domain-ami.xml"])
def test_nova_s_domain_shapes_pass_the_host_input_checks(host: Host, name: str) -> None:
    source = STACKS / name
    spec = parse_domain_xml(source.read_bytes())
    check_host_inputs(spec, host.config())  # nothing of the new checks refuses Nova's shapes


def test_nova_s_ami_domain_with_paths_substituted_is_allowed(host: Host) -> None:
    # Direct kernel boot with Nova's command line, SMBIOS system entries, no <emulator>: verified end to end.
    source = STACKS / "nova-domain-ami.xml"
    instance = "/var/lib/nova/instances/db6daa43-4d5c-4712-bb94-60c7f995bf0a"
    text = source.read_text()
    for old, new in ((f"{instance}/kernel<", f"{host.kernel}<"), (f"{instance}/ramdisk<", f"{host.initrd}<")):
        assert old in text
        text = text.replace(old, new)
    text = text.replace(f'"{instance}/disk"', f'"{host.overlay()}"')
    decision = host.decide(text.encode())
    assert [o.facts.label for _, o in decision.outcomes] == ["web v1"] and len(decision.boot_files()) == 2


def test_libvirt_s_live_xml_with_the_detected_chain_agrees(host: Host) -> None:
    # After `virsh restore`, libvirt's XML carries the chain it detected, terminator included.
    top = host.overlay()
    live = disk_xml(top, backing(host.base).replace("type='file'>", "type='file' index='2'>"))
    xml = host.xml(None, devices=live).replace(b"<domain type='qemu'>", b"<domain type='qemu' id='7'>")
    assert decide(xml, host.config(allow_restore=True), time.time(), operation="restore").outcomes


def test_the_new_checks_import_nothing_heavy_on_the_hook_path() -> None:
    code = "import sys, hostguard.hook, hostguard.preboot.decide; print(' '.join(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    heavy = {"typing", "dataclasses", "lxml", "lxml.etree", "unicodedata", "tomllib", "cryptography", "json.decoder"}
    assert not set(run.stdout.split()) & (heavy - {"json.decoder"})


@pytest.mark.parametrize("name", ["", "a", "ab", "a*", "console=ttyS0", "console=", "a?c", "[a]", "x/y"])
@pytest.mark.parametrize("pattern", ["", "a", "a*", "*", "ab*", "a?c", "console=*", "[a]", "a\\*", "**", "a*c", "x*"])
def test_the_fast_name_match_agrees_with_fnmatch(name: str, pattern: str) -> None:
    import fnmatch

    from hostguard.domain.paths import name_match

    assert name_match(name, pattern) == fnmatch.fnmatchcase(name, pattern)


def test_rbd_and_lvm_disks_are_refused_with_the_key_that_would_allow_them(host: Host) -> None:
    rbd = (
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
        "<source protocol='rbd' name='vms/uuid_disk'><host name='10.0.0.1' port='6789'/></source>"
        "<target dev='vdb' bus='virtio'/></disk>"
    )
    top = host.overlay()
    denied(host, host.xml(top, devices=rbd), "rbd disks cannot be verified by hostguard (set [policy] allow_network")
    lvm = block_disk("/dev/nova/uuid_disk")
    denied(host, host.xml(top, devices=lvm), "block device /dev/nova/uuid_disk is not allowed by policy (name it in")


def test_the_new_fields_survive_the_parse_cache(host: Host) -> None:
    from hostguard.domain.spec import spec_from_json, spec_to_json

    top = host.overlay()
    devices = (
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
        + disk_xml(top, backing(host.base) + "<boot order='1'/>")
        + NIC.format(inner="<boot order='2'/>")
        + "<shmem name='s'><model type='ivshmem-plain'/></shmem>"
    )
    xml = host.xml(None, devices=devices, os_extra="<boot dev='hd'/>", extra=smbios("hgowner1:shared-secret"))
    spec = parse_domain_xml(xml)
    assert spec.emulator and spec.boot_order and spec.shmem and spec.oem_strings and spec.os.boot_devs
    assert spec.disks[0].backing_end and len(spec.disks[0].backing_chain) == 1
    back = spec_from_json(spec_to_json(spec))
    assert back == spec and repr(back) == repr(spec)

"""The signed kernel command line (issue 14): a manifest's boot entry may carry the exact line
(`boot.cmdline`) or the parameters a host may set (`boot.cmdline_params`); the host's `<cmdline>` must then
match it, through the real decision (signature verified, verdict cache warm or cold). Without either, the
policy list decides, as before; manifests without the keys verify unchanged."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from hostguard.cli import main
from hostguard.errors import FormatError, VerificationError
from hostguard.host.config import Config
from hostguard.preboot.decide import Decision, decide
from hostguard.signed.manifest import parse_boot
from tests.testbed.pki import TestPKI
from tests.testbed.prereq import require_tool

UUID = "9d1f0a52-7b3e-4c1a-8e55-0f6a2b3c4d5e"
SIGNED = "console=ttyS0 root=/dev/vda ro"


class Host:
    def __init__(self, tmp: Path, pki: TestPKI, *line: str) -> None:
        require_tool("qemu-img")
        self.tmp = tmp
        self.trust = pki.write_trust_dir(tmp / "trust", crls=[pki.crl()])
        cert, key = pki.leaf.write(tmp / "keys", "leaf")
        chain = tmp / "keys" / "chain.pem"
        chain.write_bytes(pki.intermediate.pem)
        self.base = tmp / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.base), "16M"], check=True)
        self.kernel, self.initrd = tmp / "vmlinuz", tmp / "initrd.img"
        self.kernel.write_bytes(b"kernel" * 100)
        self.initrd.write_bytes(b"initrd" * 100)
        manifest = tmp / "m.json"
        create = ["manifest", "create", str(self.base), "--name", "web", "--version", "1", "--format", "qcow2"]
        create += ["--kernel", str(self.kernel), "--initrd", str(self.initrd), "--reader", "none", "--quiet", *line]
        assert main([*create, "-o", str(manifest)]) == 0
        self.manifest = json.loads(manifest.read_text())
        sign = ["sign", str(manifest), "--key", str(key), "--cert", str(cert), "--chain", str(chain)]
        assert main([*sign, "-o", f"{self.base}.hgsig"]) == 0
        self.state = tmp / "state"

    def decide(self, cmdline: str | None, **policy: object) -> Decision:
        line = "" if cmdline is None else f"<cmdline>{cmdline}</cmdline>"
        xml = (
            f"<domain type='qemu'><name>web1</name><uuid>{UUID}</uuid><memory unit='MiB'>128</memory>"
            f"<os><type arch='x86_64'>hvm</type><kernel>{self.kernel}</kernel><initrd>{self.initrd}</initrd>{line}"
            "</os><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{self.base}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
        ).encode()
        doc = {"trust": {"dir": str(self.trust)}, "state": {"dir": str(self.state)}, "policy": policy}
        return decide(xml, Config(doc, self.tmp / "hostguard.toml"), time.time())

    def denied(self, cmdline: str | None, match: str, **policy: object) -> str:
        with pytest.raises(VerificationError) as info:
            self.decide(cmdline, **policy)
        text = str(info.value)
        assert "\n" not in text and match in text, text
        return text


def test_init_appended_to_a_signed_exact_command_line_is_refused(tmp_path: Path, pki: TestPKI) -> None:
    host = Host(tmp_path, pki, "--cmdline", SIGNED)
    assert host.manifest["boot"]["cmdline"] == SIGNED
    host.denied(f"{SIGNED} init=/bin/sh", f"is not the one web v1 signs ('{SIGNED}')")
    # the same attack once the verdict is cached: the cached manifest summary carries the signed line
    assert host.decide(SIGNED).outcomes[0][1].cached_verdict is True
    host.denied(f"{SIGNED} rdinit=/bin/sh", "is not the one web v1 signs")


def test_a_signed_exact_line_is_allowed_even_where_the_policy_list_would_refuse_it(
    tmp_path: Path, pki: TestPKI
) -> None:
    host = Host(tmp_path, pki, "--cmdline", f"{SIGNED} hostguard.mode=demo")
    assert host.decide(f"{SIGNED} hostguard.mode=demo").outcomes
    host.denied(None, "kernel command line '' is not the one web v1 signs")  # dropping it changes the boot too


def test_signed_parameters_replace_the_policy_list_for_that_image(tmp_path: Path, pki: TestPKI) -> None:
    host = Host(tmp_path, pki, "--cmdline-param", "console=*", "--cmdline-param", "hostguard.*")
    assert host.manifest["boot"]["cmdline_params"] == ["console=*", "hostguard.*"]
    assert host.decide("console=ttyS0 hostguard.mode=demo").outcomes
    host.denied("console=ttyS0 ro", "parameter 'ro' is not signed and not in the parameters web v1 signs")
    host.denied("console=ttyS0 init=/bin/sh", "parameter 'init=/bin/sh' is not signed")


def test_without_a_signed_line_the_policy_list_still_decides(tmp_path: Path, pki: TestPKI) -> None:
    host = Host(tmp_path, pki)
    assert "cmdline" not in host.manifest["boot"] and "cmdline_params" not in host.manifest["boot"]
    assert host.decide(SIGNED).outcomes
    host.denied(f"{SIGNED} init=/bin/sh", "not in [policy] allow_cmdline_params")


def test_the_manifest_refuses_ambiguous_or_contradictory_command_lines() -> None:
    kernel = {"sha256": "a" * 64, "size": 1}
    assert parse_boot({"kernel": kernel}).cmdline is None  # what older manifests say
    assert parse_boot({"kernel": kernel, "cmdline": ""}).cmdline == ""
    for boot, match in (
        ({"kernel": kernel, "cmdline": "a", "cmdline_params": ["a"]}, "exclude each other"),
        ({"cmdline": "console=ttyS0"}, "needs boot.kernel"),
        ({"kernel": kernel, "cmdline": 'init="/bin/sh"'}, "quotes"),
        ({"kernel": kernel, "cmdline": "ro\u00a0init=/bin/sh"}, "non-ASCII"),
        ({"kernel": kernel, "cmdline_params": ["console=* init=*"]}, "one kernel parameter"),
        ({"kernel": kernel, "cmdline_params": "console=*"}, "JSON list"),
    ):
        with pytest.raises(FormatError, match=match):
            parse_boot(boot)


def test_manifest_create_refuses_a_command_line_without_a_kernel(tmp_path: Path) -> None:
    require_tool("qemu-img")
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    args = ["manifest", "create", str(image), "--name", "x", "--version", "1", "--reader", "none", "--quiet"]
    assert main([*args, "--cmdline", "ro", "-o", str(tmp_path / "m.json")]) == 2
    assert not (tmp_path / "m.json").exists()

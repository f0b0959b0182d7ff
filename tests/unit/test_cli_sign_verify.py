"""`hostguard manifest create | sign | verify` through the CLI entry point, with files and a state directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostguard.cli import main
from tests.testbed.pki import TestPKI

ROOT = Path(__file__).resolve().parents[2]


class Producer:
    def __init__(self, tmp: Path, pki: TestPKI) -> None:
        self.tmp = tmp
        self.pki = pki
        self.trust = pki.write_trust_dir(tmp / "trust")
        self.cert, self.key = pki.leaf.write(tmp / "keys", "leaf")
        self.chain = tmp / "keys" / "chain.pem"
        self.chain.write_bytes(pki.intermediate.pem)
        self.state = tmp / "state"

    def image(self, name: str = "disk.raw", content: bytes = b"\x00" * 65536 + b"guest") -> Path:
        path = self.tmp / name
        path.write_bytes(content)
        return path

    def release(self, image: Path, version: int, envelope: Path | None = None, name: str = "web") -> Path:
        manifest = self.tmp / f"manifest-v{version}.json"
        assert (
            main(
                [
                    "manifest",
                    "create",
                    str(image),
                    "--name",
                    name,
                    "--version",
                    str(version),
                    "--format",
                    "raw",
                    "--reader",
                    "none",
                    "--quiet",
                    "-o",
                    str(manifest),
                ]
            )
            == 0
        )
        env = envelope or image.with_name(image.name + f".v{version}.hgsig")
        assert (
            main(
                [
                    "sign",
                    str(manifest),
                    "--key",
                    str(self.key),
                    "--cert",
                    str(self.cert),
                    "--chain",
                    str(self.chain),
                    "-o",
                    str(env),
                ]
            )
            == 0
        )
        return env

    def verify(self, env: Path, *images: Path, extra: tuple[str, ...] = ()) -> int:
        args = ["verify", str(env), "--trust", str(self.trust), "--state", str(self.state)]
        for image in images:
            args += ["--image", str(image)]
        return main([*args, *extra])


@pytest.fixture
def producer(tmp_path: Path, pki: TestPKI) -> Producer:
    return Producer(tmp_path, pki)


def test_signed_image_verifies_and_json_names_the_signer(
    producer: Producer, capsys: pytest.CaptureFixture[str]
) -> None:
    image = producer.image()
    env = producer.release(image, 1)
    capsys.readouterr()
    assert producer.verify(env, image, extra=("--json",)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"] == "allow"
    assert result["image"] == {"name": "web", "version": 1}
    assert result["signers"] == ["O=hostguard tests,CN=acme-build"]
    assert "disk digest" in result["checks"] and "rollback" in result["checks"]


def test_one_byte_tampered_image_is_denied_with_one_line(
    producer: Producer, capsys: pytest.CaptureFixture[str]
) -> None:
    image = producer.image()
    env = producer.release(image, 1)
    data = bytearray(image.read_bytes())
    data[100] ^= 1
    image.write_bytes(bytes(data))
    capsys.readouterr()
    assert producer.verify(env, image) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("denied: disk digest:")


def test_rollback_through_the_state_directory_is_denied(producer: Producer, capsys: pytest.CaptureFixture[str]) -> None:
    image = producer.image()
    v1 = producer.release(image, 1)
    v2 = producer.release(image, 2)
    assert producer.verify(v2, image) == 0
    capsys.readouterr()
    assert producer.verify(v1, image) == 1
    assert "denied: rollback: web v1 is older than version 2" in capsys.readouterr().err


def test_a_failed_verification_does_not_fast_forward_the_state(producer: Producer) -> None:
    image = producer.image()
    v1 = producer.release(image, 1)
    v9 = producer.release(image, 9)
    other = producer.image("other.raw", b"not the signed disk")
    assert producer.verify(v9, other) == 1  # denied: must not record version 9
    assert producer.verify(v1, image) == 0


def test_digest_cache_serves_an_unchanged_image(producer: Producer, capsys: pytest.CaptureFixture[str]) -> None:
    image = producer.image()
    env = producer.release(image, 1)
    assert producer.verify(env, image) == 0
    capsys.readouterr()
    assert producer.verify(env, image, extra=("--json",)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["disks"][0]["cached"] is True and result["cached_verdict"] is True


def test_digest_cache_misses_when_content_changes_with_forged_mtime(producer: Producer) -> None:
    image = producer.image()
    env = producer.release(image, 1)
    assert producer.verify(env, image) == 0
    st = image.stat()
    with image.open("r+b") as fh:
        fh.seek(10)
        fh.write(b"X")
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime; ctime moves
    assert producer.verify(env, image) == 1


def test_cached_verdict_is_dropped_when_a_crl_revokes_the_signer(producer: Producer, pki: TestPKI) -> None:
    image = producer.image()
    env = producer.release(image, 1)
    assert producer.verify(env, image) == 0
    pki.write_trust_dir(producer.trust, crls=[pki.crl([pki.leaf.cert])])
    assert producer.verify(env, image) == 1


def test_non_ca_root_in_trust_dir_is_a_configuration_error(
    producer: Producer, pki: TestPKI, capsys: pytest.CaptureFixture[str]
) -> None:
    image = producer.image()
    env = producer.release(image, 1)
    (producer.trust / "roots" / "leaf.pem").write_bytes(pki.leaf.pem)
    capsys.readouterr()
    assert producer.verify(env, image) == 2
    assert "only CA certificates may be roots" in capsys.readouterr().err


def test_world_writable_trust_dir_is_refused(producer: Producer) -> None:
    image = producer.image()
    env = producer.release(image, 1)
    (producer.trust / "roots").chmod(0o777)
    assert producer.verify(env, image) == 2


def test_sign_appends_to_an_envelope_of_the_same_manifest(producer: Producer, pki: TestPKI) -> None:
    image = producer.image()
    env = producer.release(image, 1)
    second_cert, second_key = pki.leaf_variant("second-build").write(producer.tmp / "keys", "second")
    manifest = producer.tmp / "manifest-v1.json"
    assert (
        main(
            [
                "sign",
                str(manifest),
                "--key",
                str(second_key),
                "--cert",
                str(second_cert),
                "--chain",
                str(producer.chain),
                "-o",
                str(env),
            ]
        )
        == 0
    )
    assert len(json.loads(env.read_text())["signatures"]) == 2


def test_sign_refuses_a_key_that_does_not_match_the_certificate(producer: Producer, pki: TestPKI) -> None:
    image = producer.image()
    producer.release(image, 1)
    _, other_key = pki.leaf_variant("other").write(producer.tmp / "keys", "other")
    assert (
        main(
            [
                "sign",
                str(producer.tmp / "manifest-v1.json"),
                "--key",
                str(other_key),
                "--cert",
                str(producer.cert),
                "-o",
                str(producer.tmp / "x.hgsig"),
            ]
        )
        == 2
    )


def test_manifest_create_refuses_raw_that_looks_like_qcow2(producer: Producer) -> None:
    image = producer.image("fake.raw", b"QFI\xfb" + b"\x00" * 1000)
    assert (
        main(
            [
                "manifest",
                "create",
                str(image),
                "--name",
                "x",
                "--version",
                "1",
                "--format",
                "raw",
                "--reader",
                "none",
                "-o",
                str(producer.tmp / "m.json"),
            ]
        )
        == 2
    )


def test_command_line_exit_codes_and_single_line(producer: Producer) -> None:
    image = producer.image()
    env = producer.release(image, 1)
    hostguard = [sys.executable, "-m", "hostguard.cli"]
    ok = subprocess.run(
        [*hostguard, "verify", str(env), "--trust", str(producer.trust), "--image", str(image)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [*hostguard, "verify", str(env), "--trust", str(producer.tmp / "missing")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr

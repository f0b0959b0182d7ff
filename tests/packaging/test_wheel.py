"""The wheel and sdist from `python -m build` install into a fresh venv and verify an envelope there.

A fresh venv made the way a host admin would (`/usr/bin/python3 -m venv --system-site-packages`, for Debian's
python3-libvirt/python3-guestfs); only the wheel and its declared dependencies go in, so a file missing from
the package data or a dependency missing from pyproject.toml fails here rather than on a host.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostguard import __version__
from tests.testbed.pki import TestPKI
from tests.testbed.prereq import require
from tests.testbed.signed import disk_of, make_manifest, sign

pytestmark = pytest.mark.packaging
REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist + wheel built from the working tree (the wheel is built from the sdist, as `build` does)."""
    require(
        subprocess.run([sys.executable, "-m", "build", "--version"], capture_output=True).returncode == 0,
        "the `build` package is not installed (it is in the dev extras)",
    )
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require(SYSTEM_PYTHON.exists(), "/usr/bin/python3 is missing")
    root = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", "--system-site-packages", str(root)], check=True)
    (wheel,) = dist.glob("hostguard-*.whl")
    subprocess.run(
        [str(root / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], check=True, capture_output=True
    )
    yield root


def test_sdist_and_wheel_carry_the_shipped_files(dist: Path) -> None:
    (wheel,) = dist.glob(f"hostguard-{__version__}-py3-none-any.whl")
    (sdist,) = dist.glob(f"hostguard-{__version__}.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (
        "hostguard/py.typed",
        "hostguard/data/hostguardd.service",
        "hostguard/data/hostguard.logrotate",
        "hostguard/data/hostguard.bash-completion",
        "hostguard/data/qemu-hook",
        "hostguard/data/man/man1/hostguard-doctor.1",
        "hostguard/data/man/man5/hostguard.toml.5",
    ):
        assert shipped in names
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {"pyproject.toml", "setup.cfg", "hooks/qemu", "README.md"} <= members
    metadata = zipfile.ZipFile(wheel).read(f"hostguard-{__version__}.dist-info/METADATA").decode()
    assert f"Version: {__version__}" in metadata and "Requires-Dist: cryptography" in metadata


def test_installed_wheel_reports_its_version(venv: Path) -> None:
    done = subprocess.run([str(venv / "bin" / "hostguard"), "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"hostguard {__version__}"


def test_installed_wheel_verifies_a_signed_envelope_and_denies_a_tampered_image(venv: Path, tmp_path: Path) -> None:
    pki = TestPKI()
    trust = pki.write_trust_dir(tmp_path / "trust", crls=[pki.crl()])
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x00" * 4096 + b"signed guest")
    envelope = tmp_path / "disk.raw.hgsig"
    envelope.write_bytes(sign(make_manifest(disks=[disk_of(image.read_bytes())]), [(pki.leaf, [pki.intermediate])]))
    hostguard = str(venv / "bin" / "hostguard")
    args = [hostguard, "verify", str(envelope), "--trust", str(trust), "--image", str(image)]
    # From a neutral directory: the checkout's own package must not be what runs.
    ok = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    image.write_bytes(b"\x00" * 4096 + b"signed guesT")
    bad = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and "disk" in bad.stderr, bad.stderr


def test_installed_wheel_finds_its_hook_shim(venv: Path, tmp_path: Path) -> None:
    # Outside a checkout the shim comes from package data: `hostguard hook install` works from a wheel.
    code = "from hostguard.commands.hook_cmd import shim_source; import sys; sys.stdout.buffer.write(shim_source())"
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (REPO / "hooks" / "qemu").read_bytes()
    located = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import hostguard; print(hostguard.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert str(venv) in located.stdout

"""Disk image building blocks for the test bed, and an on-disk cache keyed by the inputs.

Cache: `$HOSTGUARD_TESTBED_CACHE` or /var/tmp/hostguard-testbed. Each entry is a directory named by the sha256
of its key parts; it is built in a temporary sibling directory and renamed into place, under a per-key lock,
so concurrent test runs never see (or build twice) a half-built entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

CACHE_ENV = "HOSTGUARD_TESTBED_CACHE"
DEFAULT_CACHE = Path("/var/tmp/hostguard-testbed")
TESTBED_DIR = Path(__file__).resolve().parent
SECTOR = 512
GPT_ALIGN = 2048  # sectors: 1 MiB
# The GPT Linux filesystem partition type (sgdisk code 8300).
LINUX_FS_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


def run(cmd: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a tool and return its stdout; on failure raise RuntimeError carrying its stderr."""
    argv = [os.fspath(c) for c in cmd]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


# --- filesystems and disks ----------------------------------------------------------------------------------


def make_ext4(src_dir: Path, out: Path, size_mb: int = 64, label: str = "root") -> Path:
    """A raw ext4 image of `size_mb` MiB holding `src_dir` (ownership, modes, xattrs and hard links kept)."""
    out.unlink(missing_ok=True)
    run(["mkfs.ext4", "-q", "-F", "-L", label, "-b", "4096", "-d", src_dir, out, f"{size_mb}M"])
    return out


def to_qcow2(raw: Path, out: Path) -> Path:
    """Convert a raw image to qcow2 (explicit source format: never probe)."""
    out.unlink(missing_ok=True)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out])
    return out


def make_gpt_disk(fs_images: list[Path], out: Path) -> Path:
    """A raw disk with a GPT holding one Linux-filesystem partition per image (in order, 1 MiB aligned), each
    image copied into its partition. Partition N+1 holds fs_images[N]."""
    if not fs_images:
        raise ValueError("make_gpt_disk needs at least one filesystem image")
    starts: list[int] = []
    sector = GPT_ALIGN
    for img in fs_images:
        starts.append(sector)
        sectors = -(-img.stat().st_size // SECTOR)
        sector += -(-sectors // GPT_ALIGN) * GPT_ALIGN
    total = sector + GPT_ALIGN  # room for the backup GPT at the end
    out.unlink(missing_ok=True)
    with out.open("wb") as fh:
        fh.truncate(total * SECTOR)
    # The table `sgdisk -Z -o -nN:START:END -tN:8300 -cN:partN` writes, written by sfdisk: sgdisk sleeps a
    # second after writing (for a kernel to re-read a device's table), sfdisk a quarter.
    layout = [f"label: gpt\nfirst-lba: 34\nlast-lba: {total - 34}\n"]
    for n, (img, start) in enumerate(zip(fs_images, starts, strict=True), start=1):
        sectors = -(-img.stat().st_size // SECTOR)
        layout.append(f'start={start}, size={sectors}, type={LINUX_FS_GUID}, name="part{n}"\n')
    proc = subprocess.run(["sfdisk", "--quiet", str(out)], input="".join(layout), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sfdisk {out} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    with out.open("r+b") as dst:
        for img, start in zip(fs_images, starts, strict=True):
            with img.open("rb") as src:
                offset = start * SECTOR
                for chunk in iter(lambda: src.read(1 << 20), b""):  # sparse: leave zero runs as holes
                    if chunk.count(0) != len(chunk):
                        dst.seek(offset)
                        dst.write(chunk)
                    offset += len(chunk)
    return out


# --- cache ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_key(*names: str) -> list[str]:
    """Key parts for test-bed source files (by name in tests/testbed/), so editing a builder rebuilds."""
    return [f"src:{n}:{file_digest(TESTBED_DIR / n)}" for n in names]


def package_versions(*packages: str) -> list[str]:
    """Key parts `pkg=version` for installed Debian packages (`pkg=absent` when not installed)."""
    argv = ["dpkg-query", "-W", "-f=${Package}=${Version}\n", *packages]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    found = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return [f"{p}={found.get(p, 'absent')}" for p in packages]


def key_digest(key_parts: Iterable[str | bytes]) -> str:
    h = hashlib.sha256()
    for part in key_parts:
        raw = part if isinstance(part, bytes) else part.encode()
        h.update(len(raw).to_bytes(8, "big"))
        h.update(raw)
    return h.hexdigest()


def cached(key_parts: Iterable[str | bytes], builder: Callable[[Path], None], *, name: str = "entry") -> Path:
    """The cache directory for `key_parts`, building it with `builder(tmpdir)` if missing.

    `builder` fills an empty directory; on success it is renamed to `<cache>/<name>-<sha256>`. Include in
    the key everything the result depends on (`source_key(...)`, `package_versions(...)`, host file digests).
    Building a new entry prunes entries of the same `name` that nobody used for `PRUNE_AFTER` seconds.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    final = root / f"{name}-{key_digest([name, *key_parts])[:32]}"
    if final.is_dir():
        _touch(final)
        return final
    with (root / f".{final.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():  # somebody else built it while we waited
            _touch(final)
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            builder(tmp)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    _touch(final)
    prune(name, keep=final)
    return final


PRUNE_AFTER = 6 * 3600.0
_USED = ".last-used"


def _touch(entry: Path) -> None:
    (entry / _USED).touch()


def prune(name: str, *, keep: Path | None = None, older_than: float = PRUNE_AFTER) -> list[Path]:
    """Remove cache entries `<name>-*` (except `keep`) not used for `older_than` seconds; returns them."""
    removed = []
    now = time.time()
    for entry in cache_root().glob(f"{name}-*"):
        if entry == keep or not entry.is_dir() or len(entry.name) != len(name) + 33:
            continue
        stamp = entry / _USED
        used = stamp.stat().st_mtime if stamp.exists() else entry.stat().st_mtime
        if now - used > older_than:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed

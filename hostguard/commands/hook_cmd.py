"""`hostguard hook install | uninstall`: put the libvirt hook shim where libvirtd runs it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hostguard.errors import EXIT_ALLOW, UsageError
from hostguard.host.fsutil import atomic_write
from hostguard.host.services import libvirt_version, restart_libvirtd

MARKER = b"# hostguard libvirt hook shim"
SHIM_NAME = "50-hostguard"


def shim_source() -> bytes:
    # A checkout has hooks/qemu beside the package; a wheel or the Debian package carries it as data/qemu-hook.
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "hooks" / "qemu", package / "data" / "qemu-hook"):
        if candidate.is_file():
            return candidate.read_bytes()
    raise UsageError("cannot find the hook shim (hooks/qemu or hostguard/data/qemu-hook)")


def hook_sys_path() -> list[str]:
    """Where the installed hook imports from: hostguard's own directory, then this interpreter's site-packages."""
    import site

    package_root = str(Path(__file__).resolve().parents[2])
    dirs = [package_root, *site.getsitepackages()]
    return [d for i, d in enumerate(dirs) if d not in dirs[:i] and Path(d).is_dir()]


def render_shim(config: str | None) -> bytes:
    """The hook file: hostguard's interpreter in isolated mode without `site` (-IS). Isolated, because a root
    process that libvirtd starts at every VM start must not take PYTHON* variables or a user site; without
    `site`, because processing site-packages (.pth files, editable-install finders) costs more than the whole
    warm decision (bench/bench_hook.py) and runs code hostguard never needs. The import path is fixed here."""
    body = shim_source().split(b"\n", 1)[1]
    lines = [f"#!{sys.executable} -IS".encode(), b"import sys"]
    lines.append(f"sys.path += {hook_sys_path()!r}".encode())
    if config:
        lines.append(b"import os")
        lines.append(f"os.environ['HOSTGUARD_CONFIG'] = {str(Path(config).resolve())!r}".encode())
    return b"\n".join(lines) + b"\n" + body


def _target(hooks_dir: Path) -> Path:

    if libvirt_version() >= (6, 5):
        return hooks_dir / "qemu.d" / SHIM_NAME
    legacy = hooks_dir / "qemu"
    if legacy.exists() and MARKER not in legacy.read_bytes():
        raise UsageError(f"{legacy} belongs to another tool and this libvirt predates qemu.d/: not overwriting it")
    return legacy


def install(args: argparse.Namespace) -> int:
    hooks_dir = Path(args.hooks_dir)
    target = _target(hooks_dir)
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    atomic_write(target, render_shim(args.config), mode=0o755)
    target.chmod(0o755)
    print(f"installed {target}", file=sys.stderr)
    if args.restart_libvirtd:
        restart_libvirtd()
        print("restarted libvirtd: the hook is active", file=sys.stderr)
    else:
        print(
            "libvirtd reads hooks when it starts: restart it to activate (or use --restart-libvirtd)", file=sys.stderr
        )
    return EXIT_ALLOW


def uninstall(args: argparse.Namespace) -> int:
    hooks_dir = Path(args.hooks_dir)
    removed = []
    for path in (hooks_dir / "qemu.d" / SHIM_NAME, hooks_dir / "qemu"):
        if path.exists() and MARKER in path.read_bytes():
            path.unlink()
            removed.append(path)
    if not removed:
        print("no hostguard hook installed", file=sys.stderr)
        return EXIT_ALLOW
    print(f"removed {', '.join(map(str, removed))}", file=sys.stderr)
    if args.restart_libvirtd:
        restart_libvirtd()
    return EXIT_ALLOW

"""The `hostguard` command line.

Handlers live in hostguard.commands.* and are imported only when their command runs, so `hostguard verify`
starts fast: its plain spellings do not even build the argparse parser (see
hostguard.commands.verify_cmd.parse_simple_argv), and argparse and logging are imported only when needed.
Only hostguard errors are caught here: they become exit codes and one line on stderr.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from hostguard import __version__
from hostguard.errors import EXIT_DENY, HostguardError, VerificationError

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    import argparse

Handler = Callable[["argparse.Namespace"], int]


def _lazy(module: str, func: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        handler: Handler = getattr(importlib.import_module(f"hostguard.commands.{module}"), func)
        return handler(args)

    return run


def _add_manifest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("manifest", help="create or compare image manifests")
    msub = p.add_subparsers(dest="manifest_command", metavar="SUBCOMMAND", required=True)
    c = msub.add_parser("create", help="inventory image files into a manifest")
    c.add_argument("images", nargs="+", type=str, metavar="IMAGE")
    c.add_argument("--name", required=True, help="image name (signer policy matches it)")
    c.add_argument("--version", dest="image_version", required=True, type=int, help="release number, >= 1")
    c.add_argument("--expires", default="90d", help="Nd (days from now) or an RFC 3339 UTC time (default 90d)")
    c.add_argument("--format", dest="disk_format", choices=("raw", "qcow2"), help="disk format (default: detected)")
    _add_boot_files(c, "file for direct kernel boot")
    line = c.add_mutually_exclusive_group()
    line.add_argument("--cmdline", help="sign the exact kernel command line hosts must give (with --kernel)")
    line.add_argument(
        "--cmdline-param",
        action="append",
        dest="cmdline_params",
        metavar="GLOB",
        help="sign a kernel parameter (glob) hosts may set (repeatable; with --kernel)",
    )
    c.add_argument(
        "--reader",
        choices=("auto", "fast", "guestfs", "none"),
        default="auto",
        help="how to read the guest filesystems (none: disk digests only)",
    )
    c.add_argument("--quiet", action="store_true", help="no progress output")
    c.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    c.add_argument("-o", "--output", required=True, help="manifest file to write")
    c.set_defaults(func=_lazy("manifest_cmd", "create"))
    d = msub.add_parser("diff", help="show added, removed and changed entries between two manifests")
    d.add_argument("old")
    d.add_argument("new")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_lazy("manifest_cmd", "diff"))


def _add_sign(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sign", help="sign a manifest into a DSSE envelope")
    p.add_argument("manifest")
    p.add_argument("--key", required=True, help="private key: a PEM file path or file:PATH")
    p.add_argument("--cert", required=True, help="the signer's code-signing certificate (PEM)")
    p.add_argument("--chain", help="intermediate CA certificates (PEM)")
    p.add_argument("-o", "--output", required=True, help="envelope to write (appended to if it holds this manifest)")
    p.set_defaults(func=_lazy("sign_cmd", "sign"))


def _add_verify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("verify", help="verify an envelope (exit 0 allow, 1 deny, 2 usage/config error)")
    p.add_argument("envelope")
    p.add_argument("--trust", required=True, help="trust directory (roots/, intermediates/, crls/, signers.toml)")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for each disk")
    _add_boot_files(p, "file for direct kernel boot (must match the manifest)")
    p.add_argument("--state", help="state directory: rollback protection and digest/verdict caches")
    p.add_argument("--at", help="verify as of this RFC 3339 UTC time instead of now")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(func=_lazy("verify_cmd", "verify"))


def _add_hook(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("hook", help="install or remove the libvirt hook")
    hsub = p.add_subparsers(dest="hook_command", metavar="SUBCOMMAND", required=True)
    for name, func, text in (
        ("install", "install", "install the hook as qemu.d/50-hostguard"),
        ("uninstall", "uninstall", "remove hostguard's hook"),
    ):
        h = hsub.add_parser(name, help=text)
        h.add_argument("--hooks-dir", default="/etc/libvirt/hooks")
        h.add_argument("--restart-libvirtd", action="store_true", help="restart libvirtd so it picks up the change")
        if name == "install":
            h.add_argument(
                "--config",
                help="pin this hostguard.toml in the installed hook (default: HOSTGUARD_CONFIG "
                "at run time, else /etc/hostguard/hostguard.toml)",
            )
        h.set_defaults(func=_lazy("hook_cmd", func))


def _add_guard(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("daemon", help="run hostguardd: check running domains after they start")
    d.add_argument("--config", help="hostguard.toml (default: $HOSTGUARD_CONFIG or /etc/hostguard/hostguard.toml)")
    d.add_argument("--once", action="store_true", help="check every running domain once, then exit")
    d.set_defaults(func=_lazy("guard_cmd", "daemon"))
    s = sub.add_parser("status", help="every domain with its last pre-boot decision and post-start verdict")
    s.add_argument("domain", nargs="?")
    s.add_argument("--config")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_lazy("guard_cmd", "status"))
    st = sub.add_parser("start", help="start a domain paused, check it, and resume it only on a pass")
    st.add_argument("domain")
    st.add_argument("--config")
    st.set_defaults(func=_lazy("guard_cmd", "start"))
    r = sub.add_parser("release", help="let a domain hostguard holds paused run until its next check (audited)")
    r.add_argument("domain")
    r.add_argument("--reason", required=True, help="why it may run: one line, kept in the audit log")
    r.add_argument("--config")
    r.set_defaults(func=_lazy("guard_cmd", "release"))


def _add_boot_files(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--kernel", help=f"kernel {what}")
    parser.add_argument("--initrd", help=f"initrd {what}")


def _add_library(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("library", help="the host's library of signed images (a libvirt dir pool)")
    lsub = p.add_subparsers(dest="library_command", metavar="SUBCOMMAND", required=True)
    a = lsub.add_parser("add", help="verify an image source and copy it into the library")
    a.add_argument("image")
    a.add_argument("envelope")
    a.add_argument("--name", help="library name (default: IMAGE-vVERSION from the manifest)")
    _add_boot_files(a, "for direct kernel boot (must match the manifest)")
    a.set_defaults(func=_lazy("library_cmd", "add"))
    ls = lsub.add_parser("list", help="list library images")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_lazy("library_cmd", "list_"))
    pu = lsub.add_parser("push", help="publish a signed image to an OCI registry (producer)")
    pu.add_argument("image")
    pu.add_argument("envelope")
    pu.add_argument("target", help="oci://REGISTRY/REPOSITORY:TAG")
    _add_boot_files(pu, "for direct kernel boot (as signed in the manifest)")
    pu.set_defaults(func=_lazy("library_cmd", "push"))
    pl = lsub.add_parser("pull", help="fetch, verify and add a signed image from an OCI registry")
    pl.add_argument("source", help="oci://REGISTRY/REPOSITORY:TAG or oci://REGISTRY/REPOSITORY@sha256:DIGEST")
    pl.add_argument("--name", help="library name (default: IMAGE-vVERSION from the manifest)")
    pl.set_defaults(func=_lazy("library_cmd", "pull"))
    sy = lsub.add_parser("sync", help="pull the newest signed version of every image in a repository")
    sy.add_argument("--from", dest="source", required=True, help="oci://REGISTRY/REPOSITORY")
    sy.set_defaults(func=_lazy("library_cmd", "sync"))
    sh = lsub.add_parser("show", help="one library image in detail")
    sh.add_argument("name")
    sh.set_defaults(func=_lazy("library_cmd", "show"))
    v = lsub.add_parser("verify", help="re-verify library images (expired, revoked, tampered)")
    v.add_argument("name", nargs="?")
    v.set_defaults(func=_lazy("library_cmd", "verify"))
    r = lsub.add_parser("remove", help="remove a library image")
    r.add_argument("name")
    r.add_argument("--force", action="store_true", help="even if defined domains use it")
    r.set_defaults(func=_lazy("library_cmd", "remove"))
    for parser in (pu, pl, sy):
        parser.add_argument("--insecure", action="store_true", help="plain HTTP (a loopback registry only)")
        parser.add_argument("--json", action="store_true")
    for parser in (a, ls, sh, v, r, pl, sy):
        parser.add_argument("--config", help="hostguard.toml")
    d = sub.add_parser("domain", help="define domains on library images")
    dsub = d.add_subparsers(dest="domain_command", metavar="SUBCOMMAND", required=True)
    c = dsub.add_parser("create", help="define a domain on a fresh overlay of a library image")
    c.add_argument("name")
    c.add_argument("--image", required=True, help="library image name")
    c.add_argument("--memory", type=int, default=512, help="MiB (default 512)")
    c.add_argument("--vcpus", type=int, default=1)
    c.add_argument("--kernel-boot", action="store_true", help="boot the library image's kernel and initrd")
    c.add_argument("--cmdline", help="kernel command line with --kernel-boot")
    c.add_argument("--network", help="libvirt network to attach (default: none)")
    c.add_argument("--images-dir", default="/var/lib/libvirt/images", help="where the overlay goes")
    c.add_argument("--config", help="hostguard.toml")
    c.set_defaults(func=_lazy("library_cmd", "domain_create"))
    cc = dsub.add_parser("check-config", help="is the domain ready for hostguard (vmcoreinfo, ...)?")
    cc.add_argument("name")
    cc.add_argument("--fix", action="store_true", help="add what is missing to the persistent definition")
    cc.set_defaults(func=_lazy("memory_cmd", "check_config"))


def _add_memory(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("memory", help="inspect a running guest's memory from the host")
    msub = p.add_subparsers(dest="memory_command", metavar="SUBCOMMAND", required=True)
    i = msub.add_parser("inspect", help="list processes and modules from a memory dump; compare with the manifest")
    i.add_argument("--suspend", action="store_true", help="suspend the guest during the dump (consistent)")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_lazy("memory_cmd", "inspect"))
    b = msub.add_parser("baseline", help="record the kernel's vDSO pages from a trusted reference boot")
    b.set_defaults(func=_lazy("memory_cmd", "baseline"))
    for parser in (i, b):
        parser.add_argument("domain")
        parser.add_argument("--kernel", help="the manifest-listed kernel file (default: the domain's <kernel>)")
        parser.add_argument("--initrd", help="the manifest-listed initrd (default: the domain's <initrd>)")
        parser.add_argument("--config", help="hostguard.toml")


def _add_doctor(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("doctor", help="is this host protected? one line per check (exit 0 ok, 1 a failure, 2 config)")
    p.add_argument("--config", help="hostguard.toml (default: the one the installed hook uses)")
    p.add_argument("--hooks-dir", default="/etc/libvirt/hooks")
    p.add_argument("--json", action="store_true", help="print the checks as JSON on stdout")
    p.set_defaults(func=_lazy("doctor_cmd", "doctor"))


def build_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(prog="hostguard", description="Signed VM images for libvirt/QEMU hosts.")
    parser.add_argument("--version", action="version", version=f"hostguard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_manifest(sub)
    _add_sign(sub)
    _add_verify(sub)
    _add_hook(sub)
    _add_guard(sub)
    _add_library(sub)
    _add_memory(sub)
    _add_doctor(sub)
    # lazy: a command's module loads only when it runs (`hostguard verify` starts fast)
    from hostguard.commands.owner_cmd import add_subcommands as add_owner_commands

    add_owner_commands(sub, _lazy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["verify"]:
        # lazy: a command's module loads only when it runs (`hostguard verify` starts fast)
        from hostguard.commands.verify_cmd import parse_simple_argv, run

        opts = parse_simple_argv(words[1:])
        if opts is not None:
            return _run(lambda: run(opts))
    import logging

    parser = build_parser()
    args = parser.parse_args(words)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="hostguard: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return _run(lambda: int(args.func(args)))


def _run(command: Callable[[], int]) -> int:
    """Run a command; hostguard errors become an exit code and one line on stderr."""
    try:
        return command()
    except VerificationError as exc:
        print(f"denied: {exc}", file=sys.stderr)
        return EXIT_DENY
    except HostguardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

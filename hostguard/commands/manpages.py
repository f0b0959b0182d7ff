"""Man pages and bash completion generated from the argparse definitions (hostguard.cli.build_parser) and the
configuration schema (hostguard.host.config), so they cannot drift from the program.

`make man` rewrites hostguard/data/man/ and hostguard/data/hostguard.bash-completion; a unit test checks that
the committed files equal what this module generates.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hostguard import __version__
from hostguard.host.config import _SCHEMA, Config

SEE_ALSO_ALL = "hostguard.toml(5), virsh(1), logrotate(8), systemd.service(5)"

# What each hostguard.toml key means. The unit test fails when host/config.py's schema gains a key that is
# not described here (or loses one that is), so the page follows the schema.
CONFIG_KEYS: dict[str, dict[str, tuple[str | None, str]]] = {
    "trust": {"dir": ("trust_dir", "Trust directory: roots/, intermediates/, crls/ and signers.toml. Required.")},
    "state": {
        "dir": (
            "state_dir",
            "State directory: rollback high-water marks, caches, domain records, verdicts (root only).",
        )
    },
    "policy": {
        "mode": ("mode", "enforce: unverified starts are denied. audit: they are allowed and logged as would-deny."),
        "exempt": ("exempt", "Domain-name globs that are never verified; every such start is logged as exempt."),
        "deadline_seconds": (
            "deadline_seconds",
            "The hook denies a start whose verification takes longer (0 < s <= 600).",
        ),
        "allow_cdrom": ("allow_cdrom", "Allow CD-ROM devices."),
        "allow_network_disks": ("allow_network_disks", "Allow network disks (iSCSI, NBD, RBD, ...)."),
        "allow_block_devices": ("allow_block_devices", "Host block devices a domain may use (paths)."),
        "allow_filesystems": ("allow_filesystems", "Allow <filesystem> shares from the host."),
        "allow_hostdev": ("allow_hostdev", "Allow host device pass-through."),
        "allow_acpi_tables": ("allow_acpi_tables", "Allow ACPI tables from host files."),
        "allow_fwcfg": ("allow_fwcfg", "Allow fw_cfg entries from host files."),
        "firmware_dirs": ("firmware_dirs", "Directories guest firmware may come from (absolute paths)."),
        "emulators": ("emulators", "QEMU binaries a domain's <emulator> may name (path globs)."),
        "nvram_dirs": ("nvram_dirs", "Directories a per-domain UEFI variable store (<nvram>) may live in."),
        "allow_cmdline_params": (
            "allow_cmdline_params",
            "Kernel command-line parameters a host may add to a signed kernel (name or name=value globs).",
        ),
        "allow_image_combinations": (
            "allow_image_combinations",
            "Signed image names whose boot files and disks may be mixed in one domain.",
        ),
        "envelope_index_dirs": (
            "envelope_index_dirs",
            "Directories searched for SHA256.hgsig, named by the digest of a disk with no envelope beside it.",
        ),
        "profile": (
            "profile",
            "none; nova: allow Nova's config drive, ephemeral and swap bases unsigned, checked by their bytes; "
            "kubevirt: allow virt-launcher's cloud-init NoCloud seed (ISO 9660 or vfat labelled cidata).",
        ),
        "allow_shmem": ("allow_shmem", "Allow <shmem> (host memory mapped into the guest)."),
        "allow_restore": ("allow_restore", "Allow restoring a saved domain (its RAM was never checked)."),
        "allow_incoming_migration": (
            "allow_incoming_migration",
            "Allow incoming migrations (their RAM was never checked here).",
        ),
        "on_start": (
            "on_start",
            "check, or quarantine: suspend every started domain until its post-start check passes.",
        ),
        "action": ("action", "What a post-start finding does: pause, destroy or log."),
        "on_host_error": (
            "on_host_error",
            "What a post-start check that failed on the host's side (trust store, state directory) does to the "
            "guest: log (default), pause or destroy.",
        ),
        "check_interval_seconds": ("check_interval_seconds", "hostguardd checks every running domain this often."),
        "memory_check": ("memory_check", "Compare the guest kernel and processes in memory with the manifest."),
    },
    "audit": {
        "log": ("audit_log", "The audit log: one JSON object per line (rotated by logrotate, never copytruncate)."),
        "syslog": ("syslog", "Also send each record to journald (structured HOSTGUARD_* fields) or syslog."),
    },
    "daemon": {
        "socket": ("daemon_socket", "hostguardd's root-only socket, where the hook notifies it of starts."),
        "workers": ("daemon_workers", "Check threads (1..16)."),
        "metrics_textfile": ("metrics_textfile", "Write Prometheus metrics to this file (node-exporter textfile)."),
        "metrics_port": ("metrics_port", "Serve Prometheus metrics on 127.0.0.1:PORT."),
        "image_dirs": (
            "image_dirs",
            "Directories whose images hostguardd hashes ahead of a start and keeps under a read lease, so a start "
            "after touch needs no hashing (default: the library, envelope_index_dirs and, under the nova profile, "
            "/var/lib/nova/instances/_base; [] turns it off).",
        ),
        "check_deadline_seconds": (
            "check_deadline_seconds",
            "A check still running after this long (a read blocked on hung storage) is given up: an error verdict, "
            "a guest it held is resumed, its worker replaced.",
        ),
    },
    "findings": {
        "action": (None, "Per finding kind: pause, destroy or log (overrides [policy] action)."),
        "allow": (None, "Per finding kind: path globs that may change without a finding."),
    },
    "library": {
        "dir": ("library_dir", "The image library's directory (also a libvirt dir pool)."),
        "pool": ("library_pool", "The library's libvirt storage pool name."),
    },
}


def _esc(text: str) -> str:
    """roff-safe text: backslashes, and a leading dot or quote that roff would take as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _helps(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, str]:
    return {a.dest: a.help or "" for a in sub._choices_actions}


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction) and a.help != argparse.SUPPRESS]


def _takes_value(action: argparse.Action) -> bool:
    return action.option_strings != [] and action.nargs != 0


def _synopsis(prog: str, parser: argparse.ArgumentParser) -> str:
    parts = [f"\\fB{_esc(prog)}\\fR"]
    for a in _options(parser):
        if a.option_strings:
            if a.option_strings[0] in ("-h", "--help"):
                continue
            word = f"\\fB{_esc(a.option_strings[-1])}\\fR" + (
                f" \\fI{_esc(_metavar(a))}\\fR" if _takes_value(a) else ""
            )
            parts.append(word if a.required else f"[{word}]")
        else:
            word = f"\\fI{_esc(_metavar(a))}\\fR"
            parts.append({"+": f"{word}...", "*": f"[{word}...]", "?": f"[{word}]"}.get(str(a.nargs), word))
    if _subparsers(parser) is not None:
        parts.append("\\fISUBCOMMAND\\fR ...")
    return " ".join(parts)


def _option_items(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for a in _options(parser):
        if a.option_strings:
            names = ", ".join(f"\\fB{_esc(o)}\\fR" for o in a.option_strings)
            head = names + (f" \\fI{_esc(_metavar(a))}\\fR" if _takes_value(a) else "")
        else:
            head = f"\\fI{_esc(_metavar(a))}\\fR"
        help_text = a.help or ""
        if "%(default)" in help_text or "%(prog)" in help_text:
            help_text = help_text % {"default": a.default, "prog": parser.prog}
        out += [".TP", head, _esc(help_text) if help_text else ""]
    return out


def _header(name: str, section: int, summary: str) -> list[str]:
    title = name.upper()
    return [
        f'.TH "{_esc(title)}" "{section}" "" "hostguard {__version__}" "hostguard manual"',
        '.\\" Generated by hostguard/commands/manpages.py from the program itself: edit that, then run make man.',
        ".SH NAME",
        f"{_esc(name)} \\- {_esc(summary)}",
    ]


def _command_page(path: list[str], parser: argparse.ArgumentParser, summary: str) -> str:
    name = "-".join(["hostguard", *path])
    prog = " ".join(["hostguard", *path])
    lines = [*_header(name, 1, summary), ".SH SYNOPSIS", _synopsis(prog, parser)]
    lines += [".SH DESCRIPTION", _esc(parser.description or summary[:1].upper() + summary[1:] + ".")]
    items = _option_items(parser)
    if items:
        lines += [".SH OPTIONS", *items]
    sub = _subparsers(parser)
    if sub is not None:
        helps = _helps(sub)
        lines.append(".SH SUBCOMMANDS")
        for child, child_parser in sub.choices.items():
            lines += [
                f".SS {_esc(prog)} {_esc(child)}",
                _esc(helps.get(child, "")),
                ".PP",
                _synopsis(f"{prog} {child}", child_parser),
            ]
            child_items = _option_items(child_parser)
            if child_items:
                lines += [".RS", *child_items, ".RE"]
    lines += [".SH SEE ALSO", f"hostguard(1), {SEE_ALSO_ALL}"]
    return "\n".join(lines) + "\n"


def _main_page(parser: argparse.ArgumentParser) -> str:
    sub = _subparsers(parser)
    assert sub is not None
    helps = _helps(sub)
    lines = [
        *_header("hostguard", 1, "signed VM images for libvirt/QEMU hosts"),
        ".SH SYNOPSIS",
        _synopsis("hostguard", parser),
    ]
    lines += [
        ".SH DESCRIPTION",
        _esc(parser.description or ""),
        "Image producers sign manifests of VM images; before libvirt boots a domain, hostguard's hook "
        "(/etc/libvirt/hooks/qemu.d/50\\-hostguard) verifies the signature, certificate chain, revocation, "
        "signer policy, expiry, rollback and the disks and boot files; hostguardd checks running domains.",
        ".SH OPTIONS",
        *_option_items(parser),
        ".SH COMMANDS",
    ]
    for child in sub.choices:
        lines += [".TP", f"\\fBhostguard\\-{_esc(child)}\\fR(1)", _esc(helps.get(child, ""))]
    lines += [
        ".SH EXIT STATUS",
        ".TP",
        "0",
        "allowed, or the command succeeded",
        ".TP",
        "1",
        "denied: a check failed (one line on standard error says which and why)",
        ".TP",
        "2",
        "usage or configuration error",
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBHOSTGUARD_CONFIG\\fR",
        "the configuration file (default /etc/hostguard/hostguard.toml)",
        ".SH FILES",
        ".TP",
        "/etc/hostguard/hostguard.toml",
        "the configuration, see hostguard.toml(5)",
        ".TP",
        "/etc/libvirt/hooks/qemu.d/50\\-hostguard",
        "the libvirt hook, installed by hostguard hook install",
        ".TP",
        "/var/log/hostguard/audit.jsonl",
        "the audit log, one JSON object per line",
        ".TP",
        "/var/lib/hostguard",
        "state: rollback protection, caches, verdicts, the image library",
        ".SH SEE ALSO",
        ", ".join(f"hostguard\\-{_esc(c)}(1)" for c in sub.choices) + ", " + SEE_ALSO_ALL,
    ]
    return "\n".join(lines) + "\n"


def _config_defaults() -> dict[str, object]:

    config = Config({"trust": {"dir": "/etc/hostguard/trust"}}, Path("hostguard.toml"))
    return {attr: getattr(config, attr) for keys in CONFIG_KEYS.values() for attr, _ in keys.values() if attr}


def _show_default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    if isinstance(value, (str, Path)):
        return f'"{value}"'
    return str(value)


def config_page() -> str:

    defaults = _config_defaults()
    lines = [
        *_header("hostguard.toml", 5, "hostguard's host configuration"),
        ".SH SYNOPSIS",
        "/etc/hostguard/hostguard.toml, or the file named by \\fBHOSTGUARD_CONFIG\\fR",
        ".SH DESCRIPTION",
        "A TOML file. Unknown sections and keys are errors, so a typo cannot silently weaken policy. A missing or "
        "broken configuration denies every start in scope: it never means \\(lqskip checks\\(rq. "
        "Check it with \\fBhostguard doctor\\fR.",
    ]
    for section, keys in _SCHEMA.items():
        lines.append(f".SH [{_esc(section)}]")
        for key, kind in keys.items():
            attr, text = CONFIG_KEYS[section][key]
            types = kind if isinstance(kind, tuple) else (kind,)
            type_name = " or ".join(
                {"str": "string", "list": "array", "dict": "table"}.get(t.__name__, t.__name__) for t in types
            )
            default = f" Default: {_esc(_show_default(defaults[attr]))}." if attr and section != "trust" else ""
            lines += [".TP", f"\\fB{_esc(key)}\\fR (\\fI{type_name}\\fR)", _esc(text) + default]
    lines += [
        ".SH EXAMPLE",
        ".EX",
        '[trust]\ndir = "/etc/hostguard/trust"\n\n[policy]\nmode = "audit"\nexempt = ["lab\\-*"]',
        ".EE",
        ".SH SEE ALSO",
        "hostguard(1), hostguard\\-doctor(1), hostguard\\-daemon(1)",
    ]
    return "\n".join(lines) + "\n"


def man_pages(parser: argparse.ArgumentParser) -> dict[str, str]:
    """File name (man1/..., man5/...) -> page text."""
    sub = _subparsers(parser)
    assert sub is not None
    helps = _helps(sub)
    pages = {"man1/hostguard.1": _main_page(parser), "man5/hostguard.toml.5": config_page()}
    for name, child in sub.choices.items():
        pages[f"man1/hostguard-{name}.1"] = _command_page([name], child, helps.get(name, name))
    return pages


# --- bash completion -----------------------------------------------------------------------------------------


def _command_tree(parser: argparse.ArgumentParser, path: str = "") -> dict[str, argparse.ArgumentParser]:
    tree = {path: parser}
    sub = _subparsers(parser)
    if sub is not None:
        for name, child in sub.choices.items():
            tree.update(_command_tree(child, f"{path}/{name}"))
    return tree


def bash_completion(parser: argparse.ArgumentParser) -> str:
    tree = _command_tree(parser)
    words_cases, value_cases = [], []
    for path, p in tree.items():
        sub = _subparsers(p)
        words = [*(sub.choices if sub is not None else []), *(o for a in _options(p) for o in a.option_strings)]
        words_cases.append(f'        "{path}") words="{" ".join(words)}" ;;')
        for a in _options(p):
            if _takes_value(a):
                choices = " ".join(map(str, a.choices)) if a.choices is not None else ""
                for o in a.option_strings:
                    value_cases.append(f'        "{path} {o}") values="{choices}" ;;')
    commands = "|".join(f'"{p}"' for p in tree if p)
    return f"""# bash completion for hostguard, generated from its argparse definitions (hostguard/commands/manpages.py)
_hostguard() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" path="" words="" values="-" w i
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        case "$path/$w" in
            {commands}) path="$path/$w" ;;
        esac
    done
    case "$path $prev" in
{chr(10).join(value_cases)}
    esac
    if [[ "$values" != "-" ]]; then
        if [[ -n "$values" ]]; then
            mapfile -t COMPREPLY < <(compgen -W "$values" -- "$cur")
        else
            mapfile -t COMPREPLY < <(compgen -f -- "$cur")
        fi
        return 0
    fi
    case "$path" in
{chr(10).join(words_cases)}
    esac
    mapfile -t COMPREPLY < <(compgen -W "$words" -- "$cur")
    if [[ "$cur" != -* ]]; then
        mapfile -t -O "${{#COMPREPLY[@]}}" COMPREPLY < <(compgen -f -- "$cur")
    fi
    return 0
}}
complete -o filenames -F _hostguard hostguard
"""


def generated_files(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Path under hostguard/data/ -> content, for everything generated."""
    files = {f"man/{name}": text for name, text in man_pages(parser).items()}
    files["hostguard.bash-completion"] = bash_completion(parser)
    return files


def write_all(parser: argparse.ArgumentParser, data_dir: Path) -> list[Path]:
    man = data_dir / "man"
    for old in (*man.glob("man1/*.1"), *man.glob("man5/*.5")):
        old.unlink()  # a removed subcommand's page goes too
    written = []
    for name, text in generated_files(parser).items():
        path = data_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written

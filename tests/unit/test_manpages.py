"""Man pages and bash completion are generated from the program: the committed files must equal what the
generator makes now (run `make man` after changing a command or the configuration schema)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hostguard.cli import build_parser
from hostguard.commands.manpages import CONFIG_KEYS, generated_files
from hostguard.host.config import _SCHEMA
from tests.testbed.prereq import require_tool

DATA = Path(__file__).resolve().parents[2] / "hostguard" / "data"
GENERATED = generated_files(build_parser())


def test_committed_man_pages_and_completion_match_the_program() -> None:
    stale = [
        name for name, text in GENERATED.items() if not (DATA / name).is_file() or (DATA / name).read_text() != text
    ]
    assert not stale, f"out of date (run `make man`): {stale}"
    committed = {str(p.relative_to(DATA)) for p in (DATA / "man").rglob("*") if p.is_file()}
    assert committed == {n for n in GENERATED if n.startswith("man/")}, "a page without a command: run `make man`"


def test_every_command_has_a_page_and_every_config_key_a_description() -> None:
    assert {"man/man1/hostguard.1", "man/man1/hostguard-doctor.1", "man/man5/hostguard.toml.5"} <= set(GENERATED)
    assert {s: set(keys) for s, keys in CONFIG_KEYS.items()} == {s: set(keys) for s, keys in _SCHEMA.items()}


def test_config_page_shows_the_real_defaults() -> None:
    page = GENERATED["man/man5/hostguard.toml.5"]
    assert 'Default: "/var/log/hostguard/audit.jsonl"' in page.replace("\\-", "-")
    assert "Default: 600.0." in page and "\\fBmode\\fR (\\fIstring\\fR)" in page


@pytest.mark.parametrize("name", sorted(n for n in GENERATED if n.startswith("man/")))
def test_pages_render_without_groff_warnings(name: str) -> None:
    groff = require_tool("groff")
    done = subprocess.run([groff, "-man", "-ww", "-z"], input=GENERATED[name], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def complete(cwd: Path, *words: str) -> list[str]:
    """Run the generated completion function in bash as readline would, in `cwd` (files complete too)."""
    quoted = " ".join(f"'{w}'" for w in words)
    probe = (
        f"{GENERATED['hostguard.bash-completion']}\n"
        f"COMP_WORDS=(hostguard {quoted}); COMP_CWORD={len(words)}; _hostguard; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return sorted(done.stdout.split())


def test_bash_completion_follows_the_subcommands(tmp_path: Path) -> None:
    assert {"manifest", "verify", "doctor", "owner", "--version"} <= set(complete(tmp_path, ""))
    assert complete(tmp_path, "do") == ["doctor", "domain"]
    assert complete(tmp_path, "manifest", "c") == ["create"]
    assert complete(tmp_path, "manifest", "create", "--format", "") == ["qcow2", "raw"]
    assert complete(tmp_path, "doctor", "--") == ["--config", "--help", "--hooks-dir", "--json"]


def test_bash_completion_offers_files_for_paths(tmp_path: Path) -> None:
    (tmp_path / "web.qcow2.hgsig").write_text("")
    assert complete(tmp_path, "verify", "web") == ["web.qcow2.hgsig"]
    assert complete(tmp_path, "verify", "x.hgsig", "--trust", "w") == ["web.qcow2.hgsig"]

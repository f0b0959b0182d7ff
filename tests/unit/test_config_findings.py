"""`[findings]` in hostguard.toml is validated when the daemon or `hostguard start` loads it, not at each check."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostguard.cli import main
from hostguard.errors import ConfigError
from hostguard.host.config import load_config


def write_config(tmp_path: Path, findings: str) -> Path:
    path = tmp_path / "hostguard.toml"
    path.write_text(f'[trust]\ndir = "{tmp_path}/trust"\n[state]\ndir = "{tmp_path}/state"\n{findings}')
    return path


def test_a_typo_in_a_finding_kind_stops_the_daemon_at_start_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, '[findings.action]\nunexpected-executabel = "destroy"\n')
    with pytest.raises(ConfigError, match="unknown finding kind 'unexpected-executabel'") as info:
        load_config(config).finding_policy()
    assert str(config) in str(info.value)
    assert main(["daemon", "--config", str(config), "--once"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unexpected-executabel" in err[0]


def test_a_valid_findings_table_builds_its_policy_once(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, '[findings.action]\nunexpected-executable = "destroy"\n'))
    policy = config.finding_policy()
    assert policy.actions["unexpected-executable"] == "destroy"
    assert config.finding_policy() is policy


def _emitted_kinds() -> dict[str, str]:
    """Every finding kind the code can emit, read from the code itself: the first argument (or `kind=`) of each
    `Finding(...)` in hostguard/, a constant of hostguard.signed.findings or a string. kind -> where."""
    import ast

    from hostguard.signed import findings

    root = Path(findings.__file__).resolve().parents[1]
    emitted: dict[str, str] = {}
    for source in sorted(root.rglob("*.py")):
        tree = ast.parse(source.read_text(), str(source))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Finding"):
                continue
            arg = next((k.value for k in node.keywords if k.arg == "kind"), node.args[0] if node.args else None)
            where = f"{source.relative_to(root.parent)}:{node.lineno}"
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                emitted[arg.value] = where
            elif isinstance(arg, ast.Name) and isinstance(getattr(findings, arg.id, None), str):
                emitted[getattr(findings, arg.id)] = where
            else:  # a kind only known at run time could be one the configuration rejects: name it
                raise AssertionError(f"{where}: Finding's kind is not a constant of hostguard.signed.findings")
    return emitted


def test_every_finding_kind_the_code_emits_is_accepted_by_the_configuration(tmp_path: Path) -> None:
    """A kind missing from FINDING_KINDS could be neither allowed nor given its own action (`unknown-kernel` was)."""
    emitted = _emitted_kinds()
    # the kinds issue 14 added and the memory check's kernel mismatch, so this test cannot read nothing and pass
    assert {"unverified-media", "unverified-block-node", "unknown-kernel", "unsigned-hotplug-disk"} <= set(emitted)
    actions = "".join(f'{kind} = "destroy"\n' for kind in sorted(emitted))
    allow = "".join(f'{kind} = ["/x/*"]\n' for kind in sorted(emitted))
    config = load_config(write_config(tmp_path, f"[findings.action]\n{actions}[findings.allow]\n{allow}"))
    policy = config.finding_policy()
    for kind, where in emitted.items():
        assert policy.actions[kind] == "destroy", where
        assert policy.allow[kind] == ("/x/*",), where


def test_a_kind_on_no_table_still_takes_the_default_action(tmp_path: Path) -> None:
    """Without its own `[findings.action]` line a kind takes `[policy] action`, not a built-in "pause"."""
    from hostguard.signed.findings import FINDING_KINDS, Finding

    path = write_config(tmp_path, "")
    path.write_text(path.read_text() + '[policy]\naction = "destroy"\n')
    policy = load_config(path).finding_policy()
    for kind in _emitted_kinds():
        assert kind in FINDING_KINDS
        assert policy.action_for([Finding(kind, "/p")]) == ("log" if kind == "check-unavailable" else "destroy")

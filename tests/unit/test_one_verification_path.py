"""Issue 13: one implementation of every check. The attack tests (tests/unit/verify_path.py) call the very
function that the hook's decision and `hostguard verify` call, and all three reach the same checks. Fails if
either entry point gains a verification path of its own."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import CodeType, FrameType

from hostguard.cli import main
from hostguard.commands import verify_cmd
from hostguard.host import verify_files as verify_files_mod
from hostguard.preboot import decide as decide_mod
from hostguard.signed import facts, verify
from hostguard.signed.trust import TrustStore
from tests.testbed.pki import TestPKI
from tests.testbed.signed import make_manifest, sign
from tests.unit import verify_path
from tests.unit.test_preboot import Host

# The checks every verification must run, cached verdict or not, in the one place each lives.
CHECKS = (verify_files_mod.verify_files, facts.check_rollback, facts.check_disks)


@contextmanager
def calls() -> Iterator[set[CodeType]]:
    seen: set[CodeType] = set()

    def profile(frame: FrameType, event: str, _arg: object) -> None:
        if event == "call":
            seen.add(frame.f_code)

    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(None)


def codes(*functions: Callable[..., object]) -> set[CodeType]:
    return {f.__code__ for f in functions}


def test_the_attack_tests_the_hook_and_the_cli_bind_the_same_function() -> None:
    assert getattr(verify_path, "verify_files") is verify_files_mod.verify_files  # noqa: B009
    assert getattr(decide_mod, "verify_files") is verify_files_mod.verify_files  # noqa: B009
    # verify_cmd imports it when it runs (start-up time): the name it imports must be this module's.
    assert (
        "from hostguard.host.verify_files import read_envelope, verify_files" in Path(verify_cmd.__file__).read_text()
    )


def test_the_hook_and_the_cli_run_the_checks_the_attack_tests_run(tmp_path: Path, pki: TestPKI) -> None:
    host = Host(tmp_path / "hook", pki)
    with calls() as attack:
        verify_path.verify(sign(make_manifest(), [(pki.leaf, [pki.intermediate])]), TrustStore(roots=(pki.root.cert,)))
    with calls() as hook:
        host.decide(host.xml(host.base))
    envelope = f"{host.base}.hgsig"
    argv = ["verify", envelope, "--trust", str(host.trust), "--image", str(host.base), "--state", str(tmp_path / "s")]
    with calls() as cli:
        assert main(argv) == 0
    full = codes(verify_files_mod.verify_files, verify.verify_envelope, facts.check_disks)
    assert full <= hook and full <= cli
    assert codes(verify_files_mod.verify_files, verify.verify_envelope) <= attack
    # Cached: the per-host checks still run, through the same function.
    with calls() as cli_cached:
        assert main(argv) == 0
    assert codes(*CHECKS) <= cli_cached and verify.verify_envelope.__code__ not in cli_cached
    with calls() as hook_cached:
        host.decide(host.xml(host.base))
    assert codes(*CHECKS) <= hook_cached

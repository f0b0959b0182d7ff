"""Property (issue 22): for random sequences of trust-store changes, clock moves and envelopes, the answer of
`verify_files` with a warm verdict and digest cache always equals a full verification's (empty caches, the same
rollback state): allow with the same image, signers and checks, or the same denial.

The pool covers what the cache window must respect: a key certified twice (the renewal not authorised), a
signer not yet valid, a revoked signer, CRLs that go stale or are not yet current, manifests that expire or
were created in the future, thresholds, and `now` drawn on and around every one of those instants.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostguard.errors import HostguardError
from hostguard.host.state import StateStore
from hostguard.host.verify_files import verify_files
from tests.testbed.pki import DAY, NOW, TestPKI, issue, make_crl
from tests.testbed.signed import disk_of, make_manifest, sign
from tests.unit.verify_path import digested

PKI = TestPKI()
CA = PKI.intermediate
A = issue("acme-build", issuer=CA, not_after=NOW + 20 * DAY)
A_RENEWED = issue("acme-renewed", issuer=CA, key=A.key, not_after=NOW + 50 * DAY)  # same key, not authorised
B = issue("second-build", issuer=CA, not_before=NOW + 2 * DAY, not_after=NOW + 100 * DAY)
C = issue("third-build", issuer=CA)
CRLS: dict[str, x509.CertificateRevocationList | None] = {
    "none": None,
    "fresh": make_crl(CA, last_update=NOW - DAY, next_update=NOW + 7 * DAY),
    "short": make_crl(CA, last_update=NOW - DAY, next_update=NOW + 2 * DAY),
    "revokes C": make_crl(CA, [C.cert], last_update=NOW - DAY, next_update=NOW + 30 * DAY),
    "future": make_crl(CA, last_update=NOW + 3 * DAY, next_update=NOW + 30 * DAY),
}
POLICIES = {
    "default": None,
    "acme only": '[[signer]]\ncn = "acme-build"\nimages = "*"\n',
    "two signers": '[[threshold]]\nimages = "*"\nsigners = 2\n',
    "acme or second, two": (
        '[[signer]]\ncn = ["acme-build", "second-build"]\nimages = "*"\n[[threshold]]\nimages = "*"\nsigners = 2\n'
    ),
}
DISK = b"signed disk"
MANIFESTS = {
    "expires 15d": make_manifest(disks=[disk_of(DISK)], expires=NOW + 15 * DAY),
    "expires 45d v2": make_manifest(disks=[disk_of(DISK)], version=2, expires=NOW + 45 * DAY),
    "created +1d": make_manifest(disks=[disk_of(DISK)], created=NOW + DAY, expires=NOW + 30 * DAY),
}
SIGNER_SETS = {
    "A": [A],
    "A + renewal": [A, A_RENEWED],
    "renewal + A": [A_RENEWED, A],
    "A + B": [A, B],
    "B + C": [B, C],
    "A + C": [A, C],
}
ENVELOPES = {
    (m, s): sign(manifest, [(who, [CA]) for who in signers])
    for m, manifest in MANIFESTS.items()
    for s, signers in SIGNER_SETS.items()
}
# Every instant at which something above changes, and a moment either side of it.
INSTANTS = sorted(
    {
        t + d
        for t in [
            *(c.cert.not_valid_before_utc for c in (A, A_RENEWED, B, C)),
            *(c.cert.not_valid_after_utc for c in (A, A_RENEWED, B, C)),
            *(crl.next_update_utc for crl in CRLS.values() if crl is not None and crl.next_update_utc),
            *(crl.last_update_utc for crl in CRLS.values() if crl is not None),
            *(m.expires for m in MANIFESTS.values()),
            *(m.created - dt.timedelta(minutes=5) for m in MANIFESTS.values()),
        ]
        for d in (-dt.timedelta(seconds=1), -dt.timedelta(microseconds=1), dt.timedelta(0), dt.timedelta(seconds=1))
    }
)


@dataclass(frozen=True)
class Step:
    crl: str
    policy: str
    envelope: tuple[str, str]
    now: dt.datetime
    as_float: bool


instants = st.one_of(
    st.sampled_from(INSTANTS),
    st.integers(-2 * 86400, 60 * 86400).map(lambda s: NOW + dt.timedelta(seconds=s)),
)


@st.composite
def sequences(draw: st.DrawFn) -> list[Step]:
    """Steps over at most two CRL states, two policies and two envelopes: the warm cache is revisited often."""
    crls = draw(st.lists(st.sampled_from(sorted(CRLS)), min_size=1, max_size=2, unique=True))
    policies = draw(st.lists(st.sampled_from(sorted(POLICIES)), min_size=1, max_size=2, unique=True))
    envelopes = draw(st.lists(st.sampled_from(sorted(ENVELOPES)), min_size=1, max_size=2, unique=True))
    step = st.builds(
        Step,
        crl=st.sampled_from(crls),
        policy=st.sampled_from(policies),
        envelope=st.sampled_from(envelopes),
        now=instants,
        as_float=st.booleans(),
    )
    return draw(st.lists(step, min_size=2, max_size=12))


def write_trust(directory: Path, step: Step) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    crl = CRLS[step.crl]
    PKI.write_trust_dir(directory, crls=[crl] if crl is not None else [], signers_toml=POLICIES[step.policy])


Answer = tuple[object, ...]


def answer(envelope: bytes, trust: Path, now: dt.datetime | float, state: StateStore) -> Answer:
    try:
        out = verify_files(envelope, trust, now=now, state=state, digested=[digested(disk_of(DISK).sha256, len(DISK))])
    except HostguardError as exc:
        return ("deny", type(exc).__name__, str(exc))
    return ("allow", out.facts, out.signer_subjects, out.checks)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequences())
def test_a_cached_answer_always_equals_a_full_verification(sequence: list[Step]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        trust = root / "trust"
        StateStore(root / "empty").close()  # each step's cold state starts as a copy (creating one costs fsyncs)
        with StateStore(root / "warm") as warm:
            for i, step in enumerate(sequence):
                write_trust(trust, step)
                envelope = ENVELOPES[step.envelope]
                now: dt.datetime | float = step.now.timestamp() if step.as_float else step.now
                shutil.copytree(root / "empty", root / f"cold{i}")
                with StateStore(root / f"cold{i}") as cold:  # empty caches, the warm state's rollback versions
                    for name, version in warm._run("SELECT name, version FROM versions"):
                        cold.record_version(name, version)
                    full = answer(envelope, trust, now, cold)
                cached = answer(envelope, trust, now, warm)
                assert cached == full, f"step {i}: {step}"

"""One error hierarchy. Every message is a single line an admin can act on.

Split by cause, flat (like python-tuf's exceptions): entry points catch `HostguardError` only and map
`exit_code` to the process status; anything else is a bug and is reported as a deny by the caller.
"""

from __future__ import annotations

EXIT_ALLOW = 0
EXIT_DENY = 1
EXIT_USAGE = 2


def printable(text: str) -> str:
    """`text` as one line of printable characters: runs of whitespace become one space, and every other
    character that is not printable (C0/C1 controls such as ESC and BEL, format characters such as bidi
    overrides, lone surrogates from undecodable file names) becomes a visible escape (\\x1b, \\u202e).

    Untrusted text (certificate subjects, file names, guest data) reaches terminals, the audit log and syslog
    through this, so it cannot move the cursor, ring, reorder what the admin reads or start a fake line."""
    line = " ".join(text.split())
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in line)


class HostguardError(Exception):
    """Base class. `str(err)` is the one line shown to the user."""

    exit_code = EXIT_DENY

    def __init__(self, message: str) -> None:
        # Keep it one line whatever the cause contained (certificate subjects, file names from guests).
        super().__init__(printable(message))

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(HostguardError):
    """The host's own configuration (config file, trust directory, state dir) is unusable."""

    exit_code = EXIT_USAGE


class UsageError(HostguardError):
    """The command line or an input file given by the operator is wrong."""

    exit_code = EXIT_USAGE


class VerificationError(HostguardError):
    """A check failed: the subject must not be trusted. `check` names the check that failed."""

    check = "verification"

    def __init__(self, message: str, *, check: str | None = None) -> None:
        if check is not None:
            self.check = check
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.check}: {self.message}"


class FormatError(VerificationError):
    """Bytes that do not parse as the format they claim (manifest, envelope, certificate, XML, qcow2)."""

    check = "format"


class SignatureError(VerificationError):
    check = "signature"


class ChainError(VerificationError):
    check = "certificate chain"


class RevocationError(VerificationError):
    check = "revocation"


class CrlStateError(RevocationError):
    """The host's CRLs cannot say whether a certificate is revoked (stale, missing, rolled back): a deny at start,
    but the host's own set-up, not evidence about a running guest's image (ADR 0024)."""


class SignerPolicyError(VerificationError):
    check = "signer policy"


class ExpiredError(VerificationError):
    check = "expiry"


class RollbackError(VerificationError):
    check = "rollback"


class DigestMismatchError(VerificationError):
    check = "disk digest"


class DomainError(VerificationError):
    """The domain definition asks for something hostguard will not allow (unsigned disk, hostile XML)."""

    check = "domain definition"


class ImageError(HostguardError):
    """A guest image could not be read (corrupt filesystem, unsupported layout, limits exceeded)."""


class DeadlineError(HostguardError):
    """A dependency did not answer in time; treated as a deny."""

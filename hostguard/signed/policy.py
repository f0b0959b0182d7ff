"""Signer policy: which verified signers may sign which image names, and how many are needed.

Small composable objects in the style of sigstore-python's verify/policy.py: identity matchers with
`matches(signer) -> bool`, combined with `AllOf`/`AnyOf` (an empty combination is a configuration error, never
"match everything"). `SignerPolicy.verify` raises `SignerPolicyError`.

signers.toml (in the trust directory; optional — without it any signer with a valid chain may sign any image,
one signature needed; with it, at least one [[signer]]):

    [[signer]]                 # every key given must match
    cn = "acme-build"          # subject common name (a subject with several CNs never matches)
    san = "https://acme.example/build"   # a URI subject alternative name; `email`, `dns` for those kinds
    root = "CN=Acme Root CA"   # the root the chain ends in: its subject, naming exactly one root in roots/,
                               # or "sha256:<hex of the DER certificate>"
    images = ["web-*", "db"]   # image-name globs this signer may sign

    [[threshold]]
    images = "web-*"
    signers = 2                # distinct parties needed (the largest matching rule wins), see SignerPolicy.verify

    [revocation]
    require_crl = ["CN=Acme Issuing CA"]   # or ["*"]: a CA in the chain without a complete current CRL denies
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from hostguard.errors import ConfigError, SignerPolicyError
from hostguard.record import Record


class SignerInfo(Record):
    """Who signed, as established by a verified chain."""

    subject: str  # RFC 4514, control characters escaped: for display and for telling parties apart
    common_name: str | None
    sans: tuple[tuple[str, str], ...]  # (kind, value), kind "uri", "email" or "dns"
    root_subject: str
    key_id: str  # SHA-256 of the leaf's SubjectPublicKeyInfo
    root_fingerprint: str = ""  # trust.fingerprint of the root the chain ends in

    @property
    def party(self) -> str:
        """Who this is, as far as the certificate says: its subject (compared without case or extra spaces),
        or its alternative names when the subject is empty."""
        return " ".join(self.subject.casefold().split()) or repr(sorted(self.sans))


class IdentityMatcher(Protocol):
    def matches(self, signer: SignerInfo) -> bool: ...

    def describe(self) -> str: ...


class CommonName(Record):
    value: str

    def matches(self, signer: SignerInfo) -> bool:
        return signer.common_name == self.value

    def describe(self) -> str:
        return f"cn={self.value}"


class SubjectAltName(Record):
    kind: str  # "uri", "email" or "dns": a DNS name never matches a URI identity
    value: str

    def matches(self, signer: SignerInfo) -> bool:
        return (self.kind, self.value) in signer.sans

    def describe(self) -> str:
        return f"{_SAN_KEYS[self.kind]}={self.value}"


class IssuingRoot(Record):
    subject: str
    # The fingerprints `subject` was resolved to against roots/ (trust.resolve_roots); None: compare the
    # subject string (a policy built without a trust store, in tests).
    fingerprints: frozenset[str] | None = None

    def matches(self, signer: SignerInfo) -> bool:
        if self.fingerprints is not None:
            return signer.root_fingerprint in self.fingerprints
        return signer.root_subject == self.subject

    def describe(self) -> str:
        return f"root={self.subject}"


_SAN_KEYS = {"uri": "san", "email": "email", "dns": "dns"}


class _Combination:
    """Conditions joined by `all` or `any`; an empty one is refused (it would match everyone, or no one)."""

    joiner = ""
    empty = ""

    def __init__(self, children: Sequence[IdentityMatcher]) -> None:
        if not children:
            raise ConfigError(f"signer policy: an {type(self).__name__} with no conditions {self.empty}")
        self.children = tuple(children)

    def describe(self) -> str:
        return f" {self.joiner} ".join(c.describe() for c in self.children)


class AllOf(_Combination):
    joiner, empty = "and", "would match every signer"

    def matches(self, signer: SignerInfo) -> bool:
        return all(c.matches(signer) for c in self.children)


class AnyOf(_Combination):
    joiner, empty = "or", "can never match"

    def matches(self, signer: SignerInfo) -> bool:
        return any(c.matches(signer) for c in self.children)


class AnySigner:
    """The default without signers.toml: the trust roots alone decide."""

    def matches(self, signer: SignerInfo) -> bool:
        return True

    def describe(self) -> str:
        return "any signer with a valid chain"


class Grant(Record):
    identity: IdentityMatcher
    images: tuple[str, ...]  # globs

    def allows(self, signer: SignerInfo, image_name: str) -> bool:
        return any(fnmatch.fnmatchcase(image_name, g) for g in self.images) and self.identity.matches(signer)


class Threshold(Record):
    images: str
    signers: int


class SignerPolicy(Record):
    grants: tuple[Grant, ...]
    thresholds: tuple[Threshold, ...] = ()
    require_crl: frozenset[str] = frozenset()

    def threshold_for(self, image_name: str) -> int:
        return max([t.signers for t in self.thresholds if fnmatch.fnmatchcase(image_name, t.images)], default=1)

    def verify(self, image_name: str, signers: Sequence[SignerInfo]) -> tuple[SignerInfo, ...]:
        """The authorized signers, one per distinct party; raises unless there are at least the threshold.

        Parties, not keys: two signatures are one party when they share a key or a subject (`SignerInfo.party`),
        and transitively, so one signer with two keys, or one key certified under two names, counts once."""
        authorized: list[SignerInfo] = []
        refused: list[SignerInfo] = []
        for signer in signers:
            (authorized if any(g.allows(signer, image_name) for g in self.grants) else refused).append(signer)
        parties = _parties(authorized)
        need = self.threshold_for(image_name)
        if len(parties) >= need:
            return tuple(parties)
        if not authorized and refused:
            raise SignerPolicyError(f"signer {refused[0].subject!r} may not sign image {image_name!r}")
        raise SignerPolicyError(
            f"image {image_name!r} needs {need} distinct authorized signer(s), found {len(parties)}"
        )


def _parties(signers: Sequence[SignerInfo]) -> list[SignerInfo]:
    """The first signer of each party: signers joined by a shared key id or subject (union-find)."""
    parent = list(range(len(signers)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, signer in enumerate(signers):
        for label in ("key:" + signer.key_id, "party:" + signer.party):
            j = first.setdefault(label, i)
            parent[root(i)] = root(j)
    return [s for i, s in enumerate(signers) if root(i) == i]


DEFAULT_POLICY = SignerPolicy(grants=(Grant(AnySigner(), ("*",)),))


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"signers.toml: {what} must be a non-empty string or list of strings")
    return tuple(value)


def policy_from_toml(
    doc: Mapping[str, Any], resolve_root: Callable[[str], frozenset[str]] | None = None
) -> SignerPolicy:
    """Build a policy from parsed signers.toml. Unknown keys are errors: a typo must not widen trust, and
    neither may an empty list. `resolve_root` (trust.resolve_roots) pins each `root` to certificates."""
    unknown = sorted(set(doc) - {"signer", "threshold", "revocation"})
    if unknown:
        raise ConfigError(f"signers.toml: unknown section {unknown[0]!r}")
    if not doc:
        # An empty file would silently mean the default (any signer with a valid chain): say so instead.
        raise ConfigError("signers.toml is empty: remove it for the default policy, or add [[signer]] rules")
    rules = doc.get("signer")
    if rules is not None and (not isinstance(rules, list) or not rules):
        # Without [[signer]] the default grant applies; `signer = []` must not mean the same thing silently.
        raise ConfigError("signers.toml: signer must be a non-empty array of tables ([[signer]])")
    grants: list[Grant] = []
    for i, rule in enumerate(rules or []):
        if not isinstance(rule, dict):
            raise ConfigError(f"signers.toml: signer #{i + 1} must be a table")
        bad = sorted(set(rule) - {"cn", "san", "email", "dns", "root", "images", "name"})
        if bad:
            raise ConfigError(f"signers.toml: signer #{i + 1} has unknown key {bad[0]!r}")
        conditions: list[IdentityMatcher] = []
        if "cn" in rule:
            conditions.append(AnyOf([CommonName(v) for v in _strings(rule["cn"], "cn")]))
        for kind, key in _SAN_KEYS.items():
            if key in rule:
                conditions.append(AnyOf([SubjectAltName(kind, v) for v in _strings(rule[key], key)]))
        if "root" in rule:
            conditions.append(
                AnyOf(
                    [
                        IssuingRoot(v, resolve_root(v) if resolve_root is not None else None)
                        for v in _strings(rule["root"], "root")
                    ]
                )
            )
        if "images" not in rule:
            raise ConfigError(f"signers.toml: signer #{i + 1} names no images")
        grants.append(Grant(AllOf(conditions), _strings(rule["images"], "images")))
    thresholds: list[Threshold] = []
    threshold_rules = doc.get("threshold", [])
    if not isinstance(threshold_rules, list):
        raise ConfigError("signers.toml: threshold must be an array of tables ([[threshold]])")
    for i, rule in enumerate(threshold_rules):
        if not isinstance(rule, dict) or set(rule) != {"images", "signers"}:
            raise ConfigError(f"signers.toml: threshold #{i + 1} needs exactly 'images' and 'signers'")
        count = rule["signers"]
        if type(count) is not int or not 1 <= count <= 16:
            raise ConfigError(f"signers.toml: threshold #{i + 1} signers must be an integer 1..16")
        images = rule["images"]
        if not isinstance(images, str) or not images:
            raise ConfigError(f"signers.toml: threshold #{i + 1} images must be a glob string")
        thresholds.append(Threshold(images, count))
    revocation = doc.get("revocation", {})
    if not isinstance(revocation, dict) or set(revocation) - {"require_crl"}:
        raise ConfigError("signers.toml: [revocation] takes only require_crl")
    require = (
        frozenset(_strings(revocation["require_crl"], "require_crl")) if "require_crl" in revocation else frozenset()
    )
    return SignerPolicy(
        grants=tuple(grants) if grants else DEFAULT_POLICY.grants, thresholds=tuple(thresholds), require_crl=require
    )

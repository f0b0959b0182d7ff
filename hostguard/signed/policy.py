"""Signer policy: which verified signers may sign which image names, and how many are needed.

Small composable objects in the style of sigstore-python's verify/policy.py: identity matchers with
`matches(signer) -> bool`, combined with `AllOf`/`AnyOf` (an empty combination is a configuration error, never
"match everything"). `SignerPolicy.verify` raises `SignerPolicyError`.

signers.toml (in the trust directory; optional — without it any signer with a valid chain may sign any image,
one signature needed):

    [[signer]]                 # every key given must match
    cn = "acme-build"          # subject common name
    san = "https://acme.example/build"
    root = "CN=Acme Root CA"   # subject of the trust root the chain ends in (RFC 4514)
    images = ["web-*", "db"]   # image-name globs this signer may sign

    [[threshold]]
    images = "web-*"
    signers = 2                # distinct keys needed (the largest matching rule wins)

    [revocation]
    require_crl = ["CN=Acme Issuing CA"]   # or ["*"]: a CA in the chain without a current CRL denies
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hostguard.errors import ConfigError, SignerPolicyError


@dataclass(frozen=True)
class SignerInfo:
    """Who signed, as established by a verified chain."""

    subject: str
    common_name: str | None
    sans: tuple[str, ...]
    root_subject: str
    key_id: str  # SHA-256 of the leaf's SubjectPublicKeyInfo


class IdentityMatcher(Protocol):
    def matches(self, signer: SignerInfo) -> bool: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class CommonName:
    value: str

    def matches(self, signer: SignerInfo) -> bool:
        return signer.common_name == self.value

    def describe(self) -> str:
        return f"cn={self.value}"


@dataclass(frozen=True)
class SubjectAltName:
    value: str

    def matches(self, signer: SignerInfo) -> bool:
        return self.value in signer.sans

    def describe(self) -> str:
        return f"san={self.value}"


@dataclass(frozen=True)
class IssuingRoot:
    subject: str

    def matches(self, signer: SignerInfo) -> bool:
        return signer.root_subject == self.subject

    def describe(self) -> str:
        return f"root={self.subject}"


class AllOf:
    def __init__(self, children: Sequence[IdentityMatcher]) -> None:
        if not children:
            raise ConfigError("signer policy: an AllOf with no conditions would match every signer")
        self.children = tuple(children)

    def matches(self, signer: SignerInfo) -> bool:
        return all(c.matches(signer) for c in self.children)

    def describe(self) -> str:
        return " and ".join(c.describe() for c in self.children)


class AnyOf:
    def __init__(self, children: Sequence[IdentityMatcher]) -> None:
        if not children:
            raise ConfigError("signer policy: an AnyOf with no conditions can never match")
        self.children = tuple(children)

    def matches(self, signer: SignerInfo) -> bool:
        return any(c.matches(signer) for c in self.children)

    def describe(self) -> str:
        return " or ".join(c.describe() for c in self.children)


class AnySigner:
    """The default without signers.toml: the trust roots alone decide."""

    def matches(self, signer: SignerInfo) -> bool:
        return True

    def describe(self) -> str:
        return "any signer with a valid chain"


@dataclass(frozen=True)
class Grant:
    identity: IdentityMatcher
    images: tuple[str, ...]  # globs

    def allows(self, signer: SignerInfo, image_name: str) -> bool:
        return any(fnmatch.fnmatchcase(image_name, g) for g in self.images) and self.identity.matches(signer)


@dataclass(frozen=True)
class Threshold:
    images: str
    signers: int


@dataclass(frozen=True)
class SignerPolicy:
    grants: tuple[Grant, ...]
    thresholds: tuple[Threshold, ...] = ()
    require_crl: frozenset[str] = frozenset()

    def threshold_for(self, image_name: str) -> int:
        return max([t.signers for t in self.thresholds if fnmatch.fnmatchcase(image_name, t.images)], default=1)

    def verify(self, image_name: str, signers: Sequence[SignerInfo]) -> tuple[SignerInfo, ...]:
        """The authorized signers (one per distinct key); raises unless there are at least the threshold."""
        authorized: dict[str, SignerInfo] = {}
        refused: list[SignerInfo] = []
        for signer in signers:
            if any(g.allows(signer, image_name) for g in self.grants):
                authorized.setdefault(signer.key_id, signer)
            else:
                refused.append(signer)
        need = self.threshold_for(image_name)
        if len(authorized) >= need:
            return tuple(authorized.values())
        if not authorized and refused:
            raise SignerPolicyError(f"signer {refused[0].subject!r} may not sign image {image_name!r}")
        raise SignerPolicyError(
            f"image {image_name!r} needs {need} distinct authorized signer(s), found {len(authorized)}"
        )


DEFAULT_POLICY = SignerPolicy(grants=(Grant(AnySigner(), ("*",)),))


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"signers.toml: {what} must be a non-empty string or list of strings")
    return tuple(value)


def policy_from_toml(doc: Mapping[str, Any]) -> SignerPolicy:
    """Build a policy from parsed signers.toml. Unknown keys are errors: a typo must not widen trust."""
    unknown = sorted(set(doc) - {"signer", "threshold", "revocation"})
    if unknown:
        raise ConfigError(f"signers.toml: unknown section {unknown[0]!r}")
    grants: list[Grant] = []
    for i, rule in enumerate(doc.get("signer", [])):
        if not isinstance(rule, dict):
            raise ConfigError(f"signers.toml: signer #{i + 1} must be a table")
        bad = sorted(set(rule) - {"cn", "san", "root", "images", "name"})
        if bad:
            raise ConfigError(f"signers.toml: signer #{i + 1} has unknown key {bad[0]!r}")
        conditions: list[IdentityMatcher] = []
        if "cn" in rule:
            conditions.append(AnyOf([CommonName(v) for v in _strings(rule["cn"], "cn")]))
        if "san" in rule:
            conditions.append(AnyOf([SubjectAltName(v) for v in _strings(rule["san"], "san")]))
        if "root" in rule:
            conditions.append(AnyOf([IssuingRoot(v) for v in _strings(rule["root"], "root")]))
        if "images" not in rule:
            raise ConfigError(f"signers.toml: signer #{i + 1} names no images")
        grants.append(Grant(AllOf(conditions), _strings(rule["images"], "images")))
    thresholds: list[Threshold] = []
    for i, rule in enumerate(doc.get("threshold", [])):
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

"""An OCI distribution client: references, manifests, blobs, tags and referrers (ADR 0015).

Built on oras-py's `Registry` for what it does well: the requests session, credentials from docker-style auth
files (with credential helpers) and the bearer-token flow. Written here, because oras-py lacks them: manifests
as exact bytes (their digest is what everything is pinned to), blob downloads that can resume at an offset,
streaming uploads of unbounded size, the OCI 1.1 referrers API with the referrers-tag fallback, timeouts on
every request and no retry loop that sleeps for minutes. Nothing in this module trusts the registry: every
manifest is checked against the digest it was asked for, and `open_blob` hands back a stream whose bytes the
caller hashes (hostguard.library.oci does).

Imported only by `hostguard library push/pull/sync`: never on the hook's path.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostguard.errors import FormatError, HostguardError, UsageError

MANIFEST_V1 = "application/vnd.oci.image.manifest.v1+json"
INDEX_V1 = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MAX_MANIFEST = 4 * 1024 * 1024  # what distribution itself accepts
TIMEOUT = 60.0  # seconds without progress on one request (connect or read): then the command fails

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_REPO_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
REPO_RE = re.compile(rf"{_REPO_COMPONENT}(?:/{_REPO_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
HOST_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?)(?::[0-9]{1,5})?")


class RegistryError(HostguardError):
    """The registry could not be reached or answered something other than the protocol allows."""


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def ref(self) -> str:
        """The manifest reference: the digest when there is one (a tag is resolved once, then never again)."""
        ref = self.digest or self.tag
        assert ref is not None
        return ref

    def __str__(self) -> str:
        tail = f"@{self.digest}" if self.digest else f":{self.tag}" if self.tag else ""
        return f"oci://{self.registry}/{self.repository}{tail}"


def parse_reference(text: str, *, require_tag: bool = False, bare: bool = False) -> Reference:
    """`oci://HOST[:PORT]/REPO:TAG`, `…/REPO@sha256:HEX` (or `bare`: `…/REPO` alone)."""
    if not text.startswith("oci://"):
        raise UsageError(f"{text!r}: an OCI reference is oci://REGISTRY/REPOSITORY:TAG or …@sha256:DIGEST")
    rest = text[len("oci://") :]
    host, _, path = rest.partition("/")
    if not HOST_RE.fullmatch(host):
        raise UsageError(f"{text!r}: {host!r} is not a registry host[:port]")
    digest = tag = None
    if "@" in path:
        path, digest = path.split("@", 1)
        if not DIGEST_RE.fullmatch(digest):
            raise UsageError(f"{text!r}: the digest must be sha256: and 64 lowercase hex digits")
    else:
        head, _, last = path.rpartition("/")
        if ":" in last:
            last, tag = last.split(":", 1)
            path = f"{head}/{last}" if head else last
            if not TAG_RE.fullmatch(tag):
                raise UsageError(f"{text!r}: {tag!r} is not a valid tag")
    if not REPO_RE.fullmatch(path) or len(path) > 255:
        raise UsageError(f"{text!r}: {path!r} is not a repository name (lowercase, digits, ._-/)")
    if require_tag and tag is None:
        raise UsageError(f"{text!r}: give a tag to push to (…/{path}:TAG)")
    if not bare and tag is None and digest is None:
        raise UsageError(f"{text!r}: give a tag (:TAG) or a digest (@sha256:…)")
    if bare and (tag or digest):
        raise UsageError(f"{text!r}: give the repository only (oci://REGISTRY/REPOSITORY)")
    return Reference(host, path, tag, digest)


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def sha256_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def auth_files() -> list[str]:
    """Where credentials are read from, as docker, podman and skopeo keep them (the first that has the host wins
    in oras-py's merge order: REGISTRY_AUTH_FILE, then $DOCKER_CONFIG/config.json, then ~/.docker/config.json)."""
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("DOCKER_CONFIG"):
        files.append(str(Path(os.environ["DOCKER_CONFIG"]) / "config.json"))
    return [f for f in files if Path(f).is_file()]


def descriptor(media_type: str, digest: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def _oras_registry(host: str, insecure: bool, timeout: float) -> Any:
    """An oras-py Registry whose requests all carry a timeout, retry authentication once, never sleep."""
    import logging

    import oras.provider
    import requests.adapters

    logging.getLogger("oras").setLevel(logging.CRITICAL)  # our errors say it once, in one line

    class _Adapter(requests.adapters.HTTPAdapter):
        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("timeout") is None:  # oras-py's token requests pass none
                kwargs["timeout"] = timeout
            return super().send(request, *args, **kwargs)

    class _Registry(oras.provider.Registry):  # type: ignore[misc]
        def do_request(  # noqa: PLR0917 - oras-py's signature
            self,
            url: str,
            method: str = "GET",
            data: Any = None,
            headers: dict[str, str] | None = None,
            json: Any = None,
            stream: bool = False,
        ) -> Any:
            headers = dict(headers or {})
            if getattr(self.auth, "token", None):
                headers.update(self.auth.get_auth_header())
            kw = {"data": data, "json": json, "stream": stream, "verify": self._tls_verify, "timeout": timeout}
            response = self.session.request(method, url, headers=headers, **kw)
            if response.status_code == 401 and not hasattr(data, "__next__"):  # a generator cannot be replayed
                response.close()
                # A new scope (pull then push) needs a new token: refresh instead of re-sending the old one.
                headers, changed = self.auth.authenticate_request(response, headers, refresh=True)
                if changed:
                    response = self.session.request(method, url, headers=headers, **kw)
            return response

    reg = _Registry(hostname=host, insecure=insecure, tls_verify=True)
    adapter = _Adapter()
    reg.session.mount("https://", adapter)
    reg.session.mount("http://", adapter)
    reg.auth.session = reg.session
    return reg


class RegistryClient:
    """One repository on one registry."""

    def __init__(self, ref: Reference, *, insecure: bool = False, timeout: float = TIMEOUT) -> None:
        if insecure and not is_loopback(ref.registry):
            raise UsageError(f"--insecure (plain HTTP) is only allowed for a loopback registry, not {ref.registry}")
        self.ref = ref
        self.base = f"{'http' if insecure else 'https'}://{ref.registry}/v2/{ref.repository}"
        self._reg = _oras_registry(ref.registry, insecure, timeout)
        try:
            container = self._reg.get_container(f"{ref.registry}/{ref.repository}")
            self._reg.auth.load_configs(container, configs=auth_files())
        except Exception as exc:  # noqa: BLE001 - oras-py raises what it meets (OSError, ValueError, KeyError)
            raise UsageError(f"cannot read the registry auth file: {exc}") from None

    # --- requests -----------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        data: Any = None,
        stream: bool = False,
        ok: Iterable[int] = (200,),
    ) -> Any:
        import requests

        try:
            response = self._reg.do_request(url, method, data=data, headers=headers, stream=stream)
        except requests.exceptions.SSLError as exc:
            raise RegistryError(f"{self.ref.registry}: TLS verification failed: {_first_line(exc)}") from None
        except (requests.exceptions.RequestException, OSError) as exc:
            raise RegistryError(f"{self.ref.registry}: {_first_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - oras-py's authentication failures (ValueError and others)
            raise RegistryError(f"{self.ref.registry}: {_first_line(exc)}") from None
        if response.status_code not in set(ok):
            detail = _error_detail(response)
            if response.status_code in (401, 403):
                detail += (
                    f" (credentials for {self.ref.registry}: $REGISTRY_AUTH_FILE, $DOCKER_CONFIG/config.json"
                    " or ~/.docker/config.json)"
                )
            response.close()
            raise RegistryError(f"{method} {url.split('/v2/', 1)[-1]}: HTTP {response.status_code}{detail}")
        return response

    # --- manifests ----------------------------------------------------------------------------------------

    def get_manifest(self, reference: str, accept: Iterable[str] = (MANIFEST_V1, INDEX_V1)) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest; by digest, the bytes must hash to it."""
        response = self.request(
            "GET", f"{self.base}/manifests/{reference}", headers={"Accept": ", ".join(accept)}, stream=True
        )
        body = _read_limited(response, MAX_MANIFEST, f"manifest {reference}")
        digest = sha256_digest(body)
        if DIGEST_RE.fullmatch(reference) and digest != reference:
            raise FormatError(f"registry served a manifest for {reference} whose digest is {digest}")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return body, media_type, digest

    def get_manifest_or_none(self, reference: str, accept: Iterable[str]) -> tuple[bytes, str, str] | None:
        try:
            return self.get_manifest(reference, accept)
        except RegistryError as exc:
            if "HTTP 404" in str(exc):
                return None
            raise

    def put_manifest(self, reference: str, body: bytes, media_type: str) -> tuple[str, Any]:
        response = self.request(
            "PUT",
            f"{self.base}/manifests/{reference}",
            headers={"Content-Type": media_type},
            data=body,
            ok=(200, 201, 202),
        )
        response.close()
        digest = sha256_digest(body)
        served = response.headers.get("Docker-Content-Digest")
        if served and served != digest:
            raise RegistryError(f"registry stored the manifest as {served}, expected {digest}")
        return digest, response.headers

    # --- blobs --------------------------------------------------------------------------------------------

    def blob_exists(self, digest: str) -> bool:
        response = self.request("HEAD", f"{self.base}/blobs/{digest}", ok=(200, 404))
        response.close()
        return bool(response.status_code == 200)

    def _upload_url(self) -> str:
        response = self.request("POST", f"{self.base}/blobs/uploads/", ok=(202,))
        response.close()
        location = response.headers.get("Location", "")
        if not location:
            raise RegistryError("registry started an upload without a Location")
        if location.startswith("/"):
            location = f"{self.base.split('/v2/', 1)[0]}{location}"
        return str(location)

    def upload_bytes(self, data: bytes) -> str:
        digest = sha256_digest(data)
        if not self.blob_exists(digest):
            url = self._upload_url()
            sep = "&" if "?" in url else "?"
            headers = {"Content-Type": "application/octet-stream"}
            self.request("PUT", f"{url}{sep}digest={digest}", headers=headers, data=data, ok=(201,)).close()
        return digest

    def upload_stream(self, chunks: Iterator[bytes], digest_of: Any) -> str:
        """Stream `chunks` as one blob (a PATCH with a chunked body, then PUT ?digest=): memory stays flat
        whatever the size. `digest_of()` gives the digest once the chunks are exhausted."""
        url = self._upload_url()
        headers = {"Content-Type": "application/octet-stream"}
        response = self.request("PATCH", url, headers=headers, data=chunks, ok=(202,))
        response.close()
        location = response.headers.get("Location", url)
        if location.startswith("/"):
            location = f"{self.base.split('/v2/', 1)[0]}{location}"
        digest = str(digest_of())
        sep = "&" if "?" in location else "?"
        self.request("PUT", f"{location}{sep}digest={digest}", headers={"Content-Length": "0"}, ok=(201,)).close()
        return digest

    def open_blob(self, digest: str, offset: int = 0) -> tuple[Any, int]:
        """A streaming response for the blob from `offset` and the offset it actually starts at (a registry
        that ignores Range starts again at 0)."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = self.request("GET", f"{self.base}/blobs/{digest}", headers=headers, stream=True, ok=(200, 206))
        if response.status_code == 206:
            m = re.fullmatch(r"bytes (\d+)-\d+/(?:\d+|\*)", response.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != offset:
                response.close()
                raise RegistryError(f"registry answered a Range request for {digest} with a different range")
            return response, offset
        return response, 0

    def get_blob(self, digest: str, limit: int) -> bytes:
        response, _ = self.open_blob(digest)
        data = _read_limited(response, limit, f"blob {digest}")
        if sha256_digest(data) != digest:
            raise FormatError(f"registry served blob {digest} with other content")
        return data

    # --- tags and referrers -------------------------------------------------------------------------------

    def tags(self) -> list[str]:
        tags: list[str] = []
        url: str | None = f"{self.base}/tags/list?n=1000"
        for _ in range(1000):  # bounded: a registry that pages forever fails the command
            if url is None:
                return tags
            response = self.request("GET", url, stream=True)
            doc = _json(_read_limited(response, MAX_MANIFEST, "tag list"), "tag list")
            page = doc.get("tags") or []
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise FormatError("registry's tag list is not a list of strings")
            tags.extend(page)
            link = response.headers.get("Link", "")
            m = re.match(r"<([^>]+)>", link)
            url = f"{self.base.split('/v2/', 1)[0]}{m.group(1)}" if m and m.group(1).startswith("/") else None
        raise RegistryError("registry's tag list did not end after 1000 pages")

    def referrers(self, digest: str, artifact_type: str) -> tuple[list[dict[str, Any]], str]:
        """Descriptors of the manifests whose subject is `digest`, and how they were found ("api" or "tag")."""
        response = self.request(
            "GET", f"{self.base}/referrers/{digest}?artifactType={artifact_type}", stream=True, ok=(200, 404)
        )
        if response.status_code == 200:
            body = _read_limited(response, MAX_MANIFEST, "referrers")
            return _index_entries(body, artifact_type), "api"
        response.close()
        found = self.get_manifest_or_none(fallback_tag(digest), (INDEX_V1,))
        if found is None:
            return [], "tag"
        return _index_entries(found[0], artifact_type), "tag"

    def add_referrer_to_fallback_tag(self, subject: str, desc: dict[str, Any]) -> None:
        """The referrers tag schema: tag `sha256-<hex>` holds an image index of the subject's referrers."""
        tag = fallback_tag(subject)
        found = self.get_manifest_or_none(tag, (INDEX_V1,))
        index: dict[str, Any] = {"schemaVersion": 2, "mediaType": INDEX_V1, "manifests": []}
        if found is not None:
            index = _json(found[0], "referrers index")
            if not isinstance(index.get("manifests"), list):
                raise FormatError(f"tag {tag} does not hold an image index")
        if any(isinstance(m, dict) and m.get("digest") == desc["digest"] for m in index["manifests"]):
            return
        index["manifests"].append(desc)
        self.put_manifest(tag, canonical_json(index), INDEX_V1)


def fallback_tag(digest: str) -> str:
    return digest.replace(":", "-", 1)


def canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _index_entries(body: bytes, artifact_type: str) -> list[dict[str, Any]]:
    doc = _json(body, "referrers index")
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise FormatError("referrers index has no manifests list")
    out = []
    for e in entries:
        if (
            isinstance(e, dict)
            and e.get("artifactType") == artifact_type
            and isinstance(e.get("digest"), str)
            and DIGEST_RE.fullmatch(e["digest"])
        ):
            out.append(e)
    return out


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{what} is not JSON") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{what} is not a JSON object")
    return doc


def parse_json(body: bytes, what: str) -> dict[str, Any]:
    return _json(body, what)


def _read_limited(response: Any, limit: int, what: str) -> bytes:
    import requests

    try:
        with response:
            data = response.raw.read(limit + 1, decode_content=True)
    except (requests.exceptions.RequestException, OSError, ValueError) as exc:
        raise RegistryError(f"reading {what}: {_first_line(exc)}") from None
    if len(data) > limit:
        raise FormatError(f"{what} is over the {limit}-byte limit")
    return bytes(data)


def _error_detail(response: Any) -> str:
    try:
        doc = json.loads(response.raw.read(4096, decode_content=True) if response.raw else b"")
        msgs = [str(e.get("message", "")) for e in doc.get("errors", []) if isinstance(e, dict)]
        return f" ({'; '.join(m for m in msgs if m)[:200]})" if any(msgs) else ""
    except Exception:  # noqa: BLE001 - only for a nicer message
        return ""


def _first_line(exc: BaseException) -> str:
    from hostguard.errors import printable

    # requests wraps the socket error in two layers of repr: say just "[Errno 111] Connection refused"
    errno_text = re.search(r"\[Errno -?\d+\] [^'\")]+", str(exc))
    if errno_text:
        return printable(errno_text.group(0))
    text = str(exc).strip().splitlines()
    return printable(text[0][:300] if text else type(exc).__name__)

"""An OCI distribution client: references, manifests, blobs, tags and referrers (ADR 0015).

On the standard library (http.client, ssl): manifests as exact bytes (their digest is what everything is
pinned to), blob downloads that can resume at an offset, streaming uploads of unbounded size, the OCI 1.1
referrers API with the referrers-tag fallback, credentials from docker/podman auth files and credential
helpers, the bearer-token flow, a timeout on every socket operation and no retry loop. ADR 0015 says why this
is not oras-py. Nothing in this module trusts the registry: every
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
from pathlib import Path
from typing import Any

from hostguard.errors import FormatError, HostguardError, UsageError, printable
from hostguard.record import Record

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


class Reference(Record):
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
    """The auth files named by the environment, as podman/skopeo ($REGISTRY_AUTH_FILE) and docker ($DOCKER_CONFIG)
    name them; `credentials` reads them in this order, then ~/.docker/config.json."""
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("DOCKER_CONFIG"):
        files.append(str(Path(os.environ["DOCKER_CONFIG"]) / "config.json"))
    return [f for f in files if Path(f).is_file()]


def descriptor(media_type: str, digest: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


class Response:
    """One HTTP answer: status, headers (case-insensitive), and a body read on demand."""

    def __init__(self, conn: Any, resp: Any) -> None:
        self._conn, self._resp = conn, resp
        self.status_code: int = resp.status
        self.headers = resp.headers

    def read(self, n: int) -> bytes:
        return bytes(self._resp.read(n))

    def readinto(self, buf: memoryview) -> int:
        return int(self._resp.readinto(buf))

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _www_authenticate(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'([A-Za-z_]+)="([^"]*)"', rest)}
    return scheme.lower(), params


def credentials(host: str) -> tuple[str, str] | None:
    """(user, secret) for `host` from the first auth file that has it: `auths` (`auth` = base64 user:secret, or
    `username`/`password`), then `credHelpers`/`credsStore` (docker-credential-NAME get)."""
    keys = (host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/")
    for path in [*auth_files(), str(Path.home() / ".docker" / "config.json")]:
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read the registry auth file {path}: {exc}") from None
        if not isinstance(doc, dict):
            raise UsageError(f"registry auth file {path} is not a JSON object")
        auths: dict[str, Any] = doc["auths"] if isinstance(doc.get("auths"), dict) else {}
        for key in keys:
            entry = auths.get(key)
            if isinstance(entry, dict):
                if isinstance(entry.get("auth"), str) and entry["auth"]:
                    import base64
                    import binascii

                    try:
                        user, _, secret = base64.b64decode(entry["auth"]).decode().partition(":")
                    except (binascii.Error, UnicodeDecodeError):
                        raise UsageError(f"registry auth file {path}: the auth for {key} is not base64") from None
                    return user, secret
                if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
                    return entry["username"], entry["password"]
        helpers: dict[str, Any] = doc["credHelpers"] if isinstance(doc.get("credHelpers"), dict) else {}
        helper = helpers.get(host) or doc.get("credsStore")
        if isinstance(helper, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", helper):
            return _credential_helper(helper, host)
    return None


def _credential_helper(name: str, host: str) -> tuple[str, str] | None:
    import subprocess

    try:
        out = subprocess.run(
            [f"docker-credential-{name}", "get"], input=host.encode(), capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"credential helper docker-credential-{name}: {exc}") from None
    if out.returncode != 0:
        return None  # the helper has nothing for this host
    try:
        doc = json.loads(out.stdout)
        return str(doc["Username"]), str(doc["Secret"])
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"credential helper docker-credential-{name} answered something else than JSON") from None


class _Transport:
    """HTTP(S) with the standard library: a timeout on every socket operation, TLS verified against the system
    CA store, redirects for reads, and the registry auth flows (basic; bearer token from the realm the registry
    names, with the user's credentials). Credentials are never sent in clear text off loopback."""

    def __init__(self, host: str, insecure: bool, timeout: float) -> None:
        self.host, self.insecure, self.timeout = host, insecure, timeout
        self.authorization: str | None = None
        self._creds: tuple[str, str] | bool | None = False  # False: not looked up yet

    def _connect(self, scheme: str, netloc: str) -> Any:
        import http.client

        if scheme == "https":
            import ssl

            return http.client.HTTPSConnection(netloc, timeout=self.timeout, context=ssl.create_default_context())
        return http.client.HTTPConnection(netloc, timeout=self.timeout)

    def _send(self, method: str, url: str, headers: dict[str, str], body: Any) -> Response:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        conn = self._connect(parts.scheme, parts.netloc)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, path, body=body, headers={"User-Agent": "hostguard", **headers})
            return Response(conn, conn.getresponse())
        except BaseException:
            conn.close()
            raise

    def request(self, method: str, url: str, headers: dict[str, str], body: Any) -> Response:
        from urllib.parse import urlsplit

        for _ in range(6):  # the first answer, one authentication, redirects: bounded
            sent = dict(headers)
            same_host = urlsplit(url).netloc == self.host
            if self.authorization and same_host:
                sent["Authorization"] = self.authorization
            resp = self._send(method, url, sent, body)
            if resp.status_code == 401 and same_host and not hasattr(body, "__next__"):
                challenge = resp.headers.get("Www-Authenticate", "")
                resp.close()
                new = self._authenticate(challenge)
                if new is None or new == self.authorization:
                    return self._send(method, url, sent, body)  # the 401 again, for the caller to report
                self.authorization = new
                continue
            if resp.status_code in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                location = resp.headers.get("Location", "")
                resp.close()
                if not location:
                    raise RegistryError(f"{self.host}: redirect without a Location")
                url = location if "://" in location else f"{urlsplit(url).scheme}://{urlsplit(url).netloc}{location}"
                if urlsplit(url).scheme not in ("https", "http") or (
                    urlsplit(url).scheme == "http" and not self.insecure
                ):
                    raise RegistryError(f"{self.host}: refused a redirect to {urlsplit(url).scheme}://")
                continue
            return resp
        raise RegistryError(f"{self.host}: too many redirects or authentication rounds")

    def _credentials(self) -> tuple[str, str] | None:
        if self._creds is False:
            self._creds = credentials(self.host)
        return self._creds if isinstance(self._creds, tuple) else None

    def _authenticate(self, challenge: str) -> str | None:
        import base64

        scheme, params = _www_authenticate(challenge)
        creds = self._credentials()
        if scheme == "basic":
            if creds is None:
                return None
            self._require_private("basic credentials", "https" if not self.insecure else "http", self.host)
            return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        if scheme != "bearer" or not params.get("realm"):
            return None
        from urllib.parse import urlencode, urlsplit

        realm = urlsplit(params["realm"])
        query = urlencode({k: params[k] for k in ("service", "scope") if params.get(k)})
        headers = {"Accept": "application/json"}
        if creds is not None:
            self._require_private("credentials", realm.scheme, realm.netloc)
            headers["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        url = f"{params['realm']}{'&' if realm.query else '?'}{query}"
        with self._send("GET", url, headers, None) as resp:
            if resp.status_code != 200:
                return None
            body = resp.read(MAX_MANIFEST + 1)
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            return None
        return f"Bearer {token}" if isinstance(token, str) and token else None

    def _require_private(self, what: str, scheme: str, netloc: str) -> None:
        if scheme != "https" and not is_loopback(netloc):
            raise RegistryError(f"refusing to send {what} for {self.host} to {scheme}://{netloc} (not TLS)")


class RegistryClient:
    """One repository on one registry."""

    def __init__(self, ref: Reference, *, insecure: bool = False, timeout: float = TIMEOUT) -> None:
        if insecure and not is_loopback(ref.registry):
            raise UsageError(f"--insecure (plain HTTP) is only allowed for a loopback registry, not {ref.registry}")
        self.ref = ref
        self.base = f"{'http' if insecure else 'https'}://{ref.registry}/v2/{ref.repository}"
        self._http = _Transport(ref.registry, insecure, timeout)

    # --- requests -----------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        data: Any = None,
        ok: Iterable[int] = (200,),
    ) -> Any:
        import http.client
        import ssl

        try:
            response = self._http.request(method, url, headers or {}, data)
        except ssl.SSLError as exc:
            raise RegistryError(f"{self.ref.registry}: TLS verification failed: {_first_line(exc)}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
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
        response = self.request("GET", f"{self.base}/manifests/{reference}", headers={"Accept": ", ".join(accept)})
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
        response = self.request("GET", f"{self.base}/blobs/{digest}", headers=headers, ok=(200, 206))
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
            response = self.request("GET", url)
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
        response = self.request("GET", f"{self.base}/referrers/{digest}?artifactType={artifact_type}", ok=(200, 404))
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
    import http.client

    try:
        with response:
            data = response.read(limit + 1)
    except (http.client.HTTPException, OSError, ValueError) as exc:
        raise RegistryError(f"reading {what}: {_first_line(exc)}") from None
    if len(data) > limit:
        raise FormatError(f"{what} is over the {limit}-byte limit")
    return bytes(data)


def _error_detail(response: Any) -> str:
    try:
        doc = json.loads(response.read(4096))
        msgs = [str(e.get("message", "")) for e in doc.get("errors", []) if isinstance(e, dict)]
        return f" ({'; '.join(m for m in msgs if m)[:200]})" if any(msgs) else ""
    except Exception:  # noqa: BLE001 - only for a nicer message
        return ""


def _first_line(exc: BaseException) -> str:

    # requests wraps the socket error in two layers of repr: say just "[Errno 111] Connection refused"
    errno_text = re.search(r"\[Errno -?\d+\] [^'\")]+", str(exc))
    if errno_text:
        return printable(errno_text.group(0))
    text = str(exc).strip().splitlines()
    return printable(text[0][:300] if text else type(exc).__name__)

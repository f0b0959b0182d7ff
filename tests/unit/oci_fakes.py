"""A small in-memory OCI registry WITH the OCI 1.1 referrers API (and `OCI-Subject` on manifest PUT), optionally
behind the bearer-token flow, for unit tests of what the test bed's distribution 2.8 cannot show."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeRegistry:
    def __init__(
        self, *, token_user: str | None = None, token_password: str | None = None, ranges: bool = True
    ) -> None:
        self.ranges = ranges
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[bytes, str]] = {}  # digest -> (body, media type)
        self.tags: dict[str, dict[str, str]] = {}  # repo -> tag -> digest
        self.uploads: dict[str, bytearray] = {}
        self.subjects: dict[str, list[dict[str, Any]]] = {}  # subject digest -> descriptors
        self.creds = (token_user, token_password) if token_user else None
        self.token = "good-token"
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        # shutdown() waits for serve_forever's next poll: 0.5 s by default, at every test's teardown
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        reg = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _authorized(self) -> bool:
                if reg.creds is None:
                    return True
                if self.headers.get("Authorization") == f"Bearer {reg.token}":
                    return True
                self._body()
                realm = f"http://{reg.host}/token"
                self._send(401, b"{}", {"Www-Authenticate": f'Bearer realm="{realm}",service="fake",scope="x"'})
                return False

            def _token(self) -> None:
                want = base64.b64encode(f"{reg.creds[0]}:{reg.creds[1]}".encode()).decode() if reg.creds else ""
                if self.headers.get("Authorization") == f"Basic {want}":
                    self._send(200, json.dumps({"token": reg.token}).encode())
                else:
                    self._send(401, b"{}")

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                reg.requests.append(f"{self.command} {self.path}")
                if self.path.startswith("/token"):
                    return self._token()
                if not self._authorized():
                    return None
                if self.path == "/v2/":
                    return self._send(200, b"{}")
                m = re.fullmatch(r"/v2/(.+)/(blobs|manifests|referrers)/([^?]+)(\?.*)?", self.path)
                t = re.fullmatch(r"/v2/(.+)/tags/list(\?.*)?", self.path)
                if t:
                    return self._send(200, json.dumps({"tags": sorted(reg.tags.get(t.group(1), {}))}).encode())
                if not m:
                    return self._send(404)
                repo, kind, ref = m.group(1), m.group(2), m.group(3)
                if kind == "blobs":
                    data = reg.blobs.get(ref)
                    if data is None:
                        return self._send(404)
                    rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                    if rng and reg.ranges:
                        start = int(rng.group(1))
                        cr = f"bytes {start}-{len(data) - 1}/{len(data)}"
                        return self._send(206, data[start:], {"Content-Range": cr})
                    return self._send(200, data)
                if kind == "referrers":
                    want = re.search(r"artifactType=([^&]+)", m.group(4) or "")
                    entries = [
                        e for e in reg.subjects.get(ref, []) if want is None or e.get("artifactType") == want.group(1)
                    ]
                    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}
                    index["manifests"] = entries
                    ctype = {"Content-Type": "application/vnd.oci.image.index.v1+json"}
                    return self._send(200, json.dumps(index).encode(), ctype)
                digest = reg.tags.get(repo, {}).get(ref, ref)
                if digest not in reg.manifests:
                    return self._send(404)
                body, media = reg.manifests[digest]
                return self._send(200, body, {"Content-Type": media, "Docker-Content-Digest": digest})

            def do_POST(self) -> None:
                reg.requests.append(f"POST {self.path}")
                if not self._authorized():
                    return
                self._body()
                m = re.fullmatch(r"/v2/(.+)/blobs/uploads/", self.path)
                if not m:
                    return self._send(404)
                upload = uuid.uuid4().hex
                reg.uploads[upload] = bytearray()
                self._send(202, b"", {"Location": f"/v2/{m.group(1)}/blobs/uploads/{upload}"})

            def do_PATCH(self) -> None:
                reg.requests.append(f"PATCH {self.path}")
                if not self._authorized():
                    return
                upload = self.path.rsplit("/", 1)[1]
                reg.uploads[upload] += self._body()
                self._send(202, b"", {"Location": self.path})

            def do_PUT(self) -> None:
                reg.requests.append(f"PUT {self.path}")
                if not self._authorized():
                    return
                body = self._body()
                up = re.fullmatch(r"/v2/(.+)/blobs/uploads/([0-9a-f]+)\?digest=(sha256:[0-9a-f]+)", self.path)
                if up:
                    data = bytes(reg.uploads.pop(up.group(2)) + body)
                    if f"sha256:{hashlib.sha256(data).hexdigest()}" != up.group(3):
                        return self._send(400, b'{"errors":[{"message":"digest invalid"}]}')
                    reg.blobs[up.group(3)] = data
                    return self._send(201, b"", {"Docker-Content-Digest": up.group(3)})
                m = re.fullmatch(r"/v2/(.+)/manifests/(.+)", self.path)
                if not m:
                    return self._send(404)
                digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
                media = self.headers.get("Content-Type", "")
                reg.manifests[digest] = (body, media)
                if not m.group(2).startswith("sha256:"):
                    reg.tags.setdefault(m.group(1), {})[m.group(2)] = digest
                headers = {"Docker-Content-Digest": digest}
                doc = json.loads(body)
                if isinstance(doc.get("subject"), dict):
                    subject = doc["subject"]["digest"]
                    reg.subjects.setdefault(subject, []).append(
                        {"mediaType": media, "digest": digest, "size": len(body), "artifactType": doc["artifactType"]}
                    )
                    headers["OCI-Subject"] = subject
                return self._send(201, b"", headers)

        return Handler

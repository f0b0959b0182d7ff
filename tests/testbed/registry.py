"""A real OCI registry on loopback for tests and benchmarks: Debian's `docker-registry` (distribution 2.8).

Started as a child process (`docker-registry serve CONFIG`) on 127.0.0.1 and a free port, with a generated
config and a temporary storage directory; stopped and removed by `close()`. Distribution 2.8 has no OCI 1.1
referrers API (GET /v2/<repo>/referrers/<digest> answers 404), so it is the test bed's "registry without the
referrers API": clients must use the referrers tag schema there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BINARY = "docker-registry"
HTPASSWD = "htpasswd"  # apache2-utils: distribution's htpasswd auth takes bcrypt entries only


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRegistry:
    def __init__(
        self, base: Path | None = None, *, start_timeout: float = 30.0, basic_auth: tuple[str, str] | None = None
    ) -> None:
        """`basic_auth`: (user, password) the registry requires (distribution's htpasswd, bcrypt: `htpasswd -B`)."""
        self.dir = Path(tempfile.mkdtemp(prefix="hostguard-registry-", dir=base))
        self.storage = self.dir / "storage"
        self.storage.mkdir()
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.config = self.dir / "config.yml"
        auth = ""
        if basic_auth is not None:
            users = self.dir / "htpasswd"
            line = subprocess.run(
                [HTPASSWD, "-nbB", *basic_auth], capture_output=True, text=True, check=True
            ).stdout.strip()
            users.write_text(line + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: hostguard-test\n    path: {users}\n"
        self.config.write_text(
            f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {self.storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{self.port}
{auth}"""
        )
        self.log = self.dir / "registry.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [BINARY, "serve", str(self.config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait(start_timeout)
        except BaseException:
            self.close()
            raise

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as err:
                if err.code == 401:  # up, and asking for credentials
                    return
                time.sleep(0.05)
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not answer /v2/ within {timeout}s")

    def url(self, repo: str) -> str:
        return f"oci://{self.host}/{repo}"

    def blob_file(self, digest: str) -> Path:
        """Where distribution's filesystem driver keeps a blob (what an attacker on the registry would edit)."""
        hexd = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalRegistry:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class CuttingProxy:
    """A TCP proxy on loopback in front of a registry that drops the first connection whose answer passes
    `limit` bytes, exactly there (a network failure in mid-download); every other byte passes unchanged."""

    def __init__(self, target_port: int, limit: int) -> None:
        import threading

        self.limit = limit
        self.cut = False
        self.target_port = target_port
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.server.settimeout(0.2)
        self.host = f"127.0.0.1:{self.server.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if answers and not self.cut and sent + len(data) >= self.limit:
                    self.cut = True
                    dst.sendall(data[: self.limit - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        self._thread.join(2)

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

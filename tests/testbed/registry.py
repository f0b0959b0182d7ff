"""A real OCI registry on loopback for tests and benchmarks: Debian's `docker-registry` (distribution 2.8).

Started as a child process (`docker-registry serve CONFIG`) on 127.0.0.1 and a free port, with a generated
config and a temporary storage directory; stopped and removed by `close()`. Distribution 2.8 has no OCI 1.1
referrers API (GET /v2/<repo>/referrers/<digest> answers 404), so it is the test bed's "registry without the
referrers API": clients must use the referrers tag schema there.
"""

from __future__ import annotations

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRegistry:
    def __init__(self, base: Path | None = None, *, start_timeout: float = 30.0) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hostguard-registry-", dir=base))
        self.storage = self.dir / "storage"
        self.storage.mkdir()
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.config = self.dir / "config.yml"
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
"""
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

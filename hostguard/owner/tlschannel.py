"""Keys, ephemeral certificates and TLS 1.3 over any byte stream, with the peer's certificate as the only anchor.

The TLS engine is `ssl.SSLObject` over memory BIOs, so the same code runs over a TCP or unix socket (owner,
relay) and over a virtio-serial character device (guest agent). Pure apart from `ssl`; part of the guest
bundle. Keys are Ed25519. Private keys reach OpenSSL through memfd files, never a file on disk.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import ssl
from typing import Any, Protocol

from hostguard.errors import FormatError
from hostguard.owner.protocol import (
    MAX_FRAME,
    AuthenticationError,
    ChannelError,
    encode_frame,
    frame_length,
    parse_frame,
)

CERT_LIFETIME = dt.timedelta(days=1)  # on each side of `now`: tolerates clock skew, pins do the real work
MAX_SKIP = 64 * 1024  # garbage a reader skips while looking for a hello (stale bytes of an earlier session)


class Stream(Protocol):
    """A byte stream: `recv` returns b"" at end of stream and raises TimeoutError/OSError on failure."""

    def recv(self, n: int, /) -> bytes: ...

    def sendall(self, data: bytes, /) -> None: ...


# --- keys and certificates ----------------------------------------------------------------------------------------


def generate_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def private_key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def load_private_key(pem: bytes, what: str = "private key") -> Any:
    """An unencrypted PEM Ed25519 private key. FormatError for anything else."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{what} is not an unencrypted PEM private key: {str(exc)[:80]}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FormatError(f"{what} is not an Ed25519 key")
    return key


def ephemeral_cert(key: Any, role: str, now: dt.datetime) -> bytes:
    """A fresh self-signed certificate (DER) for `key`, valid `CERT_LIFETIME` around `now`, random serial."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    naive = now.astimezone(dt.UTC).replace(tzinfo=None) if now.tzinfo else now
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"hostguard-{role}")])
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1 or 1)
        .not_valid_before(naive - CERT_LIFETIME)
        .not_valid_after(naive + CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, None)
    )
    return bytes(cert.public_bytes(serialization.Encoding.DER))


def tls_context(*, server: bool, key: Any, cert_der: bytes, peer_cert_der: bytes) -> ssl.SSLContext:
    """TLS 1.3 only, mutual, trusting exactly `peer_cert_der` (no hostname: the pin is the identity)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if not server:
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server:
        ctx.num_tickets = 0  # no resumption: every session is a full, freshly pinned handshake
    cert_pem = x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM)
    fds = [_memfd("hg-cert", cert_pem), _memfd("hg-key", private_key_pem(key))]
    try:
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)
    try:
        ctx.load_verify_locations(cadata=peer_cert_der)
    except ssl.SSLError as exc:
        raise FormatError(f"peer certificate is unusable as a trust anchor: {exc.reason}") from None
    return ctx


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
    except OSError:
        os.close(fd)
        raise
    return fd


# --- streams ----------------------------------------------------------------------------------------------------


class Buffered:
    """A stream with a read buffer, for reading a cleartext line and then handing the rest to TLS."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._buf = bytearray()

    def recv(self, n: int, /) -> bytes:
        if self._buf:
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out
        return self.stream.recv(n)

    def sendall(self, data: bytes, /) -> None:
        self.stream.sendall(data)

    def read_line(self, magic: bytes, limit: int) -> bytes:
        """The next line starting with `magic` (bytes before the magic are skipped, up to MAX_SKIP)."""
        skipped = 0
        while True:
            start = self._buf.find(magic)
            if start < 0:
                keep = len(magic) - 1
                drop = max(0, len(self._buf) - keep)
                skipped += drop
                del self._buf[:drop]
            else:
                skipped += start
                del self._buf[:start]
                end = self._buf.find(b"\n")
                if end >= 0:
                    if end + 1 > limit:
                        raise FormatError(f"line is longer than {limit} bytes")
                    line = bytes(self._buf[: end + 1])
                    del self._buf[: end + 1]
                    return line
                if len(self._buf) > limit:
                    raise FormatError(f"line is longer than {limit} bytes")
            if skipped > MAX_SKIP:
                raise FormatError(f"no {magic.decode().strip()} line within {MAX_SKIP} bytes")
            chunk = self.stream.recv(4096)
            if not chunk:
                raise ChannelError("connection closed before the hello")
            self._buf += chunk


class TlsChannel:
    """One TLS 1.3 connection over a stream, with length-prefixed JSON frames."""

    def __init__(self, ctx: ssl.SSLContext, stream: Stream, *, server_side: bool) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        self._stream = stream

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self._stream.sendall(data)

    def _fill(self) -> None:
        data = self._stream.recv(65536)
        if not data:
            raise ChannelError("peer closed the connection")
        self._in.write(data)

    def handshake(self, *, flush: bool = True) -> None:
        """Run the TLS 1.3 handshake. flush=False (client side) keeps the last flight (the client Finished)
        buffered so that the first frame leaves in the same write: one wake-up less on a slow port."""
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
            except ssl.SSLError as exc:
                self._flush_quietly()  # our alert tells the peer why
                raise AuthenticationError(f"TLS handshake failed: {exc.reason or exc}") from None
        if self._obj.version() != "TLSv1.3":
            raise AuthenticationError(f"negotiated {self._obj.version()}, not TLSv1.3")
        if flush:
            self._flush()

    def _flush_quietly(self) -> None:
        try:
            self._flush()
        except (OSError, ChannelError):
            return  # the peer is gone already (a virtio-serial port says so with ChannelError)

    def peer_cert(self) -> bytes:
        der = self._obj.getpeercert(binary_form=True)
        if not der:
            raise AuthenticationError("peer presented no certificate")
        return der

    def send(self, data: bytes) -> None:
        self._obj.write(data)
        self._flush()

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self._obj.read(n - len(buf))
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
                continue
            except ssl.SSLZeroReturnError:
                raise ChannelError("peer closed the TLS session") from None
            except ssl.SSLError as exc:
                raise AuthenticationError(f"TLS failed: {exc.reason or exc}") from None
            if not chunk:
                raise ChannelError("peer closed the TLS session")
            buf += chunk
        return bytes(buf)

    def send_frame(self, obj: dict[str, Any]) -> None:
        self.send(encode_frame(obj))

    def recv_frame(self, expect: tuple[str, ...], limit: int = MAX_FRAME) -> dict[str, Any]:
        length = frame_length(self.recv_exact(4), limit)
        return parse_frame(self.recv_exact(length), expect)

    def close(self) -> None:
        """Send close_notify (best effort: the peer may be gone, e.g. right after `bye`)."""
        with contextlib.suppress(ssl.SSLError, ValueError):  # SSLWantReadError: we do not wait for the peer's
            self._obj.unwrap()
        self._flush_quietly()

"""A memo of `parse_domain_xml` in the state store, for the hook: importing lxml alone costs ~12 ms of a hook run.

`parse_domain_xml` is a pure function of the bytes (and of its code and lxml), so its result can be memoized.
The key covers the exact bytes, except that libvirt's live XML begins with the domain id, which changes on every
start: when the whole root start tag is exactly `<domain type='T' id='N'>` (optionally with libvirt's qemu
namespace declaration), the id is left out of the key. The parser never reads that attribute, and with the whole
tag matched it is the only one of its name, so both spellings parse alike. Anything else is keyed as it is.
Refusals are never cached.
"""

from __future__ import annotations

import importlib.util
import os

from hostguard import __version__, record
from hostguard.domain import spec as domainspec
from hostguard.domain import xmlparse
from hostguard.domain.spec import DomainSpec, spec_from_json, spec_to_json
from hostguard.domain.xmlparse import MAX_XML_BYTES, parse_domain_xml
from hostguard.errors import HostguardError
from hostguard.host.digest import sha256_hex

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING

_LIVE_HEADS = (b"<domain type='kvm' id='", b"<domain type='qemu' id='")
_LIVE_TAILS = (b">", b" xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>")
CACHE_FORMAT = b"hostguard-domainxml/1"

if TYPE_CHECKING:
    from typing import Protocol

    class ParseCache(Protocol):
        def cached_parse(self, key: str) -> str | None: ...

        def store_parse(self, key: str, result: str) -> None: ...


def _code_identity() -> bytes | None:
    """What the parse result depends on besides the bytes: this code and the installed lxml (by file identity:
    an upgrade replaces the files). None when that cannot be told: then nothing is cached."""
    parts = [__version__]
    try:
        lxml = importlib.util.find_spec("lxml")
        files = [xmlparse.__file__, __file__, domainspec.__file__, record.__file__, lxml.origin if lxml else None]
        for name in files:
            if name is None:
                return None
            st = os.stat(name)
            parts.append(f"{name}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
    except (OSError, ValueError, ImportError):
        return None
    return "\0".join(parts).encode()


def _without_live_id(data: bytes) -> bytes:
    """`data` without the ` id='N'` of a root start tag that is exactly libvirt's live one (see above)."""
    for head in _LIVE_HEADS:
        if data.startswith(head):
            end = data.find(b"'", len(head))
            if end < 0:
                return data
            digits, tail = data[len(head) : end], data[end + 1 :]
            if 0 < len(digits) <= 10 and digits.isdigit() and tail.startswith(_LIVE_TAILS):
                return data[: len(head) - len(b" id='")] + tail
    return data


def parse_cache_key(data: bytes) -> str | None:
    """The cache key of these XML bytes, or None when they must be parsed every time."""
    code = _code_identity()
    if code is None or len(data) > MAX_XML_BYTES:
        return None
    data = _without_live_id(data)
    return sha256_hex(CACHE_FORMAT, b"\0", code, b"\0", data)


def parse_domain_xml_cached(data: bytes, cache: ParseCache | None) -> DomainSpec:
    """`parse_domain_xml`, memoized in `cache` (the state store). Same result, same refusals."""
    key = None if cache is None else parse_cache_key(data)
    if cache is None or key is None:
        return parse_domain_xml(data)
    hit = cache.cached_parse(key)
    if hit is not None:
        try:
            return spec_from_json(hit)
        except ValueError:
            pass  # an entry this code cannot read: parse again and replace it
    spec = parse_domain_xml(data)
    try:
        cache.store_parse(key, spec_to_json(spec))
    except HostguardError as exc:  # a cache that cannot be written costs speed, never correctness
        import logging

        logging.getLogger(__name__).warning("domain XML parse cache not updated: %s", exc)
    return spec

"""The effective view of a signed image set through its overlays, as both the daemon's disk stage and the hook's
pre-boot overlay check read it: the base images' index (built once, cached in the state directory by the bases'
digests) and the view's file list, found incrementally from what the overlays allocate.

Callers map errors to their own findings: `ChainMismatch` (a layer is not the recorded file), `ImageError`
(unreadable), `MALFORMED_INPUT_ERRORS` (malformed guest data).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from hostguard.errors import HostguardError
from hostguard.host.fsutil import atomic_write
from hostguard.imagefs.chain import ChainImage, LayerRecord, open_chain
from hostguard.imagefs.diskindex import DiskIndex, build_index
from hostguard.imagefs.fast import FastReader
from hostguard.imagefs.incremental import DeltaStats, effective_inventory
from hostguard.imagefs.inventory import inventory
from hostguard.signed.manifest import FileEntry

log = logging.getLogger("hostguard.imagefs.overlayview")
INDEX_DIR = "disk-index"
MEMO_SIZE = 4


class _Memo:
    """The last few indexes used, in memory (the daemon checks the same bases again and again)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[str, DiskIndex] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str) -> DiskIndex | None:
        with self.lock:
            found = self.items.get(key)
            if found is not None:
                self.items.move_to_end(key)
            return found

    def put(self, key: str, index: DiskIndex) -> None:
        with self.lock:
            self.items[key] = index
            while len(self.items) > self.size:
                self.items.popitem(last=False)


_memo = _Memo(MEMO_SIZE)


def index_key(digests: list[str]) -> str:
    return hashlib.sha256("\0".join(digests).encode()).hexdigest()


def load_or_build_index(state_dir: Path, base: Callable[[], FastReader], digests: list[str]) -> tuple[DiskIndex, bool]:
    """The index of the base images with these digests: from memory, the state directory, or built now (the
    reader on the bases is asked for only then)."""

    key = index_key(digests)
    found = _memo.get(key)
    if found is not None:
        return found, False
    path = state_dir / INDEX_DIR / f"{key}.json"
    try:
        doc = json.loads(path.read_bytes())
        index = DiskIndex.from_json(doc)
        if index.digests != digests:
            raise ValueError("index of other images")
        _memo.put(key, index)
        return index, False
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("rebuilding the disk index %s: %s", path, err)
    index = build_index(base(), digests)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, json.dumps(index.to_json(), separators=(",", ":")).encode(), mode=0o600)
    except (OSError, HostguardError) as err:
        log.warning("disk index not cached at %s: %s", path, err)  # costs speed next time, not correctness
    _memo.put(key, index)
    return index, True


@contextmanager
def open_bases(chains_of_disks: Sequence[Sequence[LayerRecord]]) -> Iterator[FastReader]:
    """A fast reader on the signed base layers alone (the last layer of each recorded chain, top first, one disk
    each, in manifest order)."""
    chains: list[ChainImage] = []
    try:
        for i, layers in enumerate(chains_of_disks):
            # The base of a chain is a backing file QEMU opens read-only (a single layer is the writable disk).
            chains.append(open_chain([layers[-1]], i, read_only_base=len(layers) > 1))
    except BaseException:
        for c in chains:
            c.close()
        raise
    reader = FastReader(disks=chains, replay_journal=True)
    try:
        yield reader
    finally:
        reader.close()


class LazyBases:
    """The reader on the signed bases (`open_bases`), opened on first use: to build their index, or to compare
    what an overlay changed with them. An overlay that allocates nothing needs neither (its view is the verified
    bases' bytes, its files the index's), so its check parses no file system: ext4, XFS and Btrfs cost the same."""

    def __init__(self, chains_of_disks: Sequence[Sequence[LayerRecord]]) -> None:
        self._chains = chains_of_disks
        self._stack = ExitStack()
        self._reader: FastReader | None = None

    def __call__(self) -> FastReader:
        if self._reader is None:
            self._reader = self._stack.enter_context(open_bases(self._chains))
        return self._reader

    def __enter__(self) -> LazyBases:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()


def effective_files(
    disks: Sequence[Sequence[LayerRecord]], index: DiskIndex | None, base: Callable[[], FastReader] | None
) -> tuple[tuple[FileEntry, ...], DeltaStats]:
    """The file list of the set's disks as the guest sees them (each disk's chain top first, manifest order):
    incremental against `index` when there is one, else a full inventory of the view."""
    chains: list[ChainImage] = []
    try:
        for i, layers in enumerate(disks):
            chains.append(open_chain(layers, i))
        if index is not None and base is not None:
            changed = [c.changed() for c in chains]
            if not any(changed):  # the view is the verified bases' bytes: no reader needed (LazyBases)
                return index.files, DeltaStats()
        with FastReader(disks=chains, replay_journal=True) as view:
            assert isinstance(view, FastReader)
            if index is None or base is None:
                started = time.monotonic()
                result = inventory(view)
                stats = DeltaStats(mode="full", reason="no base to compare with", walked_nodes=result.nodes,
                                   hashed_files=result.hashed_files, hashed_bytes=result.hashed_bytes,
                                   seconds=time.monotonic() - started)  # fmt: skip
                return result.files, stats
            return effective_inventory(index, base(), view, changed)
    finally:
        for c in chains:
            c.close()

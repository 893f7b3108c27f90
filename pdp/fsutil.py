"""Files that survive a power cut, and checksums that catch the bits that did not.

Durability: :func:`atomic_writer` writes a temp file beside the target, fsyncs it, renames
it onto the target and fsyncs the directory (a rename is only durable once its directory
is); :func:`make_dir` creates directories (mode 0700) and fsyncs each parent it added an
entry to. Everything here is created owner-only (files 0600, directories 0700): the spool
holds other people's data. On macOS ``fsync`` does not flush the drive's cache, so
:func:`fsync_fd` uses ``F_FULLFSYNC`` there.

Checksums: a stored input gets a *sidecar* beside it (``<name>.sums``) of CRC-32s, one per
:data:`SUM_BLOCK` bytes, written before the file itself is renamed into place (a file never
appears without its sidecar). :class:`BlockSums` builds one incrementally from writes of
any size; :func:`read_sums` loads one (:func:`load_sums`: a damaged one counts as none);
:func:`verified_blocks` reads a byte range back, checking every block it touches. CRC-32 (zlib) finds every burst error up to 32 bits and
runs at about 1.6 GB/s on the test VM (SHA-256 measured 1.3 GB/s there thanks to SHA
instructions, but runs at a third of that on machines without them).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from pdp.errors import PdpError

log = logging.getLogger("pdp.fsutil")

FILE_MODE = 0o600
DIR_MODE = 0o700
SUM_BLOCK = 64 * 1024  # bytes per CRC in a sidecar: a range read verifies at most 2 blocks more than it needs
SUMS_MAGIC = b"PDPS"
SUMS_SUFFIX = ".sums"


class Damaged(PdpError):
    """Stored or received bytes do not match their checksum: this copy must not be used."""


# -- durability ----------------------------------------------------------------------------


def fsync_fd(fd: int) -> None:
    """Flush a file descriptor's data to stable storage (the drive's cache too on macOS)."""
    if sys.platform == "darwin":  # pragma: no cover - macOS only
        import fcntl

        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync an existing file by path (written by someone else, e.g. a pool process)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


def make_dir(path: str | os.PathLike[str], mode: int = DIR_MODE, durable: bool = True) -> Path:
    """Create ``path`` and missing parents with ``mode`` (an existing one keeps its mode);
    with ``durable``, fsync the parent of every directory created, so the new entries
    survive a power cut."""
    target = Path(path)
    missing: list[Path] = []
    probe = target
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for new in reversed(missing):
        try:
            os.mkdir(new, mode)
        except FileExistsError:
            continue
        os.chmod(new, mode)  # mkdir's mode is filtered by the umask
        if durable:
            fsync_dir(new.parent)
    return target


@contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int = FILE_MODE, durable: bool = True,
                  sync_dir: bool | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it is fsynced (unless not ``durable``), renamed
    onto ``path``, and the directory fsynced (the rename is durable too).

    On an exception the temp file is removed and ``path`` is untouched, so a reader
    never sees a partial file. Intermediate files that the party can recompute (map and
    reduce outputs) skip both fsyncs: after a power cut they are redone. ``sync_dir=False``
    leaves the directory to a later durable write in the same directory (its fsync makes
    every earlier rename there durable too).
    """
    target = Path(path)
    fd, tmp = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), mode)  # whatever the umask
            if durable:
                fsync_fd(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable if sync_dir is None else sync_dir:
        fsync_dir(target.parent)


_serial = itertools.count()


def _create_temp(target: Path) -> tuple[int, str]:
    """A new temp file (0600) beside ``target``, named by process and a counter (cheaper
    than mkstemp's random names, which cost a noticeable share of a small map task)."""
    while True:
        tmp = str(target.parent / f".{target.name}.{os.getpid()}.{next(_serial)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), tmp
        except FileExistsError:  # left by an earlier process with the same pid
            continue


def atomic_write(path: str | os.PathLike[str], data: bytes | Iterable[bytes], mode: int = FILE_MODE,
                 durable: bool = True, sync_dir: bool | None = None) -> None:
    """Write ``data`` (bytes or an iterable of bytes) to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, mode, durable, sync_dir) as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            for part in data:
                f.write(part)


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def crc32_file(path: str | Path) -> int:
    """The CRC-32 (zlib) of a file's bytes."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def check_sha256(path: str | Path, expected: str, what: str) -> None:
    """Raise :class:`Damaged` unless the file's SHA-256 is ``expected``."""
    got = sha256_file(path)
    if got != expected:
        raise Damaged(f"{what} is damaged: SHA-256 {got[:12]}..., recorded {expected[:12]}...")


# -- block checksums (sidecars) ------------------------------------------------------------


def sums_path(path: str | os.PathLike[str]) -> Path:
    """The sidecar of block checksums kept beside ``path``."""
    p = Path(path)
    return p.with_name(p.name + SUMS_SUFFIX)


class BlockSums:
    """CRC-32 per :data:`SUM_BLOCK` bytes of a stream, fed by writes of any size."""

    def __init__(self) -> None:
        self.sums: list[int] = []
        self._crc = 0
        self._fill = 0  # bytes of the current (unfinished) block

    def update(self, data: bytes | memoryview) -> None:
        view, k = memoryview(data), 0
        while k < len(view):
            take = min(SUM_BLOCK - self._fill, len(view) - k)
            self._crc = zlib.crc32(view[k:k + take], self._crc)
            self._fill += take
            k += take
            if self._fill == SUM_BLOCK:
                self.sums.append(self._crc)
                self._crc = self._fill = 0

    def finish(self) -> list[int]:
        """Every block's CRC (the last one may be short)."""
        if self._fill:
            self.sums.append(self._crc)
            self._crc = self._fill = 0
        return self.sums


def encode_sums(sums: list[int], size: int) -> bytes:
    """A sidecar's bytes: magic, block size, file size, count, the CRCs, a CRC of all that."""
    body = SUMS_MAGIC + struct.pack(f"<IQI{len(sums)}I", SUM_BLOCK, size, len(sums), *sums)
    return body + struct.pack("<I", zlib.crc32(body))


def write_sums(path: str | os.PathLike[str], sums: list[int], size: int, durable: bool = False) -> None:
    """Store the sidecar of ``path`` atomically, just before ``path`` itself is renamed into
    place (the directory fsync after that rename covers the sidecar's entry too).

    Not fsynced by default: a sidecar only guards its file, and one lost or torn by a power
    cut is read as absent (:func:`load_sums`), never as damage of the file. That saves an
    fsync per stored copy, which small jobs feel."""
    atomic_write(sums_path(path), encode_sums(sums, size), durable=durable, sync_dir=False)


def read_sums(path: str | os.PathLike[str]) -> tuple[list[int], int] | None:
    """(block CRCs, file size) from the sidecar of ``path``; None if it has none.
    A damaged sidecar raises :class:`Damaged`."""
    try:
        raw = sums_path(path).read_bytes()
    except FileNotFoundError:
        return None
    if len(raw) < 24 or raw[:4] != SUMS_MAGIC or zlib.crc32(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]:
        raise Damaged(f"the checksums of {Path(path).name} are damaged")
    block, size, count = struct.unpack("<IQI", raw[4:20])
    if block != SUM_BLOCK or len(raw) != 24 + 4 * count or count != -(-size // SUM_BLOCK):
        raise Damaged(f"the checksums of {Path(path).name} do not fit the file")
    return list(struct.unpack(f"<{count}I", raw[20:-4])), size


def load_sums(path: str | os.PathLike[str]) -> tuple[list[int], int] | None:
    """Like :func:`read_sums`, but a damaged sidecar counts as none (logged): it says
    nothing about the file it describes, which is then used unchecked."""
    try:
        return read_sums(path)
    except Damaged as exc:
        log.warning("%s; using %s unchecked", exc, Path(path).name)
        return None


def verified_blocks(f: BinaryIO, sums: list[int], size: int, start: int, end: int, what: str,
                    chunk: int = 16 * SUM_BLOCK) -> Iterator[bytes]:
    """Bytes [start, end) of the open file ``f`` in pieces of at most ``chunk``, each
    block they touch checked against ``sums`` first; :class:`Damaged` names the offset."""
    assert chunk % SUM_BLOCK == 0, "pieces must hold whole blocks"
    if end > size:
        raise Damaged(f"{what} is shorter than its checksums say ({size} bytes)")
    if start >= end:
        return
    pos = start - start % SUM_BLOCK  # whole blocks only: a block's CRC covers all of it
    f.seek(pos)
    while pos < end:
        data = f.read(min(chunk, -(-(end - pos) // SUM_BLOCK) * SUM_BLOCK))
        if not data:
            raise Damaged(f"{what} ends at {pos} bytes, its checksums say {size}")
        _check_blocks(data, sums, pos, what)
        lo, hi = max(start - pos, 0), min(end - pos, len(data))
        yield data[lo:hi] if (lo, hi) != (0, len(data)) else data
        pos += len(data)


def _check_blocks(data: bytes, sums: list[int], pos: int, what: str) -> None:
    view = memoryview(data)
    for k in range(0, len(data), SUM_BLOCK):
        b = (pos + k) // SUM_BLOCK
        if b >= len(sums) or zlib.crc32(view[k:k + SUM_BLOCK]) != sums[b]:
            raise Damaged(f"{what} is damaged: bytes {pos + k}-{pos + k + len(view[k:k + SUM_BLOCK])} "
                          "do not match their checksum")


def check_range(path: str | os.PathLike[str], start: int, end: int) -> bool:
    """Check the blocks holding bytes [start, end) of ``path`` against its sidecar;
    False if it has none, :class:`Damaged` if they do not match."""
    found = load_sums(path)
    if found is None:
        return False
    sums, size = found
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            raise Damaged(f"{Path(path).name} is damaged: its size is not the one its checksums record")
        for _ in verified_blocks(f, sums, size, start, min(end, size), Path(path).name):
            pass
    return True

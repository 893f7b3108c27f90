"""A user job's code bundle: its source file and its ``FILES``, as one msgpack map.

``{"v": 1, "files": {basename: bytes}}``. Names are plain file names (no directories, no
dot files), so unpacking cannot write outside the job's code directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack

from pdp.errors import InputError

MAX_BUNDLE = 16 << 20
MAX_FILES = 64


def _check_name(name: Any) -> str:
    if type(name) is not str or not name or name.startswith(".") or "/" in name or "\\" in name \
            or name != os.path.basename(name) or len(name) > 255:
        raise InputError(f"bad file name in a job's code bundle: {str(name)[:80]!r}")
    return name


def make_bundle(main: Path, files: list[Path]) -> bytes:
    """The bundle of a job file and the files it names in ``FILES``."""
    out: dict[str, bytes] = {}
    for path in [main, *files]:
        name = _check_name(path.name)
        if name in out:
            raise InputError(f"two files called {name} in the job's FILES")
        try:
            out[name] = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {path} for the job: {exc.strerror}") from None
    data = msgpack.packb({"v": 1, "files": out}, use_bin_type=True)
    if len(data) > MAX_BUNDLE:
        raise InputError(f"the job's code and FILES take {len(data)} bytes, more than {MAX_BUNDLE >> 20} MiB: "
                         "ship data as job input instead")
    return data


def read_bundle(data: bytes) -> dict[str, bytes]:
    """The files of a bundle (checked: names, count, types)."""
    try:
        doc = msgpack.unpackb(data, raw=False, max_bin_len=MAX_BUNDLE, max_map_len=MAX_FILES + 2)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InputError(f"a job's code bundle is damaged: {exc}") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or len(files) > MAX_FILES:
        raise InputError("a job's code bundle holds no file map")
    out = {}
    for name, body in files.items():
        if type(body) is not bytes:
            raise InputError("a job's code bundle holds something other than file bytes")
        out[_check_name(name)] = body
    return out

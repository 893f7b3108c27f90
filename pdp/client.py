"""The submitter's side: talk to any member to submit, wait for, fetch and list jobs.

Used by the CLI, the demo and the tests. Inputs are files on the submitter's machine: their
bytes are streamed to the member, so members need no shared file system. The output is
written atomically (temp file, fsync, rename) and checked against the party's SHA-256.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdp.errors import InputError, PdpError, ProtocolError
from pdp.fsutil import atomic_writer
from pdp.streams import BLOCK
from pdp.transport import Connection, dial

Progress = Callable[[dict[str, Any]], None]


def new_job_id(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def check_inputs(paths: list[Path]) -> list[tuple[Path, int]]:
    """Each input must be a readable regular file; say which one is not and why."""
    checked = []
    for path in paths:
        if not path.exists():
            raise InputError(f"input {path} does not exist")
        if not path.is_file():
            raise InputError(f"input {path} is not a regular file")
        if not os.access(path, os.R_OK):
            raise InputError(f"input {path} is not readable (check its permissions)")
        checked.append((path, path.stat().st_size))
    if not checked:
        raise InputError("give at least one input file")
    return checked


class Client:
    def __init__(self, node: str, key: bytes) -> None:
        self.node = node
        self.key = key
        self.conn: Connection | None = None

    async def __aenter__(self) -> Client:
        self.conn = await dial(self.node, self.key, f"{getpass.getuser()}@{socket.gethostname()}", "client")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()

    def _conn(self) -> Connection:
        if self.conn is None or self.conn.closed:
            raise PdpError(f"not connected to {self.node}")
        return self.conn

    async def submit(self, kind: str, paths: list[Path], job_id: str, **form: Any) -> dict[str, Any]:
        """Upload the inputs and queue the job; returns the acknowledgement."""
        inputs = check_inputs(paths)
        stream = self._conn().open_stream()
        try:
            await stream.send({"t": "submit", "id": job_id, "kind": kind, "submitter": getpass.getuser(),
                               "inputs": [{"name": str(p), "size": size} for p, size in inputs], **form})
            first = await stream.recv(30.0)
            if first.header["t"] == "accepted":
                return first.header
            for path, size in inputs:
                await _upload(stream, path, size)
            ack = await stream.recv(60.0)
            if ack.header["t"] != "accepted":
                raise ProtocolError(f"unexpected answer {ack.header['t']!r} to submit")
            return ack.header
        finally:
            stream.close()

    async def wait(self, job_id: str, on_progress: Progress | None = None) -> dict[str, Any]:
        """Block until the job is done; failed jobs raise PdpError with the party's reason."""
        stream = self._conn().open_stream()
        try:
            await stream.send({"t": "wait", "id": job_id})
            while True:
                frame = await stream.recv(timeout=None)
                if on_progress is not None:
                    on_progress(frame.header)
                if frame.header["t"] == "done":
                    return frame.header
        finally:
            stream.close()

    async def fetch_result(self, job_id: str, out: Path) -> dict[str, Any]:
        """Write the job's output to ``out`` atomically; verify size and SHA-256."""
        stream = self._conn().open_stream()
        try:
            await stream.send({"t": "result", "id": job_id})
            head = (await stream.recv(30.0)).header
            digest, size = hashlib.sha256(), 0
            with atomic_writer(out) as f:
                while True:
                    frame = await stream.recv(60.0)
                    if frame.header["t"] == "end":
                        break
                    f.write(frame.payload)
                    digest.update(frame.payload)
                    size += len(frame.payload)
                if size != head["size"] or digest.hexdigest() != head["sha256"]:
                    raise PdpError(f"the result of {job_id} arrived damaged ({size} bytes); run `pdp result` again")
            return head
        finally:
            stream.close()

    async def call(self, kind: str, **fields: Any) -> dict[str, Any]:
        frame = await self._conn().request({"t": kind, **fields}, timeout=15.0)
        return frame.header


async def _upload(stream: Any, path: Path, size: int) -> None:
    sent = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            await stream.send({"t": "data"}, block)
            sent += len(block)
    if sent != size:
        raise InputError(f"input {path} changed while it was being sent ({size} -> {sent} bytes)")
    await stream.send({"t": "end"})

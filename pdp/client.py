"""The submitter's side: talk to any member to submit, wait for, fetch and list jobs.

Used by the CLI, the demo and the tests. The user is who its credential proves
(:class:`~pdp.identity.Credential`: a key, a certificate and the party's node ids to pin);
every member it talks to must prove one of those ids. Inputs are files on the submitter's machine: their
bytes are streamed to the member, so members need no shared file system. The output is
written atomically (temp file, fsync, rename) and checked against the party's SHA-256.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from pdp.errors import TRANSIENT, InputError, PdpError, ProtocolError, RemoteError
from pdp.fsutil import atomic_writer
from pdp.identity import Credential, sign
from pdp.jobs.loader import prepare
from pdp.net.tls import PinMismatch
from pdp.net.streams import BLOCK
from pdp.net.transport import Connection, ConnectionLost, dial

Progress = Callable[[dict[str, Any]], None]
SIGNED_REQUESTS = frozenset({"invite", "withdraw", "uninvite"})


def new_job_id(kind: str) -> str:
    """A readable, unguessable job id: ``kind-YYYYmmdd-HHMMSS-`` and 128 random bits in hex."""
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(16)}"


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
    def __init__(self, node: str, cred: Credential) -> None:
        self.node = node
        self.cred = cred
        self.conn: Connection | None = None

    async def __aenter__(self) -> Client:
        if not self.cred.pins:
            raise PdpError("this credential trusts no party node yet (no pins); join with a token first")
        try:
            self.conn = await dial(self.node, self.cred.identity, self.cred.pins)
        except PinMismatch:
            if not await self._refresh():  # a member that joined after this credential learned the party?
                raise
            self.conn = await dial(self.node, self.cred.identity, self.cred.pins)
        return self

    async def _refresh(self) -> bool:
        """Ask a member this credential trusts for the party's current node ids."""
        for fp, addr in sorted(self.cred.addrs.items()):
            if addr == self.node:
                continue
            try:
                conn = await dial(addr, self.cred.identity, fp)
            except (PdpError, OSError):
                continue
            try:
                frame = await conn.request({"t": "whoami"}, timeout=10.0)
            except (PdpError, OSError):
                continue
            finally:
                conn.close()
            before = set(self.cred.pins)
            self.cred.learn(dict(msgpack.unpackb(frame.payload).get("nodes") or {}))
            return self.cred.pins != before
        return False

    async def whoami(self) -> dict[str, Any]:
        """Who the party takes this credential for (name, kind, admin)."""
        return await self.call("whoami")

    async def __aexit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()

    def _conn(self) -> Connection:
        if self.conn is None or self.conn.closed:
            raise PdpError(f"not connected to {self.node}")
        return self.conn

    async def submit(self, job: Any, paths: list[Path], job_id: str | None = None, args: list[str] | None = None,
                     **form: Any) -> dict[str, Any]:
        """Upload the inputs (and a user job's code) and queue the job; returns the acknowledgement.

        ``job`` is a built-in's name, a job file (``JOB.py`` or ``JOB.py:ClassName``) or a job
        class; ``args`` its job arguments. ``form`` fields go into the submit header
        (``chunk_size``, ``reduces``, ``comment``, ``data_type``, ...); the submitter is the
        credential's user (the party takes it from the certificate).
        """
        inputs = check_inputs([Path(p) for p in paths])
        prepared = prepare(job, list(args or []))
        job_id = job_id or new_job_id(prepared.kind.replace("_", "-")[:40])
        spec = dict(prepared.spec)
        model = form.pop("model", None)  # what every map gets (`pdp predict`'s model file)
        if form.get("data_type") and form["data_type"] != "text/utf-8":
            spec["data_type"] = form["data_type"]
        header = {"t": "submit", "id": job_id, "kind": prepared.kind, "spec": spec, "steps": prepared.steps,
                  "inputs": [{"name": str(p), "size": size} for p, size in inputs], **form}
        if prepared.bundle is not None:
            header["code"] = {"size": len(prepared.bundle)}
        packed = b""
        if model is not None:  # in the payload: a model (up to 1 MiB) is bigger than a header may be
            packed = msgpack.packb(model)
            header["model"] = len(packed)
        stream = self._conn().open_stream()
        try:
            await stream.send(header, packed)
            first = await stream.recv(30.0)
            if first.header["t"] == "accepted":
                return first.header
            if prepared.bundle is not None:
                for k in range(0, len(prepared.bundle), BLOCK):
                    await stream.send({"t": "data"}, prepared.bundle[k:k + BLOCK])
                await stream.send({"t": "end"})
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
                frame = await stream.recv(timeout=20.0)  # the gateway speaks every 5 s
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

    async def result(self, job_id: str, out: Path) -> dict[str, Any]:
        """The job's output, written to ``out`` (see :meth:`fetch_result`)."""
        return await self.fetch_result(job_id, Path(out))

    async def progress(self, job_id: str) -> dict[str, Any]:
        """The job now: state, step, maps and reduces done, counters (no tasks)."""
        found = [j for j in await self.jobs() if j["id"] == job_id]
        if not found:
            raise PdpError(f"no job {job_id} in the party (check `pdp jobs`)")
        return found[0]

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Stop a job (your own, or any as an admin)."""
        return await self.call("cancel", id=job_id)

    async def jobs(self) -> list[dict[str, Any]]:
        """Every job the party knows, oldest first."""
        frame = await self._conn().request({"t": "jobs"}, timeout=15.0)
        return list(msgpack.unpackb(frame.payload))

    async def events(self, job_id: str = "", after: int = 0) -> tuple[str, list[dict[str, Any]]]:
        """(the job's state, its events after sequence number ``after``); every job's without an id."""
        frame = await self._conn().request({"t": "events", "job": job_id, "after": after}, timeout=15.0)
        return str(frame.header.get("state", "")), list(msgpack.unpackb(frame.payload))

    async def job(self, job_id: str) -> dict[str, Any]:
        """One job with its tasks (where each ran, attempts, statistics)."""
        frame = await self._conn().request({"t": "job", "id": job_id}, timeout=15.0)
        return {**frame.header, "tasks": msgpack.unpackb(frame.payload)}

    async def call(self, kind: str, timeout: float = 15.0, **fields: Any) -> dict[str, Any]:
        if kind in SIGNED_REQUESTS:  # identity changes carry our signature to the master
            fields["auth"] = sign(self.cred.identity, {"t": kind, **fields})
        frame = await self._conn().request({"t": kind, **fields}, timeout=timeout)
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


class Failover:
    """Carry a job through the loss of the member we talk to: try the next one.

    ``addrs`` starts with the node the user named; the gateway's acknowledgement adds every
    member. Retries are safe: the job id makes submit idempotent, wait and result are reads.
    One connection is kept open and reused by every operation; it is dropped (and the next
    member dialed) only when an operation fails for a reason another member might not have.
    Use as an async context manager, or call :meth:`close`, to close it.
    """

    def __init__(self, addrs: list[str], cred: Credential, patience: float = 120.0) -> None:
        self.addrs = list(dict.fromkeys(addrs))
        self.cred = cred
        self.patience = patience
        self.current = 0
        self.client: Client | None = None

    def learn(self, members: list[str]) -> None:
        self.addrs.extend(a for a in members if a not in self.addrs)

    async def __aenter__(self) -> Failover:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.client is not None:
            if self.client.conn is not None:
                self.client.conn.close()
            self.client = None

    async def _client(self, addr: str) -> Client:
        """The open connection to ``addr``, dialed if there is none (or it has closed)."""
        client = self.client
        if client is not None and client.node == addr and client.conn is not None and not client.conn.closed:
            return client
        self.close()
        client = Client(addr, self.cred)
        await client.__aenter__()
        self.client = client
        return client

    async def run(self, op: Callable[[Client], Any], what: str) -> Any:
        """Run ``op`` against a member; on a lost connection move on to the next, with backoff.

        It gives up after ``patience`` seconds of failures; an attempt that ran longer than that
        before it failed (a long ``wait``) was working, so the next failure starts a new window.
        """
        deadline = time.monotonic() + self.patience
        delay, errors = 0.2, []
        while True:
            addr = self.addrs[self.current % len(self.addrs)]
            started = time.monotonic()
            try:
                return await op(await self._client(addr))
            except (ConnectionLost, RetryLater) as exc:
                errors.append(f"{addr}: {exc}")
            except RemoteError as exc:
                if not _transient(exc):
                    raise
                errors.append(f"{addr}: {exc}")
            self.close()
            if time.monotonic() - started > self.patience:
                deadline, delay = time.monotonic() + self.patience, 0.2
            if time.monotonic() > deadline:
                raise PdpError(f"could not {what} through any member in {self.patience:g} s: {'; '.join(errors[-3:])}")
            self.current += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class RetryLater(PdpError):
    """The member answered but could not help now (no leader yet, ...)."""


def _transient(exc: RemoteError) -> bool:
    return exc.code in TRANSIENT


async def run_job(
    addrs: list[str], cred: Credential, kind: Any, inputs: list[Path], job_id: str, out: Path,
    on_progress: Progress | None = None, **form: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Submit, wait and fetch the result, surviving the loss of any one member."""
    async with Failover(addrs, cred) as party:
        await submit_job(party, kind, inputs, job_id, **form)
        return await follow_job(party, job_id, out, on_progress)


class WaitTimeout(PdpError):
    """The job did not end within the time the caller would wait; it goes on in the party."""

    code = "timeout"


async def submit_job(party: Failover, kind: Any, inputs: list[Path], job_id: str, **form: Any) -> dict[str, Any]:
    """Upload the inputs and queue the job through any member (a retry is safe: the id makes
    submit idempotent); the party learns every member's address from the acknowledgement."""

    async def submit(c: Client) -> dict[str, Any]:
        return await c.submit(kind, inputs, job_id, **form)

    ack: dict[str, Any] = await party.run(submit, f"submit {job_id}")
    party.learn(list(ack.get("members") or []))
    return ack


async def job_state(party: Failover, job_id: str) -> str:
    """The state of a job just accepted: ``queued`` while the member's copy of the log has not
    shown it yet (the gateway that committed it has; another member may lag a moment)."""

    async def state(c: Client) -> str:
        try:
            return str((await c.job(job_id))["state"])
        except RemoteError as exc:
            if exc.code in TRANSIENT:
                raise
            return "queued"

    return str(await party.run(state, f"read the state of {job_id}"))


async def follow_job(party: Failover, job_id: str, out: Path, on_progress: Progress | None = None,
                     timeout: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Wait for the job (at most ``timeout`` seconds: then :class:`WaitTimeout`), then fetch its
    result to ``out``; returns the job's final summary and the result's head (size, keys, sha256)."""

    async def wait(c: Client) -> dict[str, Any]:
        return await c.wait(job_id, on_progress)

    try:
        summary = await asyncio.wait_for(party.run(wait, f"follow {job_id}"), timeout)
    except asyncio.TimeoutError:
        summary = await _ended(party, job_id, timeout or 0.0)

    async def fetch(c: Client) -> dict[str, Any]:
        return await c.fetch_result(job_id, out)

    head = await party.run(fetch, f"fetch the result of {job_id}")
    return summary, head


async def _ended(party: Failover, job_id: str, timeout: float) -> dict[str, Any]:
    """After a wait timed out: the job's summary if it is done after all (``timeout`` 0 asks
    once), its failure as PdpError, else :class:`WaitTimeout`."""
    gone = WaitTimeout(f"job {job_id} did not end within {timeout:g} s; it goes on "
                       f"(`pdp wait {job_id}` again, or `pdp cancel {job_id}`)")
    try:
        job = await asyncio.wait_for(party.run(lambda c: c.job(job_id), f"read the state of {job_id}"), 15.0)
    except asyncio.TimeoutError:
        raise gone from None
    if job["state"] == "done":
        return dict(job)
    if job["state"] in ("failed", "cancelled"):
        raise PdpError(f"job {job_id} {'failed' if job['state'] == 'failed' else 'was'}: {job['error']}")
    raise gone

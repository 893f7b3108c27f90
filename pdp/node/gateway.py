"""The client-facing side of a node: submit, wait, result, cancel, status, jobs.

Any member is a gateway. ``submit`` takes the job form and the input bytes (streamed from
the submitter's machine), stores them in this node's spool and records the job in the
replicated queue; the acknowledgement comes only after that commit. ``wait`` streams
progress until the job ends; ``result`` streams the final output from whichever member
holds it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from typing import TYPE_CHECKING, Any

import msgpack

from pdp.raft.consensus import ConsensusError
from pdp.errors import AuthError, InputError, NotMaster, PdpError, ProtocolError, RemoteError, Unavailable
from pdp.identity import Token, new_secret, pem_fingerprint, token_hash
from pdp.fsutil import BlockSums, Damaged, atomic_writer, check_sha256, write_sums
from pdp.jobs.bundle import MAX_BUNDLE
from pdp.jobs.inputs import Splitter, data_type_of
from pdp.jobs.loader import builtin
from pdp.core.scheduler import scores
from pdp.node.spool import check_id
from pdp.core.state import ACTIVE, MAX_MODEL, Job, plain
from pdp.net.streams import check_data, data_header, relay, send_file
from pdp.net.transport import Forbidden, Handler, Stream

if TYPE_CHECKING:
    from pdp.node.services import GatewayServices

log = logging.getLogger("pdp.node.gateway")

MAX_INPUTS = 1000
MAX_REDUCES = 64
KEEPALIVE = 5.0  # a waiting client hears from its gateway at least this often
PROGRESS_GAP = 0.1  # a waiting client hears of progress at most this often (the end at once)
DEFAULT_TTL = 24 * 3600.0  # a join token's default lifetime
MAX_TTL = 30 * 86400.0
LAG_GRACE = 5.0  # how long a member waits for its copy of the log to show a job it is asked about


class Gateway:
    def __init__(self, node: GatewayServices) -> None:
        self.node = node

    def handlers(self) -> dict[str, Handler]:
        return {"submit": self._submit, "wait": self._wait, "result": self._result, "status": self._status,
                "jobs": self._jobs, "invite": self._invite, "uninvite": self._uninvite, "core": self._core,
                "invites": self._invites, "withdraw": self._withdraw, "join": self._join, "rekey": self._rekey,
                "whoami": self._whoami,
                "leave": self._leave, "cancel": self._cancel, "job": self._job_detail, "events": self._events}

    def _job(self, job_id: str) -> Job | None:
        assert self.node.consensus is not None
        with self.node.consensus.reading() as state:
            return state.jobs.get(job_id)

    # -- submit -------------------------------------------------------------------------

    async def _submit(self, stream: Stream, hdr: dict[str, Any], payload: bytes) -> None:
        """Store the inputs here and on a second member, commit the job, then acknowledge."""
        hdr = {**hdr, "submitter": stream.conn.who.name}  # the proven user, whatever the header says
        job_id = check_id(str(hdr["id"]))
        kind, spec, code = str(hdr["kind"]), hdr.get("spec") or {}, hdr.get("code")
        if not isinstance(spec, dict):
            raise InputError("the job spec must be a map")
        if hdr.get("model"):  # `pdp predict`'s model file, in the payload
            spec = {**spec, "model": _unpack_model(payload)}
        _plain_spec(spec)  # a bad model is refused before any upload
        steps = self._check_job(kind, code, spec)  # an unknown job, or code nobody runs, is refused before any upload
        inputs = hdr["inputs"]
        if not isinstance(inputs, list) or not 0 < len(inputs) <= MAX_INPUTS:
            raise InputError(f"a job takes 1 to {MAX_INPUTS} inputs")
        known = self._job(job_id)
        if known is not None:  # a retried submit (the job exists), but only of the same kind, inputs and submitter
            asked = [{"name": str(i["name"])[:4096], "size": int(i["size"])} for i in inputs]  # as _submit stores them
            if not known.same_submission(kind, asked, str(hdr.get("submitter", "?"))[:200]):  # as _submit_cmd
                raise InputError(f"job id {job_id} is already used for different inputs; submit with a new id")
            await stream.send({"t": "accepted", "id": job_id, "dup": True, "members": self._member_addrs()})
            return
        full = self.node.spool_full(sum(int(i["size"]) for i in inputs))
        if full:
            raise InputError(f"{full}; submit through another member (--node) or ask its owner to raise disk")
        data_type = data_type_of(str(inputs[0]["name"]), spec.get("data_type") or None)
        for inp in inputs[1:]:
            if not spec.get("data_type") and data_type_of(str(inp["name"]), None) != data_type:
                raise InputError(f"inputs of different data types ({inputs[0]['name']}, {inp['name']}): "
                                 "give --data-type")
        chunk = self._chunk(hdr, [int(i["size"]) for i in inputs])
        await stream.send({"t": "go"})
        stored_code: dict[str, Any] = {}
        if code:
            file_id = f"{job_id}-code"
            stored_code = {"file_id": file_id, "size": int(code["size"]),
                           "holders": await self._store(stream, file_id, int(code["size"]))}
        stored: list[dict[str, Any]] = []
        for k, inp in enumerate(inputs):
            file_id = f"{job_id}-{k}"
            splitter = Splitter(data_type, chunk)
            holders = await self._store(stream, file_id, int(inp["size"]), splitter)
            found = splitter.finish()
            stored.append({"name": str(inp["name"])[:4096], "size": found["size"], "file_id": file_id,
                           "holders": holders, "cuts": found["cuts"],
                           **({"header": found["header"]} if "header" in found else {})})
        cmd = self._submit_cmd(job_id, kind, hdr, stored)
        cmd.update(chunk_size=chunk, spec={**_plain_spec(spec), "data_type": data_type},
                   steps=steps or max(1, int(hdr.get("steps") or 1)), code=stored_code)
        if not code and getattr(builtin(kind), "ITERATE", False):  # rounds (training): built-ins only
            cmd["spec"].pop("model", None)  # the first round has none: the master makes it
            cmd["spec"]["iterate"] = True
            cmd["n_reduce"] = 1
        if kind == "sort" and not code:  # range partitioning: cut points from a sample of the stored inputs
            cmd["spec"]["args"] = [*cmd["spec"]["args"], *await asyncio.to_thread(
                self._sort_cuts, stored, data_type, cmd["spec"]["args"], cmd["n_reduce"])]
        res = await self._commit(cmd)
        log.info("job %s accepted: %s of %d input(s), %d bytes, from %s, inputs on %s", job_id, kind, len(stored),
                 cmd["form"]["size"], cmd["form"]["submitter"], ", ".join(stored[0]["holders"]))
        await stream.send({"t": "accepted", "id": job_id, "dup": bool(res.get("dup")),
                           "members": self._member_addrs()})

    def _check_job(self, kind: str, code: Any, spec: dict[str, Any]) -> int:
        """Refuse an unknown built-in (or bad arguments), or a user's code that no member runs;
        returns a built-in's step count (0: a user's job, counted by its submitter)."""
        if not code:
            return len(builtin(kind)([str(a) for a in spec.get("args") or []]).steps())
        if not isinstance(code, dict) or not 0 < int(code.get("size", 0)) <= MAX_BUNDLE:
            raise InputError(f"a job's code bundle must be 1 byte to {MAX_BUNDLE >> 20} MiB")
        assert self.node.consensus is not None
        with self.node.consensus.reading() as state:
            allowed = [m.name for m in state.members.values() if m.allow_code]
        if not allowed:
            raise InputError("no member of the party runs users' job code: a member's owner must set "
                             "allow_code = true in its config (the built-in jobs run everywhere)")
        return 0

    def _sort_cuts(self, stored: list[dict[str, Any]], data_type: str, args: list[str], n: int) -> list[str]:
        """The built-in sort's ``--cuts``: ``n`` even ranges of the keys sampled from the inputs."""
        from pdp.jobs.builtin import sort

        keys: list[Any] = []
        for inp in stored:
            keys += sort.sample_keys(str(self.node.spool.input(inp["file_id"])), inp["size"], data_type, args,
                                     inp.get("header"))
        return sort.cuts_arg(sort.sample_cuts(keys, n))

    def _chunk(self, hdr: dict[str, Any], sizes: list[int]) -> int:
        """The map chunk size: the node's (or the submitter's), grown so that a job never has
        more than MAX_MAPS maps."""
        from pdp.core.state import MAX_CHUNK, MAX_MAPS  # the state refuses a job past these caps

        chunk = max(4096, int(hdr.get("chunk_size") or self.node.config.chunk_mb * 1024 * 1024))
        return min(MAX_CHUNK, max(chunk, -(-sum(sizes) // (MAX_MAPS - len(sizes)))))

    async def _store(self, stream: Stream, file_id: str, size: int, splitter: Splitter | None = None) -> list[str]:
        """Receive one uploaded file here and on a second member; returns its holders."""
        mirror = await self._open_mirror(file_id, size)
        _, mirrored = await self._receive_input(stream, file_id, size, mirror, splitter)
        copies = [mirror[0]] if mirror and mirrored else await self._second_copy(file_id, exclude=mirror)
        return [self.node.name, *copies]

    async def _commit(self, cmd: dict[str, Any], patience: float = 30.0) -> dict[str, Any]:
        """Commit an idempotent command, retrying through an election; refusals raise."""
        deadline = time.monotonic() + patience
        while True:
            try:
                res = await self.node.propose(cmd, timeout=5.0)
                break
            except ConsensusError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        if not res.get("ok"):
            raise PdpError(f"the party refused: {res.get('error')}")
        return res

    def _member_addrs(self) -> list[str]:
        """Every member's address, so a client can carry on through another one."""
        assert self.node.consensus is not None
        with self.node.consensus.reading() as state:
            return sorted(m.data_addr for m in state.members.values())

    def _replica_order(self, file_id: str) -> list[tuple[str, str]]:
        """Other members, in an order that spreads second copies over the party."""
        assert self.node.consensus is not None
        with self.node.consensus.reading() as state:
            others = [(m.name, m.data_addr) for m in state.members.values() if m.name != self.node.name]
        return sorted(others, key=lambda m: zlib.crc32(f"{file_id}/{m[0]}".encode()))

    async def _open_mirror(self, file_id: str, size: int) -> tuple[str, Stream] | None:
        """A store stream to a second member, fed while the input arrives (no second pass)."""
        for name, addr in self._replica_order(file_id):
            try:
                conn = await self.node.peers.get(addr, timeout=3.0)
                mirror = conn.open_stream()
                await mirror.send({"t": "store_input", "file": file_id, "size": size})
                return name, mirror
            except (PdpError, OSError) as exc:
                log.warning("cannot mirror input %s to %s: %s", file_id, name, exc)
        return None

    async def _second_copy(self, file_id: str, exclude: tuple[str, Stream] | None) -> list[str]:
        """The mirror failed: push the stored input to another member afterwards."""
        if exclude is not None:
            exclude[1].close()
        candidates = [m for m in self._replica_order(file_id) if exclude is None or m[0] != exclude[0]]
        for name, addr in candidates:
            try:
                path = self.node.spool.input(file_id)
                await self.node.push_file(addr, {"t": "store_input", "file": file_id, "size": path.stat().st_size}, path)
                return [name]
            except (PdpError, OSError) as exc:
                log.warning("cannot store a second copy of %s on %s: %s", file_id, name, exc)
        if candidates or exclude is not None:
            raise PdpError("no other member could store a second copy of the input; is the party up? (pdp status)")
        return []  # a party of one

    async def _receive_input(
        self, stream: Stream, file_id: str, declared: int, mirror: tuple[str, Stream] | None,
        splitter: Splitter | None = None
    ) -> tuple[int, bool]:
        """Write the input to the spool with its block checksums (and to the mirror, each frame
        with its CRC); returns (size, mirrored completely)."""
        size, mirrored, sums = 0, mirror is not None, BlockSums()
        path = self.node.spool.input(file_id)
        with atomic_writer(path) as f:
            while True:
                frame = await stream.recv(60.0)
                if frame.header["t"] == "end":
                    break
                if frame.header["t"] != "data":
                    raise ProtocolError(f"expected input data, got {frame.header['t']!r}")
                if "crc" in frame.header:  # a client that sends CRCs gets them checked
                    check_data(frame.header, frame.payload, f"input {file_id}")
                f.write(frame.payload)
                sums.update(frame.payload)
                if splitter is not None:  # record-aligned cut points, found as the bytes pass
                    splitter.feed(frame.payload)
                size += len(frame.payload)
                if size > declared:
                    raise InputError(f"input {file_id} is larger than the declared {declared} bytes (did it change?)")
                if mirrored and mirror is not None:
                    mirrored = await _forward(mirror, data_header(frame.payload), frame.payload)
            if size != declared:
                raise InputError(f"input {file_id}: got {size} bytes, declared {declared} (did the file change?)")
            if mirrored and mirror is not None:  # the mirror makes its copy durable while this one does
                mirrored = await _forward(mirror, {"t": "end", "size": size}, b"")
            write_sums(path, sums.finish(), size)  # before the input itself appears
        if mirrored and mirror is not None:
            mirrored = await _stored(mirror)
        return size, mirrored

    def _submit_cmd(self, job_id: str, kind: str, hdr: dict[str, Any], stored: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.node.config
        assert self.node.consensus is not None
        with self.node.consensus.reading() as state:
            slots = sum(m.cpus for m in state.members.values()) or 1
        from pdp.core.state import MAX_CHUNK, MAX_MAPS  # the state refuses a job past these caps

        total = sum(int(i["size"]) for i in stored)
        chunk = max(4096, int(hdr.get("chunk_size") or cfg.chunk_mb * 1024 * 1024))
        chunk = min(MAX_CHUNK, max(chunk, -(-total // (MAX_MAPS - len(stored)))))  # < MAX_MAPS maps however big
        maps = sum(-(-int(i["size"]) // chunk) for i in stored)  # about one map per chunk
        n_reduce = int(hdr.get("reduces") or cfg.reduces or max(1, min(slots, 16, maps)))
        form = {
            "source": [i["name"] for i in stored],
            "data_type": str(hdr.get("data_type", "text/utf-8"))[:200],
            "size": sum(i["size"] for i in stored),
            "comment": str(hdr.get("comment", ""))[:2000],
            "submitter": str(hdr.get("submitter", "?"))[:200],
            "output": str(hdr.get("output", ""))[:4096],
            "gateway": self.node.name,
            "priority": max(-100, min(100, int(hdr.get("priority") or 0))),
        }
        return {"op": "submit", "id": job_id, "kind": kind, "inputs": stored, "form": form,
                "n_reduce": max(1, min(n_reduce, MAX_REDUCES)), "chunk_size": chunk, "priority": form["priority"],
                "now": time.time()}

    # -- wait / result --------------------------------------------------------------------

    async def _wait(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Stream ``progress`` frames until the job ends, then ``done`` (or an error)."""
        job_id = check_id(str(hdr["id"]))
        last: dict[str, Any] | None = None
        sent, grace = 0.0, time.monotonic() + LAG_GRACE
        while True:
            job = self._job(job_id)
            if job is None and time.monotonic() < grace:
                await self.node.changes.wait(0.2)  # this member's copy of the log may lag a moment
                continue
            if job is None:
                raise PdpError(f"no job {job_id} in the party (check `pdp jobs`)")
            if job.state in ACTIVE and time.monotonic() - sent < PROGRESS_GAP:
                await self.node.changes.wait(PROGRESS_GAP)  # a busy log: no summary after every entry
                continue
            summary = job_summary(job)
            if job.state in ("failed", "cancelled"):
                raise PdpError(f"job {job_id} {'failed' if job.state == 'failed' else 'was'}: {job.error}")
            if job.state == "done":
                await stream.send({"t": "done", **summary})
                return
            since = time.monotonic() - sent
            if (summary != last and since >= PROGRESS_GAP) or since > KEEPALIVE:
                await stream.send({"t": "progress", **summary})
                last, sent = summary, time.monotonic()
            await self.node.changes.wait(1.0)

    async def _result(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        job_id = check_id(str(hdr["id"]))
        job = self._job(job_id)
        if job is None:
            raise PdpError(f"no job {job_id} in the party (check `pdp jobs`)")
        if job.state != "done":
            raise PdpError(f"job {job_id} is {job.state}" + (f": {job.error}" if job.error else "; no result yet"))
        holders = [str(h) for h in job.result["holders"]]
        await stream.send({"t": "result", **job.result})
        errors = []
        if self.node.name in holders:
            path = self.node.spool.file(job_id, "result")
            try:  # a damaged copy here: relay another holder's
                await asyncio.to_thread(check_sha256, path, str(job.result["sha256"]), f"{self.node.name}'s copy")
            except (Damaged, OSError) as exc:
                log.warning("job %s: %s; relaying another copy", job_id, exc)
                errors.append(f"{self.node.name}: {exc}")
            else:
                await send_file(stream, path)
                return
        for holder in (h for h in holders if h != self.node.name):
            try:
                conn = await self.node.peers.get(self.node.member_addr(holder))
            except (PdpError, OSError) as exc:
                errors.append(f"{holder}: {exc}")
                continue
            source = conn.open_stream()
            try:
                await source.send({"t": "fetch_file", "job": job_id, "name": "result"})
                await relay(source, stream)
                return
            except (PdpError, OSError) as exc:
                log.warning("job %s: the result copy on %s failed: %s", job_id, holder, exc)
                errors.append(f"{holder}: {exc}")  # nothing relayed yet unless the holder died mid-way
            finally:
                source.close()
        raise Unavailable(f"no member holding the result of {job_id} answered ({'; '.join(errors)}); try again later")

    async def _cancel(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Stop a job: its tasks are not handed out again, running ones stop, members drop its files.
        Users cancel their own jobs; admins any job."""
        job_id, who = check_id(str(hdr["id"])), stream.conn.who
        job = self._job(job_id)
        if job is not None and job.submitter != who.name and not who.admin:
            raise Forbidden(f"forbidden: job {job_id} was submitted by {job.submitter}; only they or an admin may "
                            "cancel it")
        res = await self._commit({"op": "cancel", "job": job_id, "by": who.name, "now": time.time()}, patience=10.0)
        log.warning("%s cancelled job %s", who.label, job_id)
        await stream.send({"t": "cancelled", "id": job_id, **res})

    # -- invitations and identities ------------------------------------------------------

    async def _invite(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """An admin invites NAME: a one-time join token (the party keeps only its hash)."""
        name, kind = str(hdr["name"]), "user" if hdr.get("user") else "node"
        ttl = float(hdr.get("ttl") or DEFAULT_TTL)
        if not 60 <= ttl <= MAX_TTL:
            raise InputError(f"--ttl must be between 1 minute and {MAX_TTL // 86400:.0f} days")
        now, secret = time.time(), new_secret()
        await self._commit({"op": "token", "name": name, "kind": kind, "token_hash": token_hash(secret),
                            "expires": now + ttl, "by": stream.conn.who.name, "now": now,
                            "replace": bool(hdr.get("replace")), "auth": hdr.get("auth")}, patience=10.0)
        ids = self.node.identities()
        pins = sorted(fp for fp, r in ids.items() if r["kind"] == "node")
        token = Token(name, kind, tuple(self._join_addrs()), tuple(pins), secret, now + ttl)
        log.warning("%s invited %s %s (token valid %.0f s)", stream.conn.who.label, kind, name, ttl)
        await stream.send({"t": "invited", "name": name, "kind": kind, "token": token.encode(), "expires": now + ttl})

    def _join_addrs(self) -> list[str]:
        """Where a newcomer can reach the party: this member first, then the voters."""
        assert self.node.consensus is not None
        with self.node.consensus.reading() as state:
            voters = [m.data_addr for m in state.members.values() if m.voter]
        return list(dict.fromkeys([self.node.config.advertise_addr, *sorted(voters)]))

    async def _invites(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        assert self.node.consensus is not None
        with self.node.consensus.reading() as state:
            pending = [{"name": n, "kind": t["kind"], "expires": t["expires"], "by": t["by"]}
                       for n, t in sorted(state.tokens.items())]
            ids = [{"name": r["name"], "kind": r["kind"], "admin": r["admin"], "fp": fp}
                   for fp, r in sorted(state.identities.items(), key=lambda kv: (kv[1]["name"], kv[0]))]
        await stream.send({"t": "invites"}, msgpack.packb({"pending": pending, "identities": ids}))

    async def _withdraw(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        name = str(hdr["name"])
        await self._commit({"op": "withdraw", "name": name, "auth": hdr.get("auth")}, patience=10.0)
        log.warning("%s withdrew the invitation of %s", stream.conn.who.label, name)
        await stream.send({"t": "withdrawn", "name": name})

    async def _join(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """A newcomer (anonymous TLS, pinned to us) redeems a token: its certificate becomes NAME."""
        secret, cert = str(hdr.get("secret", ""))[:128], str(hdr.get("cert", ""))[:8192]
        try:
            fp = pem_fingerprint(cert)
        except ValueError:
            raise InputError("the join request holds no valid certificate") from None
        res = await self.node.propose({"op": "join", "secret": secret, "fp": fp, "cert": cert, "now": time.time()},
                                      timeout=10.0)
        if not res.get("ok"):
            log.warning("refused a join from %s: %s", stream.conn.peer, res.get("error"))
            raise AuthError(f"the party refused the token: {res.get('error')}")
        log.warning("%s %s joined the party (id %s)", res["kind"], res["name"], fp[:16])
        await self._wait_identity(fp)
        assert self.node.consensus is not None
        known = {fp: {**rec, "addr": rec.get("addr", "")} for fp, rec in self.node.identities().items()}  # copies
        with self.node.consensus.reading() as state:
            for rec in known.values():
                member = state.members.get(rec["name"])
                if member is not None and rec["kind"] == "node":
                    rec["addr"] = member.data_addr
            core = sorted(m.data_addr for m in state.members.values() if m.voter)
        await stream.send({"t": "joined", "name": res["name"], "kind": res["kind"]},
                          msgpack.packb({"core": core, "known": known}))

    async def _wait_identity(self, fp: str, patience: float = 5.0) -> None:
        """Until this member's copy of the log shows the new identity (it may lag the commit)."""
        deadline = time.monotonic() + patience
        while fp not in self.node.identities() and time.monotonic() < deadline:
            await self.node.changes.wait(0.2)

    async def _rekey(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """An identity replaces its own key: the old certificate stops working."""
        who, cert = stream.conn.who, str(hdr.get("cert", ""))[:8192]
        try:
            fp = pem_fingerprint(cert)
        except ValueError:
            raise InputError("the rekey request holds no valid certificate") from None
        await self._commit({"op": "rekey", "name": who.name, "old_fp": who.fp, "fp": fp, "cert": cert,
                            "now": time.time(), "auth": hdr.get("auth")}, patience=10.0)
        await self._wait_identity(fp)
        log.warning("%s has a new key (id %s)", who.label, fp[:16])
        await stream.send({"t": "rekeyed", "fp": fp})

    async def _whoami(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Who the party takes the caller for, and the party's node ids (a client's pins)."""
        await stream.send({"t": "you", **self.node.whoami(stream)}, msgpack.packb({"nodes": self._node_addrs()}))

    def _node_addrs(self) -> dict[str, str]:
        """Every member node's fingerprint -> its address."""
        assert self.node.consensus is not None
        ids = self.node.identities()
        with self.node.consensus.reading() as state:
            addr = {m.name: m.data_addr for m in state.members.values()}
        return {fp: addr.get(r["name"]) or r.get("addr", "") for fp, r in ids.items() if r["kind"] == "node"}

    async def _uninvite(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Revoke NAME: its identities are removed, its connections closed, its work runs elsewhere."""
        name = str(hdr["name"])
        assert self.node.consensus is not None
        with self.node.consensus.reading() as state:
            term = state.master["term"]
        await self._commit({"op": "revoke", "name": name, "term": term, "now": time.time(), "auth": hdr.get("auth")},
                           patience=10.0)
        log.warning("%s revoked %s", stream.conn.who.label, name)
        await stream.send({"t": "uninvited", "name": name})

    # -- the core and leaving -------------------------------------------------------------

    async def _core(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        reply = await self._at_master({"t": "core_change", "action": str(hdr["action"]), "name": str(hdr["name"])})
        await stream.send({"t": "ok", "voters": reply.get("voters", [])})

    async def _at_master(self, request: dict[str, Any], patience: float = 30.0) -> dict[str, Any]:
        """Send a request to the master, following it when leadership moves (``moved``)."""
        deadline, moved_from = time.monotonic() + patience, ""
        while time.monotonic() < deadline:
            master = self.node.master_addr()
            if master is None or master[0] == moved_from:
                await asyncio.sleep(0.2)
                continue
            try:
                frame = await self.node.peers.request(master[1], request, timeout=patience)
            except RemoteError as exc:
                if exc.code != NotMaster.code:
                    raise
                await asyncio.sleep(0.2)
                continue
            if frame.header["t"] != "moved":
                return frame.header
            moved_from = master[0]
        raise PdpError("no master answered; is a majority of the core up? (pdp status)")

    async def _leave(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """This member leaves: out of the core first if it votes, then its work is handed back."""
        node = self.node
        if node.voter:
            await self._at_master({"t": "core_change", "action": "remove", "name": node.name})
            deadline = time.monotonic() + 20
            while node.voter and time.monotonic() < deadline:  # the master turns us into a worker
                await asyncio.sleep(0.1)
        node.worker.leaving = True
        await self._hand_over_inputs()
        assert node.consensus is not None
        with node.consensus.reading() as state:
            term = state.master["term"]
        await self._commit({"op": "leave", "name": node.name, "term": term}, patience=20.0)
        log.warning("%s left the party", node.name)
        await stream.send({"t": "ok"})
        node.stopping.set()

    async def _hand_over_inputs(self) -> None:
        """Before leaving: every input of an unfinished job held here keeps two copies elsewhere."""
        node = self.node
        assert node.consensus is not None
        with node.consensus.reading() as state:
            work = [(j.id, k, inp["file_id"], [h for h in inp["holders"] if h in state.members and h != node.name])
                    for j in state.active_jobs() for k, inp in enumerate(j.inputs) if node.name in inp["holders"]]
            others = {m.name: m.data_addr for m in state.members.values() if m.name != node.name}
        for job_id, k, file_id, holders in work:
            for name in [n for n in sorted(others) if n not in holders][: max(0, 2 - len(holders))]:
                path = node.spool.input(file_id)
                await node.push_file(others[name], {"t": "store_input", "file": file_id, "size": path.stat().st_size},
                                     path)
                await self._commit({"op": "add_holder", "job": job_id, "input": k, "node": name}, patience=10.0)
                log.info("handed input %s of job %s over to %s", k, job_id, name)

    # -- status / jobs --------------------------------------------------------------------

    async def _status(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        await stream.send({"t": "status", **await self.status_view()})

    async def status_view(self) -> dict[str, Any]:
        """The party as ``pdp status`` shows it: leader, term, Raft, members with health."""
        node = self.node
        assert node.consensus is not None
        raft = node.consensus.raft_status()
        with node.consensus.reading() as state:
            master = dict(state.master)
            table = scores(state)
            members = {m.name: {"name": m.name, "data_addr": m.data_addr, "raft_addr": m.raft_addr, "cpus": m.cpus,
                                "voter": m.voter, "score": table[m.name].score, "rate": table[m.name].rate,
                                "benched_until": table[m.name].benched_until,
                                "record": dict(vars(state.records[m.name])) if m.name in state.records else {}}
                       for m in state.members.values()}
            invited = sorted(state.invited)
            jobs = {s: sum(j.state == s for j in state.jobs.values())
                    for s in ("queued", "running", "done", "failed", "cancelled")}
            jobs["running"] = sum(j.state in ACTIVE[1:] for j in state.jobs.values())
            reruns: dict[str, int] = {}
            for j in state.jobs.values():
                for why, n in j.reruns.items():
                    reruns[why] = reruns.get(why, 0) + n
        live = await self._live_view(master)
        for name, m in members.items():
            seen = live.get(name) or {}
            m["health"] = seen.get("health", "unknown")
            m["heartbeat_age"] = seen.get("age")
            m["tasks"] = seen.get("tasks", [])
            m["paused"] = seen.get("paused", "")
        leader = master["name"] if master["term"] == raft["term"] and master["name"] else None
        return {"node": node.name, "leader": leader, "term": raft["term"],
                "is_leader": node.master.is_master(), "raft": raft,
                "members": sorted(members.values(), key=lambda m: m["name"]), "jobs": jobs,
                "reruns": reruns, "invited": invited}

    async def _live_view(self, master: dict[str, Any]) -> dict[str, Any]:
        if not master["name"]:
            return {}
        if master["name"] == self.node.name:
            return self.node.master.live_view()
        try:
            frame = await self.node.peers.request(master["data_addr"], {"t": "live"}, timeout=3.0)
            return dict(frame.header.get("members") or {})
        except (PdpError, OSError):
            return {}

    async def _job_detail(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """One job with its tasks: where each ran, its attempts and statistics."""
        job_id = check_id(str(hdr["id"]))
        assert self.node.consensus is not None
        with self.node.consensus.reading() as state:
            job = state.jobs.get(job_id)
            if job is None:
                raise PdpError(f"no job {job_id} in the party (check `pdp jobs`)")
            tasks = [{"phase": t.phase, "index": t.index, "step": t.step + 1, "state": t.state, "node": t.node,
                      "attempt": t.attempt,
                      "runs": sorted(t.runs.items()), "failed_on": list(t.failed_on), "bytes": t.size(),
                      "stats": dict(t.stats)} for t in job.maps + job.reduces]
            summary = job_summary(job)
        await stream.send({"t": "job", **summary}, msgpack.packb(tasks))  # tasks: too many for a header

    async def _events(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """The party's recent events after sequence number ``after``; only those of job
        ``job`` if one is named (with its state, so a follower knows when to stop)."""
        job_id, after = str(hdr.get("job") or ""), int(hdr.get("after") or 0)
        assert self.node.consensus is not None
        with self.node.consensus.reading() as state:
            job = state.jobs.get(job_id) if job_id else None
            if job_id and job is None:
                raise PdpError(f"no job {job_id} in the party (check `pdp jobs`)")
            events = state.event_list(job_id, after)
        await stream.send({"t": "events", "state": job.state if job else "", "count": len(events)},
                          msgpack.packb(events))

    async def _jobs(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        assert self.node.consensus is not None
        with self.node.consensus.reading() as state:
            jobs = [job_summary(j) for j in sorted(state.jobs.values(), key=lambda j: j.seq)]
        await stream.send({"t": "jobs", "count": len(jobs)}, msgpack.packb(jobs))  # may be many: a payload


async def _forward(mirror: tuple[str, Stream], header: dict[str, Any], payload: bytes) -> bool:
    try:
        await mirror[1].send(header, payload)
        return True
    except (PdpError, OSError) as exc:
        log.warning("mirroring to %s failed: %s", mirror[0], exc)
        return False


async def _stored(mirror: tuple[str, Stream]) -> bool:
    try:
        reply = await mirror[1].recv(30.0)
        return reply.header["t"] == "stored"
    except (PdpError, OSError) as exc:
        log.warning("mirroring to %s failed: %s", mirror[0], exc)
        return False
    finally:
        mirror[1].close()


def _unpack_model(payload: bytes) -> Any:
    """A submitted model from its msgpack bytes (plain data; nothing is unpickled)."""
    try:
        return msgpack.unpackb(payload)
    except (ValueError, TypeError) as exc:
        raise InputError(f"the job's model is not valid msgpack: {exc}") from None


def _plain_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The parts of a submitted spec the party keeps: which class, its arguments."""
    out: dict[str, Any] = {"args": [str(a)[:1000] for a in list(spec.get("args") or [])[:200]]}
    for key in ("builtin", "main", "cls", "shown"):
        if spec.get(key):
            out[key] = str(spec[key])[:200]
    model = spec.get("model")  # what every map gets (`pdp predict`'s model file)
    if model is not None:
        if not plain(model) or len(msgpack.packb(model)) > MAX_MODEL:
            raise InputError(f"a job's model must be plain data (JSON) of at most {MAX_MODEL >> 20} MiB")
        out["model"] = model
    return out


def job_summary(job: Job) -> dict[str, Any]:
    """A job as clients see it: the form, the phase, task counts and where work runs."""
    running = sorted({n for t in job.maps + job.reduces if t.state == "running" for n in t.runs.values()})
    done_on: dict[str, int] = {}
    for t in job.maps + job.reduces:
        if t.state == "done":
            done_on[t.node] = done_on.get(t.node, 0) + 1
    return {"id": job.id, "kind": job.kind, "state": job.state, "error": job.error, "form": job.form,
            "submitted_at": job.submitted_at, "finished_at": job.finished_at, **job.counts(),
            "nodes_at_work": running, "done_on": done_on, "result": job.result, "reruns": dict(job.reruns),
            "priority": job.priority, "backups": job.backups,
            "attempts": sum(t.attempt for t in job.maps + job.reduces), "counters": job.counters(),
            "job": job.spec.get("shown") or job.spec.get("builtin") or job.kind, "args": list(job.spec.get("args") or [])}

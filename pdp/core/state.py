"""The replicated state machine: members, the master's term, jobs and their tasks.

Pure and deterministic: ``State.apply(cmd)`` takes a plain dict command (only None, bools,
ints, floats, strings, lists, tuples and dicts with string keys; never bytes: it travels
through the Raft log, whose pickled entries may hold plain values only) and returns a
result dict. It never raises, never reads a clock, random source, file or socket: times and
ids come in as arguments, so every member that applies the same log reaches the same state.
A refused command changes nothing: every handler checks all of its command before it
changes anything.

Authority: an order comes from the master of the current term; a completion is accepted
only for an attempt that runs on the member reporting it (the master passes the name the
worker proved); a submission stays within caps (inputs, sizes, map count, names).

Identity (``identities``, ``tokens``): every member and user has a key, registered by its
certificate's fingerprint (SHA-256 of the DER, lower-case hex: :func:`cert_fingerprint`).
The first ones come from ``genesis``; later ones join with a one-time, expiring invitation
(``token`` records only the SHA-256 of its secret; ``join`` spends it).

A job is split at submission into map tasks (line-aligned byte ranges of its inputs, the
alignment itself happens where the bytes are) and ``n_reduce`` reduce tasks. Phases::

    queued -> mapping -> reducing -> assembling -> done
          \\________________________________________-> failed | cancelled

Task states: ``pending -> running -> done``. A running task has one attempt, or two when
a straggler got a backup copy (``Task.runs``); the first completion wins. Every order
(assign, complete, release, fail, finish) carries the master's Raft term; an order from an
older term than the current master's is refused, so a cut-off old leader cannot change a job.

Each member has a :class:`Record` of what it actually did (tasks done, failed, lost; an
average throughput): the scheduler scores members from it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgpack

from pdp.core.split import plan_ranges

Cmd = dict[str, Any]
Result = dict[str, Any]

ACTIVE = ("queued", "mapping", "reducing", "assembling")
MAX_ERROR = 2000
MAX_EVENTS = 500  # the party's event log keeps the latest this many
RATE_MIN_BYTES = 64 * 1024  # tasks smaller than this say more about overheads than speed
RATE_WEIGHT = 0.3  # weight of the newest task in a member's average throughput

# Caps of a submission (the gateway stays inside them: chunks of at least 4 KiB, grown so
# that a job never has more than MAX_MAPS maps).
MAX_INPUTS = 1000
MAX_INPUT_SIZE = 1 << 40  # 1 TiB per input
MAX_CHUNK = 1 << 40
MAX_MAPS = 100_000
MAX_REDUCES = 64
MAX_STEPS = 16
MAX_ROUNDS = 1000  # rounds of an iterative job (training); the master stops it at its own limit first
MAX_MODEL = 1 << 20  # bytes of a job's model as msgpack: it lives in the log and in every assignment
MAX_SPEC = 8192  # characters of a job's spec (its name, class and arguments)
MAX_COLUMNS = 1000
MAX_INPUT_NAME = 4096
MAX_HOLDERS = 16
MAX_PRIORITY = 100  # priorities are clamped to [-MAX_PRIORITY, MAX_PRIORITY]
FORM_STRING_CAPS = {"comment": 2000, "submitter": 200, "data_type": 200}  # others: MAX_INPUT_NAME
MAX_FORM_KEYS = 32
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # fullmatch; ".." is refused too
FILE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
KIND = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

# Identities and invitations.
HEX64 = re.compile(r"[0-9a-f]{64}")  # a SHA-256, lower-case hex (fingerprints, token hashes)
MAX_CERT = 16 * 1024  # characters of a PEM certificate
MAX_TOKEN_TTL = 30 * 86400.0  # an invitation expires at most this long after it was made
MAX_GENESIS = 64  # nodes, and users, named at genesis
KINDS = ("node", "user")
MAX_DEPTH = 16  # nesting of lists and dicts in a command (a batch of orders needs 4)
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+)-----END CERTIFICATE-----")


@dataclass
class Member:
    name: str
    data_addr: str
    raft_addr: str  # "" for a worker without a Raft seat
    cpus: int
    joined_at: float
    voter: bool = True
    allow_code: bool = False  # its owner lets it run users' job code (``allow_code`` in its config)

    def __setstate__(self, data: dict[str, Any]) -> None:
        self.allow_code = False
        self.__dict__.update(data)


@dataclass
class Task:
    phase: str  # "map" | "reduce"
    index: int
    input: int = 0  # map: index into Job.inputs
    start: int = 0  # map: byte range [start, end) of that input (not yet line-aligned)
    end: int = 0
    step: int = 0  # the job's step this task belongs to
    line: int = 1  # map of a first step: the line number at ``start`` (for error messages)
    state: str = "pending"
    node: str = ""  # running: the node holding it; done: the node holding its output
    attempt: int = 0
    term: int = 0
    lease_until: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    runs: dict[int, str] = field(default_factory=dict)  # running attempts: attempt -> node (2 with a backup)
    failed_on: list[str] = field(default_factory=list)  # members where an attempt failed (tried last there)
    given_up: dict[int, str] = field(default_factory=dict)  # stalled attempts given up on that may still finish

    def __setstate__(self, data: dict[str, Any]) -> None:
        """Dumps written before a field existed load with its default."""
        self.runs, self.failed_on, self.given_up, self.step, self.line = {}, [], {}, 0, 1
        self.__dict__.update(data)
        if self.state == "running" and not self.runs:
            self.runs = {self.attempt: self.node}

    def size(self) -> int:
        return self.end - self.start


@dataclass
class Record:
    """What a member actually did, for its score: counts and an average throughput."""

    done: int = 0
    failed: int = 0  # attempts that failed there
    lost: int = 0  # attempts given up there (member lost, lease expired)
    rate: float = 0.0  # average bytes/s of its recent tasks (0: not known yet)
    streak: int = 0  # failures and losses since its last success
    last_fail: float = 0.0


@dataclass
class Job:
    id: str
    seq: int
    kind: str
    inputs: list[dict[str, Any]]  # {"name", "size", "file_id", "holders": [node names]}
    n_reduce: int
    chunk_size: int
    form: dict[str, Any]  # the standard form: source, data_type, size, comment, submitter, ...
    submitted_at: float
    state: str = "queued"
    error: str = ""
    priority: int = 0
    maps: list[Task] = field(default_factory=list)
    reduces: list[Task] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    finished_at: float = 0.0
    reruns: dict[str, int] = field(default_factory=dict)  # why tasks ran again -> how often
    failures: dict[str, int] = field(default_factory=dict)  # "map 3" -> failed attempts
    backups: int = 0  # backup attempts started for stragglers
    steps: int = 1  # map/reduce steps; step k's reduce outputs are step k+1's inputs
    step: int = 0  # the step running now
    spec: dict[str, Any] = field(default_factory=dict)  # which job runs: {"builtin"} or {"main", "cls"}; "args"...
    code: dict[str, Any] = field(default_factory=dict)  # a user job's code bundle: {"file_id", "size", "holders"}
    carried: list[dict[str, Any]] = field(default_factory=list)  # the current step's inputs when step > 0

    def __setstate__(self, data: dict[str, Any]) -> None:
        self.priority, self.backups, self.steps, self.step = 0, 0, 1, 0
        self.spec, self.code, self.carried = {}, {}, []
        self.__dict__.update(data)

    @property
    def iterative(self) -> bool:
        """A job of rounds (training): every round maps the job's own inputs with the model
        the master made from the round before (``spec["model"]``); see :meth:`State._round`."""
        return bool(self.spec.get("iterate"))

    def step_inputs(self) -> list[dict[str, Any]]:
        """What the current step's maps read: the job's inputs, or the last step's outputs."""
        return self.inputs if self.step == 0 or self.iterative else self.carried

    def current(self, phase: str) -> list[Task]:
        """The tasks of the current step in ``phase``."""
        return [t for t in self.tasks(phase) if t.step == self.step]

    def counters(self) -> dict[str, dict[str, int]]:
        """The job's counters: summed over the done tasks of every step. A task's stats are
        those of its winning attempt (a re-run replaces them), so nothing counts twice."""
        total: dict[str, dict[str, int]] = {}
        for t in self.maps + self.reduces:
            if t.state != "done":
                continue
            found = t.stats.get("counters")
            for group, names in (found.items() if type(found) is dict else ()):
                if type(names) is not dict:
                    continue
                mine = total.setdefault(str(group), {})
                for name, n in names.items():
                    if type(n) is int:
                        mine[str(name)] = mine.get(str(name), 0) + n
        return total

    @property
    def submitter(self) -> str:
        return str(self.form.get("submitter", ""))

    @property
    def whole(self) -> bool:
        """A small job (one map, one reduce) runs as a single task that also stores the result
        (Hadoop's "uber" jobs): one assignment and one completion instead of four entries,
        and no fetches between members."""
        return len(self.maps) == 1 and self.n_reduce == 1 and self.steps == 1 and not self.iterative

    def tasks(self, phase: str) -> list[Task]:
        return self.maps if phase == "map" else self.reduces

    def same_submission(self, kind: str, inputs: list[dict[str, Any]], submitter: str) -> bool:
        """Is a submit of ``kind`` with these inputs (names and sizes) by ``submitter`` a retry
        of this job? A job id used again for anything else is refused, not a duplicate."""
        return (self.kind == kind and self.submitter == submitter
                and [(i.get("name"), i.get("size")) for i in self.inputs] == [(i.get("name"), i.get("size"))
                                                                              for i in inputs])

    def counts(self) -> dict[str, int]:
        """Progress of the current step."""
        maps, reduces = self.current("map"), self.current("reduce")
        return {
            "maps": len(maps),
            "maps_done": sum(t.state == "done" for t in maps),
            "reduces": len(reduces),
            "reduces_done": sum(t.state == "done" for t in reduces),
            "step": self.step + 1,
            "steps": self.steps,
        }


def _err(message: str, **extra: Any) -> Result:
    return {"ok": False, "error": message, **extra}


_SCALARS = (str, int, float, bool, type(None))


def plain(value: Any, depth: int = 0) -> bool:
    """Only None, bool, int, float, str, and lists, tuples and dicts (string keys) of them,
    nested at most MAX_DEPTH deep: what a pickled Raft entry may hold. Exact types (a
    subclass pickles as its own class)."""
    kind = type(value)
    if kind in _SCALARS:
        return True
    if depth >= MAX_DEPTH:
        return False
    if kind is list or kind is tuple:
        return all(plain(v, depth + 1) for v in value)
    if kind is dict:
        return all(type(k) is str and plain(v, depth + 1) for k, v in value.items())
    return False


def _int(value: Any, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def valid_name(name: Any) -> bool:
    """A member's or user's name: 1-64 printable characters, no spaces."""
    return (type(name) is str and 0 < len(name) <= 64 and name.isprintable()
            and not any(ch.isspace() for ch in name))


def valid_job_id(job_id: Any) -> bool:
    return type(job_id) is str and JOB_ID.fullmatch(job_id) is not None and ".." not in job_id


def cert_fingerprint(pem: Any) -> str | None:
    """SHA-256 (lower-case hex) of the DER bytes of one PEM certificate, or None when
    ``pem`` is not one (``ssl.PEM_cert_to_DER_cert`` + ``hashlib.sha256`` give the same)."""
    if type(pem) is not str or len(pem) > MAX_CERT:
        return None
    match = _PEM_CERT.fullmatch(pem.strip())
    if match is None:
        return None
    try:
        der = base64.b64decode("".join(match.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) < 16 or der[0] != 0x30:  # a DER SEQUENCE
        return None
    return hashlib.sha256(der).hexdigest()


def _check_form(form: Any) -> str | None:
    """What is wrong with a job's form (None: nothing). Plain values, capped strings."""
    if type(form) is not dict:
        return "the job form must be a dict"
    if len(form) > MAX_FORM_KEYS:
        return f"the job form has more than {MAX_FORM_KEYS} fields"
    for key, value in form.items():
        if type(key) is not str or not 0 < len(key) <= 64:
            return f"bad form field name {str(key)[:80]!r}"
        cap = FORM_STRING_CAPS.get(key, MAX_INPUT_NAME)
        values = value if type(value) in (list, tuple) else [value]
        if len(values) > MAX_INPUTS:
            return f"form field {key!r} has more than {MAX_INPUTS} values"
        for v in values:
            if type(v) not in _SCALARS:
                return f"form field {key!r} holds a {type(v).__name__}: only strings and numbers"
            if type(v) is str and len(v) > cap:
                return f"form field {key!r} is longer than {cap} characters"
            if type(v) is float and not math.isfinite(v):
                return f"form field {key!r} is not a finite number"
    return None


def _check_inputs(inputs: Any) -> tuple[list[dict[str, Any]], str | None]:
    """A copy of a submission's inputs, or what is wrong with them."""
    if type(inputs) is not list:
        return [], "inputs must be a list"
    if len(inputs) > MAX_INPUTS:
        return [], f"a job takes at most {MAX_INPUTS} inputs"
    out = []
    for k, inp in enumerate(inputs):
        if type(inp) is not dict:
            return [], f"input {k} is not a dict"
        name, size, file_id = inp.get("name"), inp.get("size"), inp.get("file_id")
        holders = inp.get("holders")
        holders = [] if holders is None else holders
        if type(name) is not str or len(name) > MAX_INPUT_NAME:
            return [], f"input {k}: the name must be a string of at most {MAX_INPUT_NAME} characters"
        if not _int(size, 0, MAX_INPUT_SIZE):
            return [], f"input {k}: the size must be a whole number of bytes from 0 to {MAX_INPUT_SIZE} (1 TiB)"
        if type(file_id) is not str or FILE_ID.fullmatch(file_id) is None or ".." in file_id:
            return [], f"input {k}: bad file id {str(file_id)[:140]!r}"
        if type(holders) not in (list, tuple) or len(holders) > MAX_HOLDERS \
                or not all(valid_name(h) for h in holders):
            return [], f"input {k}: holders must be at most {MAX_HOLDERS} member names"
        cuts, header = inp.get("cuts"), inp.get("header")
        if cuts is not None:
            if type(cuts) not in (list, tuple) or len(cuts) > MAX_MAPS or not all(
                    type(c) in (list, tuple) and len(c) == 2 and _int(c[0], 1, int(size or 0) - 1) and _int(c[1], 1, 1 << 62)
                    for c in cuts) or any(a[0] >= b[0] for a, b in zip(cuts, cuts[1:])):
                return [], f"input {k}: cuts must be increasing [offset, line] pairs inside the input"
        if header is not None and (type(header) not in (list, tuple) or len(header) > MAX_COLUMNS
                                   or not all(type(h) is str and len(h) <= 1000 for h in header)):
            return [], f"input {k}: the header must be at most {MAX_COLUMNS} column names"
        out.append({**inp, "holders": list(holders)})
    return out, None


def _check_spec(spec: Any, steps: Any, code: Any) -> str | None:
    """What is wrong with a job's spec (which job, its arguments), step count and code bundle."""
    if type(spec) is not dict or len(repr({k: v for k, v in spec.items() if k != "model"})) > MAX_SPEC:
        return f"the job spec must be a dict of at most {MAX_SPEC} characters"
    if "model" in spec and (not plain(spec["model"]) or len(msgpack.packb(spec["model"])) > MAX_MODEL):
        return f"a job's model must be plain data of at most {MAX_MODEL >> 20} MiB"
    args = spec.get("args", [])
    if type(args) not in (list, tuple) or not all(type(a) is str for a in args):
        return "job arguments must be strings"
    if not _int(steps, 1, MAX_STEPS):
        return f"a job has 1 to {MAX_STEPS} steps"
    if type(code) is not dict:
        return "code must be a dict"
    if code:
        bad = _check_inputs([{"name": "code", **code}])[1]
        if bad:
            return "the code bundle: " + bad.partition(": ")[2]
    return None


def _ranges(inp: dict[str, Any], chunk: int) -> list[tuple[int, int, int]]:
    """(start, end, line at start) of an input's maps: at its record-aligned cuts (found where
    the bytes arrived), else in ``chunk``-sized byte ranges aligned later (line unknown: 0)."""
    cuts = inp.get("cuts")
    if cuts is None:
        return [(a, b, 0) for a, b in plan_ranges(inp["size"], chunk)]
    if inp["size"] == 0:
        return []
    bounds = [(0, 1), *[(int(o), int(n)) for o, n in cuts], (inp["size"], 0)]
    return [(a[0], b[0], a[1]) for a, b in zip(bounds, bounds[1:])]


class State:
    """Everything the party agrees on. Mutated only through :meth:`apply`."""

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.master: dict[str, Any] = {"term": 0, "name": "", "data_addr": ""}
        self.jobs: dict[str, Job] = {}
        self.next_seq = 0
        self.applied = 0
        self.invited: dict[str, dict[str, Any]] = {}  # name -> {"by", "at"}: who may join as a member
        self.records: dict[str, Record] = {}  # member name -> what it did (kept when it leaves)
        # fingerprint -> {"name", "kind": "node"|"user", "admin", "cert" (PEM), "at", "by", "addr"}
        self.identities: dict[str, dict[str, Any]] = {}
        # name -> pending invitation {"kind", "token_hash", "expires", "by", "at"} (one per name)
        self.tokens: dict[str, dict[str, Any]] = {}
        # the party's recent events, oldest first: [seq, time, kind, job id or "", text] (see note_event)
        self.events: list[list[Any]] = []
        self.clock = 0.0  # the latest "now" a command carried: the time of events whose command has none

    def __setstate__(self, data: dict[str, Any]) -> None:
        """Dumps written before a field existed load with its default."""
        self.__init__()  # type: ignore[misc]
        self.__dict__.update(data)

    # -- entry point ------------------------------------------------------------------

    def apply(self, cmd: Cmd, raft_term: int | None = None) -> Result:
        """Apply one command; never raises (a raising Raft method would wedge the log).

        ``raft_term`` is the Raft term of the log entry that carries the command (from Raft,
        not from the proposer): an order (an assignment, a completion, a master's claim...)
        must be stamped with it, so only the leader of that term could have written it."""
        self.applied += 1
        try:
            op = cmd.get("op") if isinstance(cmd, dict) else None
            handler = _HANDLERS.get(op) if isinstance(op, str) else None
            if handler is None:
                return _err(f"unknown command {op!r}")
            if not plain(cmd):
                return _err(f"command {op!r} holds something other than plain values (bytes, objects, "
                            f"or nesting deeper than {MAX_DEPTH})", bad_request=True)
            if raft_term is not None and op in ORDERS and cmd.get("term") != raft_term:
                return _err(f"order {op!r} stamped with term {cmd.get('term')!r} in an entry of Raft term "
                            f"{raft_term}", stale=True)
            if op == "batch":
                return self._batch(cmd, raft_term)
            result = handler(self, cmd)
            if result.get("ok") and not result.get("dup"):
                now = cmd.get("now")
                if isinstance(now, (int, float)) and not isinstance(now, bool) and now > self.clock:
                    self.clock = float(now)
                note_event(self, str(op), cmd, result)
            return result
        except Exception as exc:  # a bug must not stop the log: report it as a value
            return _err(f"internal error applying {cmd.get('op')!r}: {type(exc).__name__}: {exc}")

    # -- commands ---------------------------------------------------------------------

    def _member(self, c: Cmd) -> Result:
        """A node registers (again). Core voters are invited by being configured as voters;
        any other member needs an invitation by name (``pdp invite``)."""
        name, data, raft, voter = str(c["name"]), str(c["data_addr"]), str(c["raft_addr"]), bool(c.get("voter", True))
        cpus, now = int(c["cpus"]), float(c["now"])
        known = self.members.get(name)
        if known is not None and known.data_addr != data:
            return _err(f"the name {name!r} is taken by the member at {known.data_addr}; give this node another --name")
        if not voter and name not in self.invited:
            return _err(f"{name} is not invited to this party: a member must first run `pdp invite {name}`",
                        not_invited=True)
        if voter:
            self.invited.setdefault(name, {"by": "core", "at": now})
        self.members[name] = Member(name, data, raft, cpus, now, voter, allow_code=c.get("allow_code") is True)
        return {"ok": True}

    def _invite(self, c: Cmd) -> Result:
        name, by, now = str(c["name"]), str(c["by"]), float(c["now"])
        if not name or len(name) > 64 or any(ch.isspace() for ch in name):
            return _err(f"bad member name {name!r}: 1-64 characters without spaces")
        self.invited[name] = {"by": by, "at": now}
        return {"ok": True}

    def _uninvite(self, c: Cmd) -> Result:
        """Withdraw an invitation: the member is removed and its work runs elsewhere (its
        keys, if it has identities, stop working too: like ``revoke``)."""
        name, term = str(c["name"]), int(c["term"])
        if name not in self.invited:
            member = self.members.get(name)
            if member is not None and member.voter:
                return _err(f"{name} is a core (Raft) member: run `pdp core remove {name}` first")
            return _err(f"{name} is not invited")
        return self._drop_name(name, term, c.get("now", 0.0))

    def _drop_name(self, name: str, term: int | None, now: Any) -> Result:
        """Remove everything ``name`` may use: its identities, pending invitation, invitation
        and membership; its running work goes back to the queue when ``term`` is the current
        master's. Refused (nothing changes) for a core voter or the last admin."""
        member = self.members.get(name)
        if member is not None and member.voter:
            return _err(f"{name} is a core (Raft) member: run `pdp core remove {name}` first", core=True)
        fps = self.fingerprints_of(name)
        if any(self.identities[fp]["admin"] for fp in fps) and not any(
                rec["admin"] and rec["name"] != name for rec in self.identities.values()):
            return _err(f"{name} is the party's last admin: make another admin first", last_admin=True)
        if not _number(now):
            now = 0.0
        for fp in fps:
            del self.identities[fp]
        self.tokens.pop(name, None)
        self.invited.pop(name, None)
        self.members.pop(name, None)
        if term is not None and term == self.master["term"]:
            self._lost({"node": name, "term": term, "now": now})
        return {"ok": True, "removed": len(fps)}

    # -- identities and invitations ---------------------------------------------------------

    def _identity_record(self, name: str, kind: str, admin: bool, cert: str, now: float, by: str,
                         addr: str = "") -> dict[str, Any]:
        return {"name": name, "kind": kind, "admin": admin, "cert": cert, "at": now, "by": by, "addr": addr}

    def _genesis(self, c: Cmd) -> Result:
        """The party's first identities: its first nodes and users (admins among them). Only
        while there are none; nodes are invited (``invited``) as well."""
        nodes, users, now = c["nodes"], c.get("users") or [], c["now"]
        if self.identities:
            return _err("the party already has identities: genesis happens once", exists=True)
        if not _number(now):
            return _err("now must be a finite number")
        if type(nodes) is not list or not 0 < len(nodes) <= MAX_GENESIS:
            return _err(f"genesis needs 1 to {MAX_GENESIS} nodes")
        if type(users) is not list or len(users) > MAX_GENESIS:
            return _err(f"genesis takes at most {MAX_GENESIS} users")
        records: dict[str, dict[str, Any]] = {}
        names: set[str] = set()
        for kind, entries in (("node", nodes), ("user", users)):
            for entry in entries:
                if type(entry) is not dict:
                    return _err(f"a genesis {kind} must be a dict")
                name, fp, cert = entry.get("name"), entry.get("fp"), entry.get("cert")
                addr, admin = entry.get("addr", ""), entry.get("admin", False)
                if not valid_name(name):
                    return _err(f"bad {kind} name {str(name)[:80]!r}: 1-64 printable characters without spaces")
                if name in names:
                    return _err(f"the name {name!r} is given twice")
                names.add(str(name))
                bad = self._check_key(fp, cert)
                if bad:
                    return _err(f"{kind} {name}: {bad}")
                if fp in records:
                    return _err(f"{kind} {name}: that key is given twice")
                if type(addr) is not str or len(addr) > 256 or type(admin) is not bool:
                    return _err(f"{kind} {name}: addr must be a string, admin a bool")
                if kind == "node" and admin:
                    return _err(f"node {name}: only users are admins")
                records[str(fp)] = self._identity_record(str(name), kind, admin, str(cert), float(now), "genesis", addr)
        self.identities = records
        for rec in records.values():
            if rec["kind"] == "node":
                self.invited.setdefault(rec["name"], {"by": "genesis", "at": float(now)})
        return {"ok": True, "identities": len(records)}

    def _check_key(self, fp: Any, cert: Any) -> str | None:
        """What is wrong with a key (fingerprint and its PEM certificate), None if nothing."""
        if type(fp) is not str or HEX64.fullmatch(fp) is None:
            return "the fingerprint must be a SHA-256 in lower-case hex"
        real = cert_fingerprint(cert)
        if real is None:
            return f"the certificate is not one PEM certificate of at most {MAX_CERT} characters"
        if real != fp:
            return "the certificate does not have that fingerprint"
        return None

    def _token(self, c: Cmd) -> Result:
        """A one-time invitation for ``name``: only the SHA-256 of its secret is recorded.
        Refused while the name has an identity or a live invitation, unless ``replace``
        (a new secret, or another key for that name; the old secret stops working)."""
        name, kind, token_hash, expires = c["name"], c["kind"], c["token_hash"], c["expires"]
        by, now, replace = c["by"], c["now"], c.get("replace", False)
        if not valid_name(name):
            return _err(f"bad name {str(name)[:80]!r}: 1-64 printable characters without spaces")
        if kind not in KINDS:
            return _err(f"kind must be one of {', '.join(KINDS)}")
        if type(token_hash) is not str or HEX64.fullmatch(token_hash) is None:
            return _err("token_hash must be a SHA-256 in lower-case hex")
        if type(by) is not str or not 0 < len(by) <= 200 or type(replace) is not bool:
            return _err("by must be a name, replace a bool")
        if not (_number(now) and _number(expires)):
            return _err("now and expires must be finite numbers")
        if not now < expires <= now + MAX_TOKEN_TTL:
            return _err(f"an invitation must expire after now and within {MAX_TOKEN_TTL / 86400:.0f} days")
        fps = self.fingerprints_of(name)
        pending = self.tokens.get(name)
        live = pending is not None and now <= pending["expires"]
        if (fps or live) and not replace:
            what = "has a key" if fps else "has a pending invitation"
            return _err(f"{name} already {what}: ask to replace it explicitly", exists=True)
        if fps and self.identities[fps[0]]["kind"] != kind:
            return _err(f"{name} is a {self.identities[fps[0]]['kind']}, not a {kind}")
        if kind == "user" and (name in self.members or name in self.invited):
            return _err(f"{name} is the name of a member node: a user needs another name")
        if any(t["token_hash"] == token_hash for n, t in self.tokens.items() if n != name):
            return _err("that token is already issued for someone else")
        self.tokens = {n: t for n, t in self.tokens.items() if now <= t["expires"] and n != name}
        self.tokens[name] = {"kind": kind, "token_hash": token_hash, "expires": float(expires), "by": by,
                             "at": float(now)}
        return {"ok": True, "replaced": pending is not None}

    def _withdraw(self, c: Cmd) -> Result:
        """Withdraw a pending invitation: its secret stops working."""
        name = c["name"]
        if type(name) is not str or name not in self.tokens:
            return _err(f"no pending invitation for {str(name)[:80]!r}")
        del self.tokens[name]
        return {"ok": True}

    def _join(self, c: Cmd) -> Result:
        """A newcomer spends an invitation: its key (``fp``, ``cert``) gets the invitation's
        name and kind (never admin). Once: the invitation is deleted."""
        token_hash, fp, cert, now = c["token_hash"], c["fp"], c["cert"], c["now"]
        if type(token_hash) is not str or HEX64.fullmatch(token_hash) is None:
            return _err("token_hash must be a SHA-256 in lower-case hex")
        if not _number(now):
            return _err("now must be a finite number")
        bad = self._check_key(fp, cert)
        if bad:
            return _err(bad)
        name = next((n for n, t in self.tokens.items() if t["token_hash"] == token_hash), None)
        if name is None:
            return _err("unknown invitation: it was never made, is used already or was withdrawn", spent=True)
        invite = self.tokens[name]
        if now > invite["expires"]:
            return _err(f"the invitation for {name} has expired: ask for a new one", expired=True)
        if fp in self.identities:
            return _err(f"that key is registered already (as {self.identities[fp]['name']})", exists=True)
        fps = self.fingerprints_of(name)
        if fps and self.identities[fps[0]]["kind"] != invite["kind"]:
            return _err(f"{name} is a {self.identities[fps[0]]['kind']}, not a {invite['kind']}")
        self.identities[fp] = self._identity_record(name, invite["kind"], False, cert, float(now), invite["by"])
        del self.tokens[name]
        if invite["kind"] == "node":
            self.invited[name] = {"by": invite["by"], "at": float(now)}
        return {"ok": True, "name": name, "kind": invite["kind"]}

    def _revoke(self, c: Cmd) -> Result:
        """Remove every key of ``name``, its pending invitation, its invitation and its
        membership (like ``uninvite``; with ``term``, its running work runs elsewhere)."""
        name, term = c["name"], c.get("term")
        if type(name) is not str:
            return _err("name must be a string")
        if term is not None and type(term) is not int:
            return _err("term must be a whole number")
        if not (self.fingerprints_of(name) or name in self.tokens or name in self.invited or name in self.members):
            return _err(f"nobody called {name[:80]!r} has a key, an invitation or a membership")
        return self._drop_name(name, term, c.get("now", 0.0))

    def _rekey(self, c: Cmd) -> Result:
        """Replace one key of ``name`` (``old_fp``) with a new one: the old key stops working."""
        name, old_fp, fp, cert, now = c["name"], c["old_fp"], c["fp"], c["cert"], c.get("now")
        rec = self.identities.get(old_fp) if type(old_fp) is str else None
        if rec is None or rec["name"] != name:
            return _err(f"{str(name)[:80]!r} has no key {str(old_fp)[:70]!r}")
        bad = self._check_key(fp, cert)
        if bad:
            return _err(bad)
        if fp in self.identities:
            return _err(f"that key is registered already (as {self.identities[fp]['name']})", exists=True)
        if now is not None and not _number(now):
            return _err("now must be a finite number")
        new = {**rec, "cert": cert, "at": float(now) if now is not None else rec["at"]}
        self.identities = {(fp if k == old_fp else k): (new if k == old_fp else v) for k, v in self.identities.items()}
        return {"ok": True}

    def _leave(self, c: Cmd) -> Result:
        """A member leaves cleanly (its invitation stays: it may come back)."""
        name = str(c["name"])
        member = self.members.get(name)
        if member is None:
            return {"ok": True, "gone": True}
        if member.voter:
            return _err(f"{name} is a core (Raft) member: it must be removed from the core first")
        if type(c.get("term")) is not int:
            return _err("a leave needs the master's term (a whole number)")
        del self.members[name]
        if int(c["term"]) == self.master["term"]:
            self._lost({"node": name, "term": c["term"]})
        return {"ok": True}

    def _add_holder(self, c: Cmd) -> Result:
        """Another member now holds a copy of a job's input (a leaving member handed it over)."""
        job, index, node = self.jobs.get(str(c["job"])), int(c["input"]), str(c["node"])
        if job is None or not 0 <= index < len(job.inputs):
            return _err(f"no input {index} in job {c['job']!r}")
        holders = job.inputs[index]["holders"]
        if node not in holders:
            holders.append(node)
        return {"ok": True}

    def admitted(self, name: str) -> bool:
        """May a node called ``name`` talk to members (bootstrap: anyone with the secret)?"""
        return name in self.invited or name in self.members or not self.master["name"]

    def _master(self, c: Cmd) -> Result:
        term = int(c["term"])
        if term < self.master["term"]:
            return _err(f"stale term {term} < {self.master['term']}")
        self.master = {"term": term, "name": str(c["name"]), "data_addr": str(c["data_addr"])}
        return {"ok": True}

    def _submit(self, c: Cmd) -> Result:
        """Record a job and split it into tasks, within the caps (MAX_INPUTS, MAX_INPUT_SIZE,
        MAX_MAPS, MAX_REDUCES, names). The same id again with the same kind, inputs (names,
        sizes) and submitter is a retry (``dup``); with anything else it is refused."""
        job_id, kind, n_reduce, chunk = c["id"], c["kind"], c["n_reduce"], c["chunk_size"]
        priority, now, form = c.get("priority", 0), c["now"], c["form"]
        if not valid_job_id(job_id):
            return _err(f"bad job id {str(job_id)[:120]!r}: 1-100 letters, digits, '.', '_' and '-', "
                        "starting with a letter or digit", bad_request=True)
        if type(kind) is not str or KIND.fullmatch(kind) is None:
            return _err(f"bad job kind {str(kind)[:80]!r}", bad_request=True)
        if not _int(n_reduce, 1, MAX_REDUCES):
            return _err(f"n_reduce must be a whole number from 1 to {MAX_REDUCES}", bad_request=True)
        if not _int(chunk, 1, MAX_CHUNK):
            return _err(f"chunk_size must be a whole number from 1 to {MAX_CHUNK}", bad_request=True)
        if not _int(priority, -(1 << 62), 1 << 62):
            return _err("priority must be a whole number", bad_request=True)
        if not _number(now):
            return _err("now must be a finite number", bad_request=True)
        inputs, bad = _check_inputs(c["inputs"])
        steps, spec, code = c.get("steps", 1), c.get("spec") or {}, c.get("code") or {}
        bad = bad or _check_form(form) or _check_spec(spec, steps, code)
        if bad:
            return _err(bad, bad_request=True)
        known = self.jobs.get(job_id)
        if known is not None:
            if not known.same_submission(kind, inputs, str(form.get("submitter", ""))):
                return _err(f"job id {job_id} is already used for different inputs (or another kind or "
                            "submitter): submit with a new id", id_taken=True)
            return {"ok": True, "dup": True, "id": job_id}
        n_maps = sum(len(inp["cuts"]) + 1 if inp.get("cuts") is not None else -(-inp["size"] // chunk)
                     for inp in inputs)
        if n_maps > MAX_MAPS:
            return _err(f"the job would have {n_maps} map tasks, more than {MAX_MAPS}: use a larger chunk size",
                        bad_request=True)
        if self.members:  # (a state without members is only a test of placement)
            strangers = sorted({h for inp in inputs for h in inp["holders"] if h not in self.members})
            if strangers:
                return _err(f"input holders {', '.join(strangers)[:300]} are not members of the party",
                            bad_request=True)
        job = Job(job_id, self.next_seq, kind, inputs, n_reduce, chunk, dict(form), float(now),
                  priority=max(-MAX_PRIORITY, min(MAX_PRIORITY, priority)), steps=steps, spec=dict(spec),
                  code=dict(code))
        for k, inp in enumerate(inputs):
            for start, end, line in _ranges(inp, chunk):
                job.maps.append(Task("map", len(job.maps), input=k, start=start, end=end, line=line))
        job.reduces = [Task("reduce", r) for r in range(n_reduce)]
        self.next_seq += 1
        self.jobs[job_id] = job
        self._advance(job)  # inputs that are all empty have no map to wait for
        return {"ok": True, "id": job_id}

    def _check_order(self, c: Cmd) -> tuple[Job | None, Result | None]:
        """Common checks of a master's order: current term, known and active job."""
        term = int(c["term"])
        if term != self.master["term"]:
            return None, _err(f"order from term {term}, current master term is {self.master['term']}", stale=True)
        job = self.jobs.get(str(c["job"]))
        if job is None:
            return None, _err(f"unknown job {c['job']!r}")
        if job.state not in ACTIVE:
            return None, _err(f"job {job.id} is {job.state}", inactive=True)
        return job, None

    def _order_task(self, c: Cmd) -> tuple[Job, Task] | Result:
        """The job and task a master's order names, or the error result refusing it."""
        job, bad = self._check_order(c)
        if job is None:
            return bad or _err("unknown job")
        task = self._task(job, c)
        if task is None:
            return _err(f"no task {c['phase']} {c['index']} in job {job.id}")
        return job, task

    def _task(self, job: Job, c: Cmd) -> Task | None:
        if c["phase"] not in ("map", "reduce"):
            return None
        tasks = job.tasks(c["phase"])
        index = int(c["index"])
        return tasks[index] if 0 <= index < len(tasks) else None

    def _assign(self, c: Cmd) -> Result:
        """Start an attempt of a pending task on ``node``; with ``backup``, a second attempt
        of a running task (a straggler's backup copy) on another member."""
        lease_until, node, backup = float(c["lease_until"]), str(c["node"]), bool(c.get("backup"))
        found = self._order_task(c)
        if isinstance(found, dict):
            return found
        job, task = found
        if backup:
            if task.state != "running" or len(task.runs) != 1 or node in task.runs.values():
                return _err(f"task {task.phase} {task.index} of {job.id} cannot take a backup on {node}", busy=True)
        elif task.state != "pending":
            return _err(f"task {task.phase} {task.index} of {job.id} is {task.state}", busy=True)
        if task.phase == "reduce" and job.state != "reducing":
            return _err(f"job {job.id} is {job.state}: reduce tasks wait for every map")
        if backup:
            job.backups += 1
        task.attempt += 1
        if not backup:
            task.state, task.node, task.runs = "running", node, {}
        task.runs[task.attempt] = node
        task.term, task.lease_until = int(c["term"]), lease_until
        if job.state == "queued":
            job.state = "mapping"
        return {"ok": True, "attempt": task.attempt}

    def _complete(self, c: Cmd) -> Result:
        """Attempt ``attempt`` of a task finished on ``node``, which holds its output. Accepted
        only while that attempt runs on that node (``task.runs[attempt] == node``): a member
        cannot report work it was not given, nor an attempt given up on (released, lost).
        The first completion wins; the task's other attempt (a backup) is dropped. A small
        job's single task carries the job's ``result`` (and ``now``) and ends the job."""
        stats, node, attempt = c.get("stats") or {}, c["node"], c["attempt"]
        result = c.get("result")
        if type(node) is not str or not node:
            return _err("a completion must name the node holding the output")
        if type(stats) is not dict:
            return _err("stats must be a dict")
        if type(attempt) is not int:
            return _err("attempt must be a whole number")
        found = self._order_task(c)
        if isinstance(found, dict):
            return found
        job, task = found
        if task.state == "done":
            return _err("already done", dup=True)
        if not 1 <= attempt <= task.attempt:
            return _err(f"attempt {attempt} of task {task.phase} {task.index} was never assigned")
        runner = task.runs.get(attempt) if task.state == "running" else None
        if runner is None and task.given_up.get(attempt) == node:
            runner = node  # a stalled attempt given up on ran on and finished first: it still wins
        if runner is None:
            return _err(f"attempt {attempt} of task {task.phase} {task.index} of {job.id} is no longer running "
                        "(given up on); its result is not taken", stale_attempt=True)
        if runner != node:
            return _err(f"attempt {attempt} of task {task.phase} {task.index} of {job.id} runs on {runner}, "
                        f"not on {node}", not_yours=True)
        whole = job.whole and task.phase == "map" and isinstance(result, dict) and bool(result.get("holders"))
        now = c.get("now")
        if whole and not _number(now):
            return _err("the completion of a whole job needs now")
        task.state, task.node, task.stats, task.runs, task.given_up = "done", node, dict(stats), {}, {}
        self._credit(node, stats)
        if whole:
            reduce = job.reduces[0]  # done within the same task
            reduce.state, reduce.node, reduce.attempt = "done", node, max(reduce.attempt, 1)
            job.state, job.result, job.finished_at = "done", dict(result), float(now)  # type: ignore[arg-type]
            return {"ok": True, "job_done": True}
        self._advance(job, now if _number(now) else None)
        return {"ok": True}

    def _record(self, name: str) -> Record:
        return self.records.setdefault(name, Record())

    def _credit(self, name: str, stats: dict[str, Any]) -> None:
        """A member finished a task: count it, and fold its throughput into the average."""
        rec = self._record(name)
        rec.done, rec.streak = rec.done + 1, 0
        size, seconds = stats.get("input_bytes"), stats.get("seconds")
        if isinstance(size, (int, float)) and isinstance(seconds, (int, float)) and size >= RATE_MIN_BYTES \
                and seconds > 0:
            rate = float(size) / float(seconds)
            rec.rate = rate if not rec.rate else (1 - RATE_WEIGHT) * rec.rate + RATE_WEIGHT * rate

    def _blame(self, name: str, now: float, failed: bool) -> None:
        """An attempt failed (``failed``) or was given up on member ``name``."""
        rec = self._record(name)
        if failed:
            rec.failed += 1
        else:
            rec.lost += 1
        rec.streak += 1
        rec.last_fail = now

    def _advance(self, job: Job, now: float | None = None) -> None:
        """Derive the phase of an active job from its current step's tasks (it may also move
        back); when a step that is not the last is done, the next one starts."""
        maps = job.current("map")
        if not all(t.state == "done" for t in maps):
            if job.state != "queued" or any(t.attempt for t in maps):
                job.state = "mapping"
        elif not all(t.state == "done" for t in job.current("reduce")):
            job.state = "reducing"
        elif job.step + 1 < job.steps and not job.iterative:
            self._next_step(job, now)
        else:
            job.state = "assembling"  # (an iterative job's master makes the next round's model)

    def _next_step(self, job: Job, now: float | None = None) -> None:
        """Step k is done: its reduce outputs (each stored on two members, as the job's
        inputs are) become the inputs of step k + 1, one map each."""
        carried: list[dict[str, Any]] = []
        for t in job.current("reduce"):
            out = t.stats.get("output")
            holders = out.get("holders") if type(out) is dict else None
            if type(out) is not dict or not _int(out.get("size"), 0, MAX_INPUT_SIZE) \
                    or type(out.get("file_id")) is not str or FILE_ID.fullmatch(out["file_id"]) is None \
                    or type(holders) is not list or not holders or not all(valid_name(h) for h in holders):
                job.state, job.error = "failed", f"step {job.step + 1}: reduce {t.index} reported no stored output"
                job.finished_at = float(now) if now is not None else job.submitted_at
                _event(self, "failed", job.id, f"job {job.id} failed: {job.error}")
                return
            carried.append({"name": f"step {job.step + 1} output {len(carried)}", "size": out["size"],
                            "file_id": out["file_id"], "holders": list(holders)[:MAX_HOLDERS]})
        job.step += 1
        job.carried = carried
        for k, inp in enumerate(carried):
            job.maps.append(Task("map", len(job.maps), input=k, start=0, end=inp["size"], step=job.step))
        job.reduces.extend(Task("reduce", len(job.reduces), step=job.step) for _ in range(job.n_reduce))
        job.state = "mapping"
        _event(self, "step", job.id, f"job {job.id}: step {job.step + 1} of {job.steps} begins")

    def _round(self, c: Cmd) -> Result:
        """The master finished round ``round`` of an iterative job: ``model`` (plain, at most
        MAX_MODEL bytes) is what the next round's maps get. With ``done`` the job stays
        assembling (its result, the model file, is stored next); else round + 1 begins: the
        first round's map tasks again, over the same inputs (they stay where they are)."""
        job, bad = self._check_order(c)
        if job is None:
            return bad or _err("unknown job")
        model, rnd, done = c.get("model"), c.get("round"), c.get("done")
        if not job.iterative or job.state != "assembling" or job.spec.get("final"):
            return _err(f"job {job.id} is not between rounds", stale=True)
        if rnd != job.step:
            return _err(f"round {rnd} of job {job.id} is over (it is in round {job.step})", stale=True)
        if type(done) is not bool or not plain(model) or len(msgpack.packb(model)) > MAX_MODEL:
            return _err("a round needs done (true or false) and a plain model of at most "
                        f"{MAX_MODEL >> 20} MiB", bad_request=True)
        if not done and job.step + 1 >= MAX_ROUNDS:
            return _err(f"job {job.id} reached {MAX_ROUNDS} rounds", bad_request=True)
        job.spec = {**job.spec, "model": model, **({"final": True} if done else {})}
        text = str(c.get("text") or "")[:200]
        if done:
            _event(self, "round", job.id, f"job {job.id}: round {rnd + 1} was the last" + (f" ({text})" if text else ""))
            return {"ok": True}
        first = [t for t in job.maps if t.step == 0]
        job.step += 1
        job.steps = job.step + 1
        job.maps.extend(Task("map", len(job.maps), input=t.input, start=t.start, end=t.end, line=t.line,
                             step=job.step) for t in first)
        job.reduces.extend(Task("reduce", len(job.reduces), step=job.step) for _ in range(job.n_reduce))
        job.state = "mapping"
        _event(self, "round", job.id, f"job {job.id}: round {job.step + 1} begins" + (f" ({text})" if text else ""))
        return {"ok": True}

    def _rerun(self, job: Job, task: Task, reason: str) -> None:
        task.state, task.node, task.stats, task.runs = "pending", "", {}, {}
        job.reruns[reason] = job.reruns.get(reason, 0) + 1
        _event(self, "rerun", job.id, f"{task.phase} {task.index} runs again: {reason}")

    def _drop_run(self, job: Job, task: Task, attempt: int, reason: str) -> None:
        """Attempt ``attempt`` ends without a result: a backup carries on, else the task runs again."""
        task.runs.pop(attempt, None)
        if task.runs:
            task.node = next(iter(task.runs.values()))
        else:
            self._rerun(job, task, reason)

    def _release(self, c: Cmd) -> Result:
        """A running attempt is given up (member lost, stalled, failed): the task runs again
        (or its backup carries on).

        ``failed=True`` counts towards ``max_failures``; past it the job fails. ``blame``
        (default: true when failed) counts it against the member's record.
        """
        reason, attempt, failed = str(c["reason"])[:200], int(c["attempt"]), bool(c.get("failed"))
        max_failures, now, blame = int(c.get("max_failures", 0)), float(c["now"]), bool(c.get("blame", failed))
        reporter = c.get("node")  # a worker's own failure report: the name it proved
        found = self._order_task(c)
        if isinstance(found, dict):
            return found
        job, task = found
        node = task.runs.get(attempt)
        if task.state != "running" or node is None:
            return _err(f"task {task.phase} {task.index} attempt {attempt} is not running", stale_attempt=True)
        if reporter is not None and reporter != node:
            return _err(f"attempt {attempt} of task {task.phase} {task.index} of {job.id} runs on {node}, "
                        f"not on {str(reporter)[:80]}", not_yours=True)
        if blame:
            self._blame(node, now, failed)
        key = f"{task.phase} {task.index}"
        if failed:
            job.failures[key] = job.failures.get(key, 0) + 1
            if node not in task.failed_on:
                task.failed_on.append(node)
            if max_failures and job.failures[key] >= max_failures:
                job.state, job.finished_at = "failed", now
                job.error = f"{key} failed {job.failures[key]} times; last: {c['reason']}"[:MAX_ERROR]
                return {"ok": True, "job_failed": True}
        if c.get("may_finish") is True and not failed:  # stalled, not known dead: if it finishes first, it wins
            task.given_up[attempt] = node
        self._drop_run(job, task, attempt, reason.split(":")[0])
        return {"ok": True}

    def _lost(self, c: Cmd) -> Result:
        """Member ``node`` is gone: its running tasks and the outputs it held run again.

        Reduce outputs it held are redone; map outputs only while some reduce still needs
        them (Google MapReduce: completed maps of a failed worker are reset).
        """
        name, now = str(c["node"]), float(c.get("now", 0.0))
        job_count = 0
        if int(c["term"]) != self.master["term"]:
            return _err("order from an old term", stale=True)
        if name in self.members or name in self.records:
            self._blame(name, now, failed=False)
        for job in self.active_jobs():
            before = sum(job.reruns.values())
            maps, reduces = job.current("map"), job.current("reduce")
            for t in maps + reduces:
                if t.state == "running":
                    for attempt in [a for a, n in t.runs.items() if n == name]:
                        self._drop_run(job, t, attempt, f"member {name} lost")
                elif t.node == name and t.phase == "reduce" and t.state == "done" and job.step + 1 == job.steps:
                    self._rerun(job, t, f"member {name} lost")  # (an earlier step's outputs have two holders)
            if not all(t.state == "done" for t in reduces):
                for t in maps:
                    if t.node == name and t.state == "done":
                        self._rerun(job, t, f"map output lost with {name}")
            self._advance(job)
            job_count += sum(job.reruns.values()) != before
        return {"ok": True, "jobs": job_count}

    def _redo(self, c: Cmd) -> Result:
        """Outputs of done tasks could not be fetched from ``holder``: run those tasks again."""
        holder, phase, indexes = str(c["holder"]), str(c["phase"]), [int(i) for i in c["indexes"]]
        job, bad = self._check_order(c)
        if job is None:
            return bad or _err("unknown job")
        if phase not in ("map", "reduce"):
            return _err(f"unknown phase {phase!r}")
        tasks, redone = job.tasks(phase), 0
        for i in indexes:
            if 0 <= i < len(tasks) and tasks[i].state == "done" and tasks[i].node == holder \
                    and tasks[i].step == job.step:
                self._rerun(job, tasks[i], f"{phase} output unreachable on {holder}")
                redone += 1
        self._advance(job)
        return {"ok": True, "redone": redone}

    def _fail(self, c: Cmd) -> Result:
        now, error = float(c["now"]), str(c["error"])[:MAX_ERROR]
        job, bad = self._check_order(c)
        if job is None:
            return bad or _err("unknown job")
        job.state, job.error, job.finished_at = "failed", error, now
        return {"ok": True}

    def _finish(self, c: Cmd) -> Result:
        now, result = float(c["now"]), dict(c["result"])
        job, bad = self._check_order(c)
        if job is None:
            return bad or _err("unknown job")
        if job.state != "assembling":
            return _err(f"job {job.id} is {job.state}, not assembling")
        job.state, job.result, job.finished_at = "done", result, now
        return {"ok": True}

    def _cancel(self, c: Cmd) -> Result:
        """A user stops a job: no task of it runs again, members drop its files."""
        by, now = str(c.get("by", "?"))[:200], float(c["now"])
        job = self.jobs.get(str(c["job"]))
        if job is None:
            return _err(f"no job {c['job']!r} in the party (check `pdp jobs`)")
        if job.state not in ACTIVE:
            return _err(f"job {job.id} is already {job.state}", inactive=True)
        job.state, job.finished_at, job.error = "cancelled", now, f"cancelled by {by}"
        for t in job.maps + job.reduces:
            t.runs = {}
        return {"ok": True}

    def _batch(self, c: Cmd, raft_term: int | None = None) -> Result:
        if not isinstance(c["cmds"], list):
            return _err("batch needs a list of commands")
        return {"ok": True, "results": [self.apply(sub, raft_term) for sub in c["cmds"]]}

    # -- queries (read-only helpers for the shell) ---------------------------------------

    def event_list(self, job: str = "", after: int = 0, limit: int = MAX_EVENTS) -> list[dict[str, Any]]:
        """The latest ``limit`` events after sequence number ``after`` (only job ``job``'s if
        one is named), oldest first, as ``{"seq", "time", "kind", "job", "text"}``."""
        picked = [e for e in self.events if e[0] > after and (not job or e[3] == job)][-limit:]
        return [{"seq": e[0], "time": e[1], "kind": e[2], "job": e[3], "text": e[4]} for e in picked]

    def active_jobs(self) -> list[Job]:
        return sorted((j for j in self.jobs.values() if j.state in ACTIVE), key=lambda j: j.seq)

    def identity(self, fp: str) -> dict[str, Any] | None:
        """Who holds the key with fingerprint ``fp`` (a copy), or None: a stranger."""
        rec = self.identities.get(fp)
        return dict(rec) if rec is not None else None

    def fingerprints_of(self, name: str) -> list[str]:
        """The fingerprints of every key of ``name`` (in the order they were registered)."""
        return [fp for fp, rec in self.identities.items() if rec["name"] == name]

    def node_certs(self) -> list[str]:
        """Every registered certificate (PEM), nodes' and users': a TLS trust store."""
        return list(dict.fromkeys(rec["cert"] for rec in self.identities.values()))

    def is_admin(self, name: str) -> bool:
        return any(rec["admin"] and rec["name"] == name for rec in self.identities.values())

    def invitation(self, token_hash: str, now: float) -> dict[str, Any] | None:
        """The live invitation with that secret's hash: {"name", "kind", "expires", "by"}."""
        for name, t in self.tokens.items():
            if t["token_hash"] == token_hash and now <= t["expires"]:
                return {"name": name, "kind": t["kind"], "expires": t["expires"], "by": t["by"]}
        return None


def _event(state: State, kind: str, job: str, text: str) -> None:
    seq = state.events[-1][0] + 1 if state.events else 1
    state.events.append([seq, state.clock, kind, job, text[:MAX_ERROR]])
    if len(state.events) > MAX_EVENTS:
        del state.events[: len(state.events) - MAX_EVENTS]


def _task_name(c: Cmd) -> str:
    return f"{c.get('phase')} {c.get('index')}"


def note_event(state: State, op: str, c: Cmd, res: Result) -> None:
    """Record what an applied command means to the people watching: elections, members
    joining, lost and leaving, jobs submitted, backups, the end. (Re-runs, with why, and
    steps are recorded where they happen: ``_rerun``, ``_next_step``.)"""
    job = str(c.get("job") or c.get("id") or "")
    if op == "master":
        _event(state, "election", "", f"{c['name']} is master in term {c['term']}")
    elif op == "member":
        _event(state, "member", "", f"{c['name']} is a member ({c.get('cpus')} cpus)")
    elif op == "lost":
        _event(state, "lost", "", f"member {c['node']} lost: its tasks of {res.get('jobs', 0)} job(s) run again "
                                  "elsewhere")
    elif op == "leave":
        _event(state, "left", "", f"{c.get('name')} left the party")
    elif op == "submit":
        _event(state, "submitted", job, f"job {job} submitted by {c.get('form', {}).get('submitter', '?')}")
    elif op == "assign" and c.get("backup"):
        _event(state, "backup", job, f"{_task_name(c)}: a backup attempt on {c['node']}")
    elif op == "complete" and res.get("job_done"):
        _event(state, "done", job, f"job {job} done")
    elif op == "fail":
        _event(state, "failed", job, f"job {job} failed: {c.get('error', '')}")
    elif op == "finish":
        _event(state, "done", job, f"job {job} done")
    elif op == "cancel":
        _event(state, "cancelled", job, f"job {job} cancelled")


ORDERS = frozenset({"master", "assign", "complete", "release", "lost", "redo", "fail", "finish", "round"})
_HANDLERS = {
    "member": State._member,
    "master": State._master,
    "submit": State._submit,
    "assign": State._assign,
    "complete": State._complete,
    "fail": State._fail,
    "finish": State._finish,
    "round": State._round,
    "batch": State._batch,
    "release": State._release,
    "lost": State._lost,
    "redo": State._redo,
    "invite": State._invite,
    "uninvite": State._uninvite,
    "leave": State._leave,
    "add_holder": State._add_holder,
    "cancel": State._cancel,
    "genesis": State._genesis,
    "token": State._token,
    "withdraw": State._withdraw,
    "join": State._join,
    "revoke": State._revoke,
    "rekey": State._rekey,
}

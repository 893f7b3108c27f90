"""The ``pdp`` command line (typer): parse, load settings, call; PdpError -> message, exit 1."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pdp.client import Client, new_job_id, run_job
from pdp.config import default_key_file, load_config, load_key, write_key
from pdp.errors import PdpError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="pdp — Party Distributed Processing: bring your own bits.")
party_app = typer.Typer(no_args_is_help=True, help="Create and manage a party.")
app.add_typer(party_app, name="party")
err = Console(stderr=True)
T = TypeVar("T")

NODE_HELP = "HOST:PORT of any member (default: $PDP_NODE, else 127.0.0.1:7700)"
KEY_HELP = "the party secret (default: $PDP_KEY_FILE, else the per-user config dir)"
NodeOpt = Annotated[Optional[str], typer.Option(help=NODE_HELP)]
KeyOpt = Annotated[Optional[Path], typer.Option(envvar="PDP_KEY_FILE", help=KEY_HELP)]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except PdpError as exc:
        _error(str(exc))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _error(message: str) -> None:
    """One unwrapped line on stderr (red on a terminal) so scripts can grep it."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def _node_addr(node: Optional[str]) -> str:
    return node or os.environ.get("PDP_NODE") or "127.0.0.1:7700"


def _key(key_file: Optional[Path]) -> bytes:
    try:
        return load_key(key_file or default_key_file())
    except PdpError as exc:
        _error(str(exc))
        raise typer.Exit(1) from None


@app.command()
def node(
    name: Optional[str] = typer.Option(None, help="node id (default: host name)"),
    listen: Optional[str] = typer.Option(None, help="data-plane bind address HOST:PORT (default 0.0.0.0:7700)"),
    advertise: Optional[str] = typer.Option(None, help="the HOST:PORT others dial (default: the listen address)"),
    raft_port: Optional[int] = typer.Option(None, help="Raft port (default: data port + 1)"),
    peer: list[str] = typer.Option([], help="data-plane HOST:PORT of another core member (repeatable)"),
    data_dir: Optional[Path] = typer.Option(None, help="Raft journal and dump, spool (default: per-user data dir)"),
    key_file: KeyOpt = None,
    config: Optional[Path] = typer.Option(None, help="TOML settings file; flags override it"),
    cpus: Optional[int] = typer.Option(None, help="task slots this node gives (default: all cores)"),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="log debug detail"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="log warnings and errors only"),
) -> None:
    """Run a party member (the same process on every machine)."""
    from pdp.node import run_node

    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logging.getLogger("pysyncobj").setLevel(logging.DEBUG if verbose else logging.WARNING)
    overrides = {"name": name, "listen": listen, "advertise": advertise, "raft_port": raft_port,
                 "peers": tuple(peer), "data_dir": data_dir, "key_file": key_file, "cpus": cpus}
    try:
        code = run_node(load_config(config, overrides), lambda: load_config(config, overrides))
    except PdpError as exc:
        _error(str(exc))
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@party_app.command("init")
def party_init(
    dir: Optional[Path] = typer.Option(None, "--dir", help="where to write party.key and pdp.toml"),
    force: bool = typer.Option(False, help="replace an existing party secret"),
) -> None:
    """Write a new random party secret (mode 0600) and a config template."""
    key_path = (dir / "party.key") if dir else default_key_file()
    try:
        write_key(key_path, force=force)
    except PdpError as exc:
        _error(str(exc))
        raise typer.Exit(1) from None
    conf_path = key_path.parent / "pdp.toml"
    if not conf_path.exists():
        conf_path.write_text(_TEMPLATE.format(key=key_path.resolve()))
    print(f"party secret: {key_path} (copy it, mode 0600, to every member)")
    print(f"config:       {conf_path}")


@app.command()
def submit(
    job: str = typer.Argument(..., help="job kind, e.g. wordcount"),
    inputs: list[Path] = typer.Argument(..., help="input files on this machine"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="where to write the result (default <job-id>.tsv)"),
    node: NodeOpt = None,
    comment: str = typer.Option("", help="free text kept with the job"),
    data_type: str = typer.Option("text/utf-8", help="the inputs' data type"),
    priority: int = typer.Option(0, min=-100, max=100,
                                 help="higher runs first (-100..100); equal priorities share the party fairly "
                                      "by submitter"),
    detach: bool = typer.Option(False, help="print the job id and return without waiting"),
    as_json: bool = typer.Option(False, "--json", help="print the outcome as JSON"),
    key_file: KeyOpt = None,
) -> None:
    """Submit a job with its input files; wait for it and write the result."""
    job_id = new_job_id(job)
    out = output or Path(f"{job_id}.tsv")
    if not detach and not out.parent.resolve().is_dir():
        _error(f"the output directory {out.parent} does not exist")
        raise typer.Exit(1)
    key = _key(key_file)
    form = {"comment": comment, "data_type": data_type, "output": str(out), "priority": priority}
    result = _run(_submit(_node_addr(node), key, job, inputs, job_id, out, form, detach, as_json))
    if as_json:
        print(json.dumps(result))
    elif detach:
        print(job_id)
    else:
        print(f"{job_id}: {result['keys']} keys, {result['size']} bytes -> {out}")


async def _submit(addr: str, key: bytes, kind: str, inputs: list[Path], job_id: str, out: Path,
                  form: dict[str, Any], detach: bool, as_json: bool) -> dict[str, Any]:
    if detach:
        async with Client(addr, key) as client:
            ack = await client.submit(kind, inputs, job_id, **form)
        return {"id": job_id, "accepted": True, "dup": ack.get("dup", False)}
    with _progress_view(job_id, quiet=as_json) as show:
        summary, head = await run_job([addr], key, kind, inputs, job_id, out, show, **form)
    return {"id": job_id, "output": str(out), "size": head["size"], "keys": head.get("keys"),
            "sha256": head["sha256"], "done_on": summary["done_on"], "reruns": summary.get("reruns", {}),
            "seconds": round(summary["finished_at"] - summary["submitted_at"], 3)}


class _progress_view:
    """A rich progress bar on a terminal, plain lines otherwise (nothing with --json)."""

    def __init__(self, job_id: str, quiet: bool) -> None:
        self.job_id, self.quiet = job_id, quiet
        self.tty = sys.stderr.isatty()
        self.bar: Progress | None = None
        self.last = ""

    def __enter__(self) -> _progress_view:
        if self.tty and not self.quiet:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[nodes]}"), TimeElapsedColumn(), console=err)
            self.bar.start()
            self.maps = self.bar.add_task("map", total=None, nodes="")
            self.reduces = self.bar.add_task("reduce", total=None, nodes="")
        return self

    def __call__(self, p: dict[str, Any]) -> None:
        if p.get("t") not in ("progress", "done"):
            return
        nodes = ", ".join(p.get("nodes_at_work", []))
        if self.bar is not None:
            self.bar.update(self.maps, total=p["maps"], completed=p["maps_done"], nodes=nodes if p["state"] == "mapping" else "")
            self.bar.update(self.reduces, total=p["reduces"], completed=p["reduces_done"],
                            nodes=nodes if p["state"] == "reducing" else "")
        elif not self.quiet:
            line = (f"{self.job_id}: {p['state']}, maps {p['maps_done']}/{p['maps']}, "
                    f"reduces {p['reduces_done']}/{p['reduces']}" + (f", at work: {nodes}" if nodes else ""))
            if line != self.last:
                err.print(line, highlight=False, soft_wrap=True, markup=False)
                self.last = line

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
def status(
    node: NodeOpt = None,
    as_json: bool = typer.Option(False, "--json", help="print JSON (top-level `leader` names the leader)"),
    key_file: KeyOpt = None,
) -> None:
    """Members, leader, term, heartbeats and current tasks."""
    st = _run(_call(_node_addr(node), _key(key_file), "status"))
    st.pop("t", None), st.pop("s", None)
    if as_json:
        print(json.dumps(st, indent=2))
        return
    con = Console()
    raft = st["raft"]
    con.print(f"node [bold]{st['node']}[/bold]; leader [bold]{st['leader'] or 'none'}[/bold], term {st['term']}; "
              f"jobs: {st['jobs']}", highlight=False)
    con.print(f"raft: commit {raft['commit_idx']}, applied {raft['last_applied']}, truncations of applied entries "
              f"{raft['truncations']}, diverged {raft['diverged']}", highlight=False)
    if st["reruns"]:
        con.print("tasks re-run: " + ", ".join(f"{n}× {why}" for why, n in sorted(st["reruns"].items())),
                  highlight=False)
    table = Table("member", "health", "data address", "cpus", "score", "done/failed/lost", "last heartbeat",
                  "current tasks (progress)")
    colors = {"alive": "green", "suspected": "yellow", "dead": "red"}
    for m in st["members"]:
        age = "never" if m["heartbeat_age"] is None else f"{m['heartbeat_age']:.1f} s ago"
        tasks = ", ".join(f"{t['job']} {t['phase']} {t['index']} ({_size(t.get('progress', 0))})"
                          for t in m["tasks"])
        if m.get("paused"):
            tasks = f"[yellow]paused: {escape(m['paused'])}[/]" + (f"; finishing {tasks}" if tasks else "")
        health, rec = m["health"], m.get("record") or {}
        score = f"{m['score']:.2f}" + (f" ({_size(m['rate'])}/s)" if m.get("rate") else "")
        if m.get("benched_until", 0) > time.time():
            score += " benched"
        table.add_row(m["name"] + (" (leader)" if m["name"] == st["leader"] else ""),
                      f"[{colors.get(health, 'white')}]{health}[/]", m["data_addr"], str(m["cpus"]), score,
                      f"{rec.get('done', 0)}/{rec.get('failed', 0)}/{rec.get('lost', 0)}", age, tasks or "-")
    con.print(table)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def jobs(
    job_id: Optional[str] = typer.Argument(None, help="show this job's tasks: where each ran, attempts, times"),
    node: NodeOpt = None,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    key_file: KeyOpt = None,
) -> None:
    """The party's jobs, oldest first (or one job's tasks)."""
    if job_id is not None:
        _show_job(_run(_with_client(_node_addr(node), _key(key_file), lambda c: c.job(job_id))), as_json)
        return
    listing = _run(_with_client(_node_addr(node), _key(key_file), lambda c: c.jobs()))
    if as_json:
        print(json.dumps(listing, indent=2))
        return
    table = Table("job", "kind", "state", "maps", "reduces", "size", "submitter", "priority", "comment")
    for j in listing:
        table.add_row(j["id"], j["kind"], j["state"] + (f": {j['error']}" if j["error"] else ""),
                      f"{j['maps_done']}/{j['maps']}", f"{j['reduces_done']}/{j['reduces']}", str(j["form"]["size"]),
                      j["form"]["submitter"], str(j.get("priority", 0)), j["form"]["comment"])
    Console().print(table)


def _show_job(job: dict[str, Any], as_json: bool) -> None:
    job.pop("t", None)
    if as_json:
        print(json.dumps(job, indent=2))
        return
    con = Console()
    con.print(f"{job['id']}: {job['kind']}, {job['state']}{': ' + job['error'] if job['error'] else ''}; "
              f"priority {job['priority']}, {job['backups']} backup attempt(s), re-runs {job['reruns'] or 'none'}",
              highlight=False)
    table = Table("task", "state", "on", "attempts", "bytes", "seconds")
    for t in job["tasks"]:
        where = t["node"] or ", ".join(n for _, n in t["runs"]) or "-"
        table.add_row(f"{t['phase']} {t['index']}", t["state"], where, str(t["attempt"]),
                      _size(t["stats"].get("input_bytes", t["bytes"])), str(t["stats"].get("seconds", "")))
    con.print(table)


@app.command()
def cancel(
    job_id: str = typer.Argument(..., help="the job id that submit printed"),
    node: NodeOpt = None,
    key_file: KeyOpt = None,
) -> None:
    """Stop a job: its tasks stop, its spool space is freed on every member."""
    _run(_call(_node_addr(node), _key(key_file), "cancel", id=job_id))
    print(f"{job_id} cancelled")


@app.command()
def reload(
    node: Optional[str] = typer.Option(None, help="HOST:PORT of the member to reload (default: $PDP_NODE)"),
    key_file: KeyOpt = None,
) -> None:
    """Make the member at --node read its config file again (as `kill -HUP` does)."""
    res = _run(_call(_node_addr(node), _key(key_file), "reload"))
    print("applied: " + (", ".join(res["applied"]) or "no changes"))
    if res["restart"]:
        print("these take effect after a restart: " + ", ".join(res["restart"]))


@app.command()
def result(
    job_id: str = typer.Argument(..., help="the job id that submit printed"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="where to write it (default <job-id>.tsv)"),
    node: NodeOpt = None,
    key_file: KeyOpt = None,
) -> None:
    """Fetch a finished job's output."""
    out = output or Path(f"{job_id}.tsv")

    async def fetch() -> dict[str, Any]:
        async with Client(_node_addr(node), _key(key_file)) as client:
            return await client.fetch_result(job_id, out)

    head = _run(fetch())
    print(f"{job_id}: {head['size']} bytes -> {out}")


@app.command()
def invite(
    name: str = typer.Argument(..., help="the new member's node name (its --name)"),
    node: NodeOpt = None,
    key_file: KeyOpt = None,
) -> None:
    """Invite a member: only invited nodes may join the party."""
    key_path = key_file or default_key_file()
    res = _run(_call(_node_addr(node), _key(key_file), "invite", name=name))
    print(f"{name} is invited. On the new machine:")
    print(f"  1. copy the party secret {key_path} there (mode 0600)")
    print(f"  2. pdp node --name {name} --peer {res['join']} --advertise THAT_HOST:7700 --key-file PATH")


@app.command()
def uninvite(
    name: str = typer.Argument(..., help="the member's node name"),
    node: NodeOpt = None,
    key_file: KeyOpt = None,
) -> None:
    """Withdraw an invitation: the member is cut off at once and its tasks run elsewhere."""
    _run(_call(_node_addr(node), _key(key_file), "uninvite", name=name))
    print(f"{name} is no longer invited; it has been disconnected")


core_app = typer.Typer(no_args_is_help=True, help="Change the Raft core (the voters), one member at a time.")
app.add_typer(core_app, name="core")


@core_app.command("add")
def core_add(
    name: str = typer.Argument(..., help="a member that works without a Raft seat"),
    node: NodeOpt = None,
    key_file: KeyOpt = None,
) -> None:
    """Give a member a Raft seat (keep the core at 3 or 5 voters)."""
    res = _run(_call(_node_addr(node), _key(key_file), "core", action="add", name=name))
    print(f"{name} is a core member; voters: {', '.join(res['voters'])}")


@core_app.command("remove")
def core_remove(
    name: str = typer.Argument(..., help="a core member"),
    node: NodeOpt = None,
    key_file: KeyOpt = None,
) -> None:
    """Take a member's Raft seat away (leadership moves first if it leads); it stays a worker."""
    res = _run(_call(_node_addr(node), _key(key_file), "core", action="remove", name=name))
    print(f"{name} left the core; voters: {', '.join(res['voters'])}")


@app.command()
def leave(
    node: Optional[str] = typer.Option(None, help="HOST:PORT of the member that leaves (default: $PDP_NODE)"),
    key_file: KeyOpt = None,
) -> None:
    """The member at --node leaves the party cleanly: its Raft seat and tasks are handed over."""
    _run(_call(_node_addr(node), _key(key_file), "leave"))
    print(f"the member at {_node_addr(node)} left the party")


@app.command()
def demo(
    nodes: int = typer.Option(3, help="how many local nodes"),
    keep: bool = typer.Option(False, help="keep the temp dir (logs, spools) afterwards"),
) -> None:
    """Start a local party, word-count the bundled sample, check it against the oracle."""
    from pdp.demo import run_demo

    _run(run_demo(nodes, keep))


async def _with_client(addr: str, key: bytes, op: Callable[[Client], Awaitable[T]]) -> T:
    async with Client(addr, key) as client:
        return await op(client)


async def _call(addr: str, key: bytes, kind: str, **fields: Any) -> dict[str, Any]:
    return await _with_client(addr, key, lambda c: c.call(kind, timeout=60.0, **fields))


_TEMPLATE = """\
# pdp node settings: `pdp node --config THIS_FILE`; flags override them.
# Every key is documented in configs/node.example.toml of the pdp repository.
[node]
# name = "my-laptop"                # node id, unique in the party (default: host name)
# listen = "0.0.0.0:7700"           # data-plane bind address; Raft binds PORT+1 on the same host
# advertise = "192.168.1.20:7700"   # the address other members dial (needed with 0.0.0.0; NAT: the public one)
# raft_port = 0                     # 0 = data port + 1 (peers assume + 1)
# peers = ["192.168.1.21:7700", "192.168.1.22:7700"]  # the other core members
# data_dir = "~/.local/share/pdp"   # Raft journal and dump, spool
key_file = "{key}"
# cpus = 2                          # task slots this node gives the party (default: all cores)
# chunk_mb = 8.0                    # map chunk size for jobs submitted through this node
# reduces = 0                       # reduce tasks per job; 0 = one per task slot, at most 16
# heartbeat = 0.5                   # seconds between heartbeats to the master
# dead_after = 2.5                  # a member silent this long is lost (same on every member)
# stall_after = 30.0                # a task without progress this long runs again
# max_failures = 10                 # a task failing this often fails its job
# backup_tasks = true               # a straggler near a phase's end gets a backup copy on a faster member
#
# The owner's limits (change them and run `kill -HUP PID` or `pdp reload`: no restart needed)
# memory = "2G"                     # per task; a task needing more fails here and runs elsewhere (0 = no limit)
# disk = "20G"                      # most the spool may use; above it the node takes no work (0 = no limit)
# nice = 10                         # niceness of task processes, 0-19
# hours = ["mon-fri 18:00-08:00", "weekends"]  # when the node takes work (default: always)
# max_load = 0.5                    # pause while the owner's own programs use more than this share of the CPUs
# pause_on_battery = true           # pause while a laptop runs on battery
# on_pause = "finish"               # or "hand_back": give running tasks back at once when pausing
"""


def main() -> None:
    app()


if __name__ == "__main__":
    main()

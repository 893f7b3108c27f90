"""The ``pdp`` command line (typer): parse, load settings, call; PdpError -> message, exit 1.

Exit codes (README "Exit codes"): 0 success, 1 error, 2 usage (click), 3 ``pdp wait --timeout``
ran out (and ``pdp service status``: not running), 130 Ctrl-C. ``--json`` prints one document
on stdout and nothing else there.
"""

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
from rich.text import Text

from pdp.client import Client, Failover, WaitTimeout, follow_job, job_state, new_job_id, run_job, submit_job
from pdp.config import default_config_file, default_data_dir, load_config
from pdp.identity import Credential, display_id, load_credential
from pdp.errors import PdpError
from pdp.service import service_app

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="pdp — Party Distributed Processing: bring your own bits.")
party_app = typer.Typer(no_args_is_help=True, help="Create and manage a party.")
app.add_typer(party_app, name="party")
app.add_typer(service_app, name="service")
err = Console(stderr=True)
T = TypeVar("T")

NODE_HELP = "HOST:PORT of any member (default: $PDP_NODE, else 127.0.0.1:7700)"
KEY_HELP = "your credential file (default: $PDP_KEY_FILE, else user.cred in the per-user config dir)"
NodeOpt = Annotated[Optional[str], typer.Option(help=NODE_HELP)]
KeyOpt = Annotated[Optional[Path], typer.Option(envvar="PDP_KEY_FILE", help=KEY_HELP)]


TIMED_OUT = 3  # `pdp wait --timeout`: the job did not end in time (it goes on)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except WaitTimeout as exc:
        _error(str(exc))
        raise typer.Exit(TIMED_OUT) from None
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


def _key(key_file: Optional[Path]) -> Credential:
    try:
        return load_credential(key_file)
    except PdpError as exc:
        _error(str(exc))
        raise typer.Exit(1) from None


@app.command()
def node(
    name: Optional[str] = typer.Option(None, help="node name (default: host name)"),
    listen: Optional[str] = typer.Option(None, help="bind address HOST:PORT for everything (default 0.0.0.0:7700)"),
    advertise: Optional[str] = typer.Option(None, help="the HOST:PORT others dial (default: the listen address)"),
    peer: list[str] = typer.Option([], help="HOST:PORT of a member to ask where the core is (repeatable)"),
    data_dir: Optional[Path] = typer.Option(None, help="identity, Raft journal, spool (default: per-user data dir)"),
    config: Optional[Path] = typer.Option(None, help="TOML settings file; flags override it "
                                                     "(default: $PDP_CONFIG, else pdp.toml in the per-user config dir)"),
    cpus: Optional[int] = typer.Option(None, help="task slots this node gives (default: all cores)"),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="log debug detail"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="log warnings and errors only"),
    dashboard: Optional[str] = typer.Option(None, help="the web dashboard and /metrics: HOST:PORT (beyond loopback: "
                                                       "HTTPS for party identities only), or off "
                                                       "(default 127.0.0.1:7780)"),
    log_file: Optional[Path] = typer.Option(None, help="log to this file instead of stderr, rotated at 10 MiB "
                                                       "(5 old files kept: FILE.1 ... FILE.5)"),
    discover: Optional[bool] = typer.Option(None, "--discover", help="announce this node on the LAN by mDNS "
                                                                      "(_pdp._tcp) and find the party's members there"),
) -> None:
    """Run a party member (the same process on every machine); `pdp party init` or `pdp join` first."""
    from logging.handlers import RotatingFileHandler

    from pdp.node.root import run_node

    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if log_file is not None:  # launchd has no journal: a file that cannot fill the disk
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(log_file, maxBytes=10 << 20, backupCount=5, encoding="utf-8")
    logging.basicConfig(handlers=[handler], format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logging.getLogger("pysyncobj").setLevel(logging.DEBUG if verbose else logging.WARNING)
    if config is None and (default_config_file().exists() or os.environ.get("PDP_CONFIG")):
        config = default_config_file()  # a $PDP_CONFIG that names no file is an error, not silence
    overrides = {"name": name, "listen": listen, "advertise": advertise, "peers": tuple(peer), "data_dir": data_dir,
                 "cpus": cpus, "dashboard": dashboard, "discover": discover}
    try:
        code = run_node(load_config(config, overrides), lambda: load_config(config, overrides))
    except PdpError as exc:
        _error(str(exc))
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@party_app.command("init")
def party_init(
    dir: Optional[Path] = typer.Option(None, "--dir", help="put everything here (data dirs, configs, admin.cred): "
                                                           "for local parties and scripts"),
    name: Optional[str] = typer.Option(None, help="this node's name (default: host name)"),
    listen: str = typer.Option("0.0.0.0:7700", help="this node's bind address"),
    advertise: Optional[str] = typer.Option(None, help="the HOST:PORT other machines dial"),
    admin: Optional[str] = typer.Option(None, help="the admin user's name (default: your login name)"),
    nodes: list[str] = typer.Option([], "--node", help="NAME=HOST:PORT of a founding node on this machine "
                                                       "(repeatable; with --dir: a local party of several nodes)"),
    key_file: KeyOpt = None,
    force: bool = typer.Option(False, help="replace an existing identity or party"),
) -> None:
    """Found a party: this machine's node (or several local ones) and an admin user for you."""
    from pdp.setup import found_party

    try:
        lines = found_party(dir, name, listen, advertise, admin, nodes, key_file, force)
    except PdpError as exc:
        _error(str(exc))
        raise typer.Exit(1) from None
    print("\n".join(lines))


@app.command("id")
def show_id(
    data_dir: Optional[Path] = typer.Option(None, help="the node's data dir (default: the per-user data dir)"),
    key_file: KeyOpt = None,
    as_json: bool = typer.Option(False, "--json", help='print {"node": {"id", "path"}, "user": {"id", "name", '
                                                       '"path"}} (null for what does not exist)'),
) -> None:
    """This machine's ids: its node's and your user's (compare them with what others see)."""
    ids = _ids(data_dir, key_file)
    if not any(ids.values()):
        _error("no identity on this machine yet: `pdp party init` founds a party, `pdp join TOKEN` joins one")
        raise typer.Exit(1)
    if as_json:
        print(json.dumps(ids))
        return
    if ids["node"]:
        print(f"node  {ids['node']['id']}  ({ids['node']['path']})")
    if ids["user"]:
        print(f"user  {ids['user']['id']}  {ids['user']['name']} ({ids['user']['path']})")


def _ids(data_dir: Optional[Path], key_file: Optional[Path]) -> dict[str, Optional[dict[str, str]]]:
    """The node's id and the user's, each None if this machine has none."""
    from pdp.identity import node_identity_path, pem_fingerprint

    ids: dict[str, Optional[dict[str, str]]] = {"node": None, "user": None}
    path = node_identity_path(data_dir or default_data_dir())
    if path.exists():
        text = path.read_text()
        ids["node"] = {"id": display_id(pem_fingerprint(text[text.index("-----BEGIN CERTIFICATE-----"):])),
                       "path": str(path)}
    try:
        cred = load_credential(key_file)
    except PdpError:
        return ids
    ids["user"] = {"id": cred.identity.display, "name": cred.name, "path": str(cred.path)}
    return ids


@app.command()
def join(
    token: str = typer.Argument(..., help="the token `pdp invite` printed"),
    data_dir: Optional[Path] = typer.Option(None, help="a node's data dir (default: the per-user data dir)"),
    listen: str = typer.Option("0.0.0.0:7700", help="a node's bind address"),
    advertise: Optional[str] = typer.Option(None, help="the HOST:PORT other members dial for this node"),
    config: Optional[Path] = typer.Option(None, help="where to write the node's settings (default: pdp.toml in "
                                                     "the per-user config dir)"),
    key_file: KeyOpt = None,
    force: bool = typer.Option(False, help="replace an existing credential"),
    discover: bool = typer.Option(False, "--discover", help="look for the token's members on the LAN by mDNS "
                                                            "first (for when their addresses changed)"),
) -> None:
    """Join a party with a one-time token: make this machine's identity and register it."""
    from pdp.setup import join_party

    print("\n".join(_run(join_party(token, data_dir, listen, advertise, config, key_file, force, discover))))


JOB_HELP = ("a built-in job (wordcount, grep, indexer, sort; train, predict, stats have their own commands) "
            "or a job file JOB.py[:ClassName]")
DATA_TYPE_HELP = "text, csv (a header row, then records) or jsonl; default: from the file extension"


@app.command()
def run(
    job: str = typer.Argument(..., help=JOB_HELP),
    inputs: list[Path] = typer.Argument(..., help="input files"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="where to write the output (default: stdout)"),
    data_type: Optional[str] = typer.Option(None, help=DATA_TYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print counters and status as JSON on stderr"),
) -> None:
    """Run a job in this one process (the sequential reference and the quick way to debug):
    `pdp run JOB.py INPUT... [-o OUT] [-- JOB_ARGS]`. Writes the bytes `pdp submit` writes."""
    from pdp.fsutil import atomic_writer
    from pdp.jobs.local import run_job as run_local
    from pdp.jobs.loader import builtin, job_class, job_files, load_module, new_job, split_ref
    from pdp.jobs.runtime import user_code

    try:
        from pdp.client import check_inputs

        check_inputs(inputs)
        ref, cls_name = split_ref(job)
        if ref.endswith(".py"):
            if not Path(ref).is_file():
                raise PdpError(f"job file {ref} does not exist")
            cls = job_class(load_module(ref, Path(ref).name), cls_name, Path(ref).name)
        else:
            cls = builtin(job)
        def make() -> Any:
            with user_code("arguments"):
                return new_job(cls, list(JOB_ARGS))

        files = job_files(make(), Path(ref)) if ref.endswith(".py") else []
        if output is None:
            result = run_local(make, inputs, sys.stdout.buffer, data_type, files)
            sys.stdout.flush()
        else:
            with atomic_writer(output.resolve()) as f:
                result = run_local(make, inputs, f, data_type, files)
    except BrokenPipeError:  # `pdp run ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
    except PdpError as exc:
        _error(str(exc))
        raise typer.Exit(1) from None
    if as_json:
        err.print_json(json.dumps({"counters": result["counters"], "status": result["status"],
                                   "lines": result["lines"]}))
    else:
        for group, names in sorted(result["counters"].items()):
            for name, n in sorted(names.items()):
                err.print(f"counter {escape(group)} / {escape(name)}: {n}")


@app.command()
def submit(
    job: str = typer.Argument(..., help=JOB_HELP),
    inputs: list[Path] = typer.Argument(..., help="input files on this machine"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="where to write the result (default <job-id>.tsv)"),
    node: NodeOpt = None,
    comment: str = typer.Option("", help="free text kept with the job"),
    data_type: str = typer.Option("text/utf-8", help=DATA_TYPE_HELP),
    priority: int = typer.Option(0, min=-100, max=100,
                                 help="higher runs first (-100..100); equal priorities share the party fairly "
                                      "by submitter"),
    no_wait: bool = typer.Option(False, "--no-wait", "--detach",
                                 help="print the job id once the job is accepted and return without waiting "
                                      "(`pdp wait JOB` later)"),
    as_json: bool = typer.Option(False, "--json", help="print the outcome as one JSON object"),
    key_file: KeyOpt = None,
) -> None:
    """Submit a job with its input files; wait for it and write the result:
    `pdp submit JOB INPUT... [-o OUT] [-- JOB_ARGS]`."""
    from pdp.jobs.loader import split_ref

    job_id = new_job_id(Path(split_ref(job)[0]).stem.replace("_", "-")[:40] or "job")
    out = output or Path(f"{job_id}.tsv")
    if not no_wait:
        _check_output_dir(out)
    key = _key(key_file)
    form = {"comment": comment, "data_type": data_type, "output": str(out), "priority": priority,
            "args": list(JOB_ARGS)}
    result = _run(_submit(_node_addr(node), key, job, inputs, job_id, out, form, no_wait, as_json))
    if as_json:
        print(json.dumps(result))
    elif no_wait:
        print(job_id)
    else:
        print(_outcome_line(result))


def _check_output_dir(out: Path) -> None:
    if not out.parent.resolve().is_dir():
        _error(f"the output directory {out.parent} does not exist")
        raise typer.Exit(1)


async def _submit(addr: str, key: Credential, kind: str, inputs: list[Path], job_id: str, out: Path,
                  form: dict[str, Any], no_wait: bool, as_json: bool) -> dict[str, Any]:
    if no_wait:  # the upload still fails over to another member; the job id makes a retry safe
        async with Failover([addr], key) as party:
            ack = await submit_job(party, kind, inputs, job_id, **form)
            state = await job_state(party, job_id)
        return {"id": job_id, "accepted": True, "dup": bool(ack.get("dup", False)), "state": state}
    with _progress_view(job_id, quiet=as_json) as show:
        summary, head = await run_job([addr], key, kind, inputs, job_id, out, show, **form)
    return _outcome(job_id, out, summary, head)


def _outcome(job_id: str, out: Path, summary: dict[str, Any], head: dict[str, Any]) -> dict[str, Any]:
    """What `pdp submit --json` and `pdp wait --json` print for a finished job."""
    return {"id": job_id, "output": str(out), "size": head["size"], "keys": head.get("keys"),
            "sha256": head["sha256"], "done_on": summary["done_on"], "reruns": summary.get("reruns", {}),
            "seconds": round(summary["finished_at"] - summary["submitted_at"], 3)}


def _outcome_line(result: dict[str, Any]) -> str:
    return f"{result['id']}: {result['keys']} keys, {result['size']} bytes -> {result['output']}"


DataTypeOpt = Annotated[Optional[str], typer.Option(help=DATA_TYPE_HELP)]
ChunkOpt = Annotated[Optional[float], typer.Option(min=0.004, help="map chunk size in MiB (default: the node's)")]
OutcomeJsonOpt = Annotated[bool, typer.Option("--json", help="print the outcome as one JSON object (as `pdp submit --json`)")]
TRAIN_PARAMS = ("NAME=VALUE (repeatable). linear: alpha (ridge, default 0); logistic: C (1.0), tol (1e-4), "
                "max_iter (100); naive-bayes: kind (gaussian or multinomial), alpha (1.0), var_smoothing (1e-9); "
                "kmeans: k (required), seed (0), tol (1e-4), max_iter (300)")


@app.command()
def train(
    algorithm: str = typer.Argument(..., help="linear, logistic, naive-bayes or kmeans"),
    inputs: list[Path] = typer.Argument(..., help="CSV (with a header row) or JSON Lines files on this machine"),
    output: Path = typer.Option(..., "--output", "-o", help="the model file to write (JSON, format pdp-model/1)"),
    target: Optional[str] = typer.Option(None, help="the column to predict (not for kmeans)"),
    features: list[str] = typer.Option([], help="the feature columns, comma-separated or repeated "
                                                "(default: every column but the target)"),
    param: list[str] = typer.Option([], "--param", "-p", help=TRAIN_PARAMS),
    missing: str = typer.Option("drop", help="rows with a missing value: drop them, or mean: impute numeric "
                                             "features with the column mean (a missing target is dropped)"),
    data_type: DataTypeOpt = None,
    chunk_mb: ChunkOpt = None,
    node: NodeOpt = None,
    as_json: OutcomeJsonOpt = False,
    key_file: KeyOpt = None,
) -> None:
    """Fit a model over the party in rounds: `pdp train logistic data.csv --target y -o model.json`."""
    from pdp.train.models import ALGORITHMS

    if algorithm not in ALGORITHMS:
        _error(f"unknown algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        raise typer.Exit(2)
    if missing not in ("drop", "mean"):
        _error(f"--missing {missing!r}: choose drop or mean")
        raise typer.Exit(2)
    _check_output_dir(output)
    cols = [c.strip() for f in features for c in f.split(",") if c.strip()]
    args = ["--algorithm", algorithm, "--missing", missing, *(["--target", target] if target else []),
            *(["--features", ",".join(cols)] if cols else []), *(a for p in param for a in ("--param", p))]
    _run_builtin("train", inputs, output, args, data_type, chunk_mb, node, as_json, key_file, f"train {algorithm}")


@app.command()
def predict(
    model: Path = typer.Argument(..., help="a model file from `pdp train`"),
    inputs: list[Path] = typer.Argument(..., help="CSV or JSON Lines files with the model's feature columns"),
    output: Path = typer.Option(..., "--output", "-o", help="where to write one JSON line per input record"),
    data_type: DataTypeOpt = None,
    chunk_mb: ChunkOpt = None,
    node: NodeOpt = None,
    as_json: OutcomeJsonOpt = False,
    key_file: KeyOpt = None,
) -> None:
    """Apply a model to new data, a map-only job: `{"prediction": ...}` per record, in input order."""
    from pdp.jobs.builtin.train import check_model

    try:
        model_file = check_model(json.loads(model.read_text(encoding="utf-8")))
    except (OSError, ValueError, PdpError) as exc:
        _error(f"{model}: {exc}")
        raise typer.Exit(1) from None
    _check_output_dir(output)
    _run_builtin("predict", inputs, output, [], data_type, chunk_mb, node, as_json, key_file,
                 f"predict {model.name}", model=model_file)


@app.command()
def stats(
    inputs: list[Path] = typer.Argument(..., help="CSV (with a header row) or JSON Lines files on this machine"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="also keep the JSON here"),
    data_type: DataTypeOpt = None,
    chunk_mb: ChunkOpt = None,
    node: NodeOpt = None,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object keyed by column name: count, missing, "
                                                        "mean, std, min, max, quantiles, ..."),
    key_file: KeyOpt = None,
) -> None:
    """Column statistics over the party: count, missing, mean, std, min, max, quantiles, distinct, top values."""
    import tempfile

    from pdp.train.stats import render

    with tempfile.TemporaryDirectory(prefix="pdp-stats-") as tmp:
        out = output or Path(tmp) / "stats.json"
        _check_output_dir(out)
        _run_builtin("stats", inputs, out, [], data_type, chunk_mb, node, None, key_file, "stats")
        result = json.loads(out.read_text(encoding="utf-8"))
    if as_json:
        print(json.dumps(result))
    else:  # a pipe or a file gets the whole table, not one squeezed into 80 columns
        Console(width=None if sys.stdout.isatty() else 220).print(render(result))


def _run_builtin(kind: str, inputs: list[Path], out: Path, args: list[str], data_type: Optional[str],
                 chunk_mb: Optional[float], node: Optional[str], as_json: Optional[bool], key_file: Optional[Path],
                 comment: str, model: Any = None) -> None:
    """Submit a built-in job, wait and write its result to ``out``; ``as_json`` None: quietly."""
    job_id = new_job_id(kind)
    form: dict[str, Any] = {"comment": comment, "data_type": data_type or "text/utf-8", "output": str(out),
                            "priority": 0, "args": args, "model": model}
    if chunk_mb:
        form["chunk_size"] = int(chunk_mb * 1024 * 1024)
    result = _run(_submit(_node_addr(node), _key(key_file), kind, inputs, job_id, out, form, False, as_json is not False))
    if as_json:
        print(json.dumps(result))
    elif as_json is False:
        print(f"{result['id']}: {result['size']} bytes -> {result['output']}")


@app.command("wait")
def wait_job(
    job_id: str = typer.Argument(..., help="the job id that `pdp submit --no-wait` printed"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="where to write the result (default <job-id>.tsv)"),
    timeout: Optional[float] = typer.Option(None, min=0, help="give up after this many seconds (exit 3; the "
                                                                  "job goes on); 0 looks once"),
    node: NodeOpt = None,
    as_json: bool = typer.Option(False, "--json", help="print the outcome as one JSON object (no progress)"),
    key_file: KeyOpt = None,
) -> None:
    """Wait for a job submitted earlier (e.g. with `pdp submit --no-wait`) and write its result.
    Exits 0 when it is done, 1 if it failed or was cancelled, 3 on --timeout."""
    out = output or Path(f"{job_id}.tsv")
    _check_output_dir(out)
    key = _key(key_file)
    addrs = [_node_addr(node), *sorted(key.addrs.values())]  # any member will do if ours goes away
    result = _run(_wait(addrs, key, job_id, out, timeout, as_json))
    print(json.dumps(result) if as_json else _outcome_line(result))


async def _wait(addrs: list[str], key: Credential, job_id: str, out: Path, timeout: Optional[float],
                as_json: bool) -> dict[str, Any]:
    async with Failover(addrs, key) as party:
        with _progress_view(job_id, quiet=as_json) as show:
            summary, head = await follow_job(party, job_id, out, show, timeout)
    return _outcome(job_id, out, summary, head)


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
    for part in _status_view(st):
        con.print(part)


def _status_view(st: dict[str, Any]) -> list[Text | Table]:
    """``pdp status`` as renderables. Names, reasons and errors come from other members and
    users: they go in as Text, never read as markup (``[/x]`` would raise) or emoji codes."""
    raft = st["raft"]
    parts: list[Text | Table] = [
        Text.assemble("node ", (str(st["node"]), "bold"), "; leader ", (str(st["leader"] or "none"), "bold"),
                      f", term {st['term']}; jobs: {st['jobs']}"),
        Text(f"raft: commit {raft['commit_idx']}, applied {raft['last_applied']}, truncations of applied entries "
             f"{raft['truncations']}, diverged {raft['diverged']}"),
    ]
    if st["reruns"]:
        parts.append(Text("tasks re-run: " + ", ".join(f"{n}× {why}" for why, n in sorted(st["reruns"].items()))))
    table = Table("member", "health", "data address", "cpus", "score", "done/failed/lost", "last heartbeat",
                  "current tasks (progress)")
    colors = {"alive": "green", "suspected": "yellow", "dead": "red"}
    for m in st["members"]:
        age = "never" if m["heartbeat_age"] is None else f"{m['heartbeat_age']:.1f} s ago"
        tasks = Text(", ".join(f"{t['job']} {t['phase']} {t['index']} ({_size(t.get('progress', 0))})"
                               + (f": {t['status']}" if t.get("status") else "") for t in m["tasks"]))
        if m.get("paused"):
            tasks = Text.assemble((f"paused: {m['paused']}", "yellow"), f"; finishing {tasks}" if tasks else "")
        health, rec = str(m["health"]), m.get("record") or {}
        score = f"{m['score']:.2f}" + (f" ({_size(m['rate'])}/s)" if m.get("rate") else "")
        if m.get("benched_until", 0) > time.time():
            score += " benched"
        table.add_row(Text(str(m["name"]) + (" (leader)" if m["name"] == st["leader"] else "")),
                      Text(health, style=colors.get(health, "white")), Text(str(m["data_addr"])),
                      Text(str(m["cpus"])), Text(score),
                      Text(f"{rec.get('done', 0)}/{rec.get('failed', 0)}/{rec.get('lost', 0)}"), Text(age),
                      tasks or Text("-"))
    parts.append(table)
    return parts


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
    Console().print(_jobs_table(listing))


def _jobs_table(listing: list[dict[str, Any]]) -> Table:
    """``pdp jobs`` as a table; every cell is Text (comments, submitters and errors are other
    users' words: never markup)."""
    table = Table("job", "kind", "state", "maps", "reduces", "size", "submitter", "priority", "comment")
    for j in listing:
        cells = [j["id"], j["kind"], j["state"] + (f": {j['error']}" if j["error"] else ""),
                 f"{j['maps_done']}/{j['maps']}", f"{j['reduces_done']}/{j['reduces']}", j["form"]["size"],
                 j["form"]["submitter"], j.get("priority", 0), j["form"]["comment"]]
        table.add_row(*(Text(str(c)) for c in cells))
    return table


def _show_job(job: dict[str, Any], as_json: bool) -> None:
    job.pop("t", None), job.pop("s", None)  # frame fields, not the job's
    if as_json:
        print(json.dumps(job, indent=2))
        return
    con = Console()
    for part in _job_view(job):
        con.print(part)


def _job_view(job: dict[str, Any]) -> list[Text | Table]:
    """``pdp jobs ID`` as renderables, other users' text as Text (never markup)."""
    reruns = ", ".join(f"{n}× {why}" for why, n in sorted(job["reruns"].items())) or "none"
    head = Text(f"{job['id']}: {job['kind']}, {job['state']}{': ' + job['error'] if job['error'] else ''}; "
                f"priority {job['priority']}, {job['backups']} backup attempt(s), re-runs {reruns}")
    parts: list[Text | Table] = [head]
    if job.get("steps", 1) > 1:
        parts.append(Text(f"step {job.get('step', 1)} of {job['steps']}"))
    if job.get("counters"):
        counters = Table("counter group", "counter", "value")
        for group, names in sorted(job["counters"].items()):
            for name, n in sorted(names.items()):
                counters.add_row(Text(group), Text(name), str(n))
        parts.append(counters)
    table = Table("task", "state", "on", "attempts", "bytes", "seconds")
    for t in job["tasks"]:
        where = t["node"] or ", ".join(n for _, n in t["runs"]) or "-"
        name = f"{t['phase']} {t['index']}" + (f" (step {t['step']})" if job.get("steps", 1) > 1 else "")
        cells = [name, t["state"], where, t["attempt"],
                 _size(t["stats"].get("input_bytes", t["bytes"])), t["stats"].get("seconds", "")]
        table.add_row(*(Text(str(c)) for c in cells))
    return [*parts, table]


@app.command()
def cancel(
    job_id: str = typer.Argument(..., help="the job id that submit printed"),
    node: NodeOpt = None,
    as_json: bool = typer.Option(False, "--json", help='print {"id", "cancelled": true}'),
    key_file: KeyOpt = None,
) -> None:
    """Stop a job: its tasks stop, its spool space is freed on every member."""
    _run(_call(_node_addr(node), _key(key_file), "cancel", id=job_id))
    print(json.dumps({"id": job_id, "cancelled": True}) if as_json else f"{job_id} cancelled")


@app.command()
def reload(
    node: Optional[str] = typer.Option(None, help="HOST:PORT of the member to reload (default: $PDP_NODE)"),
    as_json: bool = typer.Option(False, "--json", help='print {"applied": [...], "restart": [...]}'),
    key_file: KeyOpt = None,
) -> None:
    """Make the member at --node read its config file again (as `kill -HUP` does)."""
    res = _run(_call(_node_addr(node), _key(key_file), "reload"))
    if as_json:
        print(json.dumps({"applied": list(res["applied"]), "restart": list(res["restart"])}))
        return
    print("applied: " + (", ".join(res["applied"]) or "no changes"))
    if res["restart"]:
        print("these take effect after a restart: " + ", ".join(res["restart"]))


@app.command()
def logs(
    job_id: str = typer.Argument(..., help="the job id"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new events until the job ends"),
    node: NodeOpt = None,
    as_json: bool = typer.Option(False, "--json", help='one JSON object a line: {"seq", "time", "kind", "job", "text"}'),
    key_file: KeyOpt = None,
) -> None:
    """A job's events from the party's log: submitted, re-runs and why (task errors), backups,
    steps, members lost, done or failed. With -f, follows until the job ends."""
    cred = _key(key_file)
    addrs = [_node_addr(node), *sorted(cred.addrs.values())]  # any member will do if ours goes away

    async def go() -> None:
        after = 0
        async with Failover(addrs, cred) as party:
            while True:
                state, events = await party.run(lambda c: c.events(job_id, after), f"read the events of {job_id}")
                for e in events:
                    stamp = time.strftime("%H:%M:%S", time.localtime(e["time"]))
                    print(json.dumps(e) if as_json else f"{stamp} {e['kind']:<10} {e['text']}", flush=True)
                    after = max(after, int(e["seq"]))
                if not follow or state not in ("queued", "mapping", "reducing"):
                    return
                await asyncio.sleep(0.5)

    _run(go())


@app.command()
def result(
    job_id: str = typer.Argument(..., help="the job id that submit printed"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="where to write it (default <job-id>.tsv)"),
    node: NodeOpt = None,
    as_json: bool = typer.Option(False, "--json", help='print {"id", "output", "size", "keys", "sha256"}'),
    key_file: KeyOpt = None,
) -> None:
    """Fetch a finished job's output."""
    out = output or Path(f"{job_id}.tsv")

    async def fetch() -> dict[str, Any]:
        async with Client(_node_addr(node), _key(key_file)) as client:
            return await client.fetch_result(job_id, out)

    head = _run(fetch())
    if as_json:
        print(json.dumps({"id": job_id, "output": str(out), "size": head["size"], "keys": head.get("keys"),
                          "sha256": head["sha256"]}))
        return
    print(f"{job_id}: {head['size']} bytes -> {out}")


@app.command()
def invite(
    name: str = typer.Argument(..., help="the new member's (or user's) name"),
    user: bool = typer.Option(False, "--user", help="a user that submits jobs but gives no cores"),
    ttl: str = typer.Option("24h", help="how long the token works (e.g. 30m, 24h, 7d)"),
    withdraw: bool = typer.Option(False, "--withdraw", help="cancel NAME's pending invitation instead"),
    replace: bool = typer.Option(False, help="replace NAME's pending invitation"),
    node: NodeOpt = None,
    as_json: bool = typer.Option(False, "--json", help='print {"name", "kind", "token", "expires"} (with '
                                                       '--withdraw: {"name", "withdrawn": true}); no hints'),
    key_file: KeyOpt = None,
) -> None:
    """(admin) Print a one-time join token for NAME; `pdp join TOKEN` on the new machine uses it."""
    if withdraw:
        _run(_call(_node_addr(node), _key(key_file), "withdraw", name=name))
        print(json.dumps({"name": name, "withdrawn": True}) if as_json else f"the invitation of {name} is withdrawn")
        return
    res = _run(_call(_node_addr(node), _key(key_file), "invite", name=name, user=user, ttl=_seconds(ttl),
                     replace=replace))
    if as_json:
        print(json.dumps({"name": name, "kind": res["kind"], "token": res["token"], "expires": res["expires"]}))
        return
    expires = time.strftime("%Y-%m-%d %H:%M", time.localtime(res["expires"]))
    print(res["token"])
    err.print(f"one-time token for {res['kind']} {name}, valid until {expires}. On the new machine run:\n"
              f"  pdp join TOKEN" + ("" if user else " --advertise THAT_HOST:7700") +
              ("" if user else "\nthen start it with `pdp node`"), highlight=False, markup=False)


def _seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        _error(f"--ttl {text!r}: use a number with s, m, h or d (e.g. 24h)")
        raise typer.Exit(1) from None


@app.command()
def invites(
    node: NodeOpt = None,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    key_file: KeyOpt = None,
) -> None:
    """(admin) Pending invitations and every identity of the party."""

    async def fetch(c: Client) -> Any:
        frame = await c._conn().request({"t": "invites"}, timeout=15.0)
        import msgpack
        return msgpack.unpackb(frame.payload)

    listing = _run(_with_client(_node_addr(node), _key(key_file), fetch))
    if as_json:
        print(json.dumps(listing, indent=2))
        return
    table = Table("pending invitation", "kind", "expires", "by")
    for p in listing["pending"]:
        table.add_row(Text(p["name"]), p["kind"], time.strftime("%Y-%m-%d %H:%M", time.localtime(p["expires"])),
                      Text(p["by"]))
    ids = Table("name", "kind", "id")
    for r in listing["identities"]:
        ids.add_row(Text(r["name"]), r["kind"] + (" (admin)" if r["admin"] else ""), display_id(r["fp"]))
    Console().print(table, ids)


@app.command("export-cert")
def export_cert(
    pem: Optional[Path] = typer.Option(None, help="write your key and certificate as one PEM file (curl --cert, "
                                                  "Prometheus tls_config cert_file and key_file)"),
    p12: Optional[Path] = typer.Option(None, help="write them as PKCS#12 for a browser's certificate store (asks "
                                                  "for a password, or takes $PDP_P12_PASSWORD)"),
    key_file: KeyOpt = None,
) -> None:
    """Your user certificate for a dashboard beyond loopback (HTTPS: it answers party identities only)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509 import load_pem_x509_certificate

    from pdp.identity import write_private

    if pem is None and p12 is None:
        _error("give --pem FILE and/or --p12 FILE")
        raise typer.Exit(2)
    cred = _key(key_file)
    ident = cred.identity
    if pem is not None:
        write_private(pem, ident.key_pem + ident.cert_pem)
        print(f"wrote {pem} (private: keep it to yourself): curl --cert {pem} -k https://HOST:7780/api/status")
    if p12 is not None:
        password = os.environ.get("PDP_P12_PASSWORD") or typer.prompt("password for the PKCS#12 file",
                                                                      hide_input=True, confirmation_prompt=True)
        key = serialization.load_pem_private_key(ident.key_pem.encode(), None)
        cert = load_pem_x509_certificate(ident.cert_pem.encode())
        data = pkcs12.serialize_key_and_certificates(
            f"pdp {ident.name}".encode(), key, cert, None,  # type: ignore[arg-type]
            serialization.BestAvailableEncryption(password.encode()))
        write_private(p12, "")
        p12.write_bytes(data)
        print(f"wrote {p12}: import it into your browser's certificates (Settings > Privacy > Certificates)")


@app.command()
def discover(
    timeout: float = typer.Option(3.0, min=0.1, max=60, help="seconds to listen"),
    as_json: bool = typer.Option(False, "--json", help='print [{"name", "id", "fp", "addrs": ["HOST:PORT"]}]'),
) -> None:
    """The pdp nodes announcing themselves on this LAN (`pdp node --discover`): names,
    ids and addresses as they claim them; compare an id with what `pdp id` prints there."""
    from pdp.net.discovery import browse

    found = _run(browse(timeout))
    rows = [{"name": f.name, "id": display_id(f.fp), "fp": f.fp, "addrs": list(f.addrs)} for f in found]
    if as_json:
        print(json.dumps(rows))
        return
    if not rows:
        _error(f"no pdp node announced itself on this LAN within {timeout:g} s "
               "(members announce themselves with `pdp node --discover`)")
        raise typer.Exit(1)
    table = Table("name", "id", "addresses")
    for f in found:
        table.add_row(Text(f.name), display_id(f.fp), ", ".join(f.addrs))
    Console().print(table)


@app.command()
def uninvite(
    name: str = typer.Argument(..., help="the member's or user's name"),
    node: NodeOpt = None,
    key_file: KeyOpt = None,
) -> None:
    """(admin) Revoke NAME: its ids stop working at once, its connections close, its tasks run elsewhere."""
    _run(_call(_node_addr(node), _key(key_file), "uninvite", name=name))
    print(f"{name} is revoked; its connections are closed")


@app.command()
def rekey(
    data_dir: Optional[Path] = typer.Option(None, help="rekey the node with this data dir (restart it afterwards) "
                                                       "instead of your user credential"),
    node: NodeOpt = None,
    key_file: KeyOpt = None,
) -> None:
    """Give your user (or a node of this machine) a new key; the old one stops working."""
    from pdp.setup import rekey_identity

    print(_run(rekey_identity(_node_addr(node), _key(key_file), data_dir)))


CORE_JSON_HELP = 'print {"name", "action", "voters": [...]}'
core_app = typer.Typer(no_args_is_help=True, help="Change the Raft core (the voters), one member at a time.")
app.add_typer(core_app, name="core")


@core_app.command("add")
def core_add(
    name: str = typer.Argument(..., help="a member that works without a Raft seat"),
    node: NodeOpt = None,
    as_json: bool = typer.Option(False, "--json", help=CORE_JSON_HELP),
    key_file: KeyOpt = None,
) -> None:
    """Give a member a Raft seat (keep the core at 3 or 5 voters)."""
    _core_change("add", name, node, key_file, as_json)


@core_app.command("remove")
def core_remove(
    name: str = typer.Argument(..., help="a core member"),
    node: NodeOpt = None,
    as_json: bool = typer.Option(False, "--json", help=CORE_JSON_HELP),
    key_file: KeyOpt = None,
) -> None:
    """Take a member's Raft seat away (leadership moves first if it leads); it stays a worker."""
    _core_change("remove", name, node, key_file, as_json)


def _core_change(action: str, name: str, node: Optional[str], key_file: Optional[Path], as_json: bool) -> None:
    res = _run(_call(_node_addr(node), _key(key_file), "core", action=action, name=name))
    voters = [str(v) for v in res["voters"]]
    if as_json:
        print(json.dumps({"name": name, "action": action, "voters": voters}))
    elif action == "add":
        print(f"{name} is a core member; voters: {', '.join(voters)}")
    else:
        print(f"{name} left the core; voters: {', '.join(voters)}")


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
    chaos: bool = typer.Option(False, "--chaos", help="five nodes; kill a member, then the leader, mid-job; "
                                                      "show what the party did and that the result is exact"),
) -> None:
    """Start a local party, word-count the bundled sample, check it against the oracle."""
    from pdp.demo import run_chaos_demo, run_demo

    _run(run_chaos_demo(keep) if chaos else run_demo(nodes, keep))


async def _with_client(addr: str, key: Credential, op: Callable[[Client], Awaitable[T]]) -> T:
    async with Client(addr, key) as client:
        return await op(client)


async def _call(addr: str, key: Credential, kind: str, **fields: Any) -> dict[str, Any]:
    return await _with_client(addr, key, lambda c: c.call(kind, timeout=60.0, **fields))




JOB_ARGS: list[str] = []  # what follows `--` on a `pdp run` / `pdp submit` line: the job's own arguments


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in ("run", "submit") and "--" in argv:
        split = argv.index("--")
        JOB_ARGS[:] = argv[split + 1:]
        sys.argv[1:] = argv[:split]
    app()


if __name__ == "__main__":
    main()

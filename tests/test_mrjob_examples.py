"""mrjob's own examples, unmodified, through `pdp run` and through a party's `pdp submit`,
against mrjob's inline runner (the reference: what `python EX.py -r inline INPUT...` prints).

pdp writes its output sorted by the encoded key and mrjob in whatever order its reducers
finish, so outputs are compared as sorted lines; `pdp submit` and `pdp run` must write the
same bytes. The inputs are the first ~40 KB of three corpus books (CRLF kept), one of them
cut without a final newline. The party has `allow_code = true` on two members and `false` on
the third, which must never run a task of a job file.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pdp.client import Client, run_job
from pdp.jobs.builtin.wordcount import oracle
from pdp.local import LocalParty
from conftest import ready_party

mrjob = pytest.importorskip("mrjob")

EXAMPLES = Path(mrjob.__file__).resolve().parent / "examples"
JOBS = Path(__file__).resolve().parent / "jobs"
BOOKS = ("pg-grimm.txt", "pg-frankenstein.txt", "pg-tom_sawyer.txt")
CAP = 40 * 1024  # bytes taken from each book
SMALL_CHUNK = 16 * 1024  # map chunk of the jobs submitted through the Python API: many maps per input
NO_CODE = 2  # the party member with allow_code = false
TIMEOUT = 120

# (example, job arguments); every one must match mrjob's inline runner
SUPPORTED = [
    ("mr_word_freq_count", []),  # combiner
    ("mr_wc", []),  # mapper_final
    ("mr_count_lines_right", []),  # mapper_init / mapper_final
    ("mr_count_lines_wrong", []),  # the same without a reducer: one count per map task
    ("mr_most_used_word", []),  # two steps, FILES (stop_words.txt), mapper_init, combiner
    ("mr_next_word_stats", []),  # two steps, SORT_VALUES, combiner, tuple keys
    ("mr_log_sampler", ["--sample-size", "1000000"]),  # passthru args, SORT_VALUES, RawValueProtocol
    ("mr_count_lines_by_file", []),  # jobconf_from_env('mapreduce.map.input.file')
]

# (example, job arguments, what the error must name)
UNSUPPORTED = [
    ("mr_grep", ["-e", "the"], "mapper_cmd"),
    ("mr_words_containing_u_freq_count", [], "mapper_pre_filter"),
    ("mr_phone_to_url", [], "mapper_raw"),
    ("mr_text_classifier", [], "mapper_raw"),
    ("mr_spark_wordcount", [], "SparkStep"),
    ("mr_jar_step_example", [], "JarStep"),
]


# -- inputs and runs ---------------------------------------------------------------------------


def _cap(src: Path, dest: Path, newline_at_end: bool) -> Path:
    """The first ~CAP bytes of a book, cut at a line end: after its CRLF, or (without a final
    newline) before it."""
    data = src.read_bytes()[:CAP]
    end = data.rindex(b"\r\n")
    dest.write_bytes(data[:end + 2] if newline_at_end else data[:end])
    return dest


@pytest.fixture(scope="module")
def books(corpus: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    picked = [p for p in corpus if p.name in BOOKS] or corpus[:3]
    if len(picked) < 3:
        pytest.skip("the corpus needs three books")
    root = tmp_path_factory.mktemp("books")
    return [_cap(p, root / p.name, newline_at_end=k != 1) for k, p in enumerate(sorted(picked))]


def _inputs(name: str, books: list[Path]) -> list[Path]:
    return books[:2] if name == "mr_next_word_stats" else books  # the slowest example: two books


class Runs:
    """`pdp run` and mrjob's inline runner on the same job and inputs, each run once per module
    (the party's tests compare against the same runs). Both run at once: two cores."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[tuple[Any, ...], tuple[bytes, dict[str, Any], bytes, str]] = {}

    def get(self, job: Path, inputs: list[Path], args: list[str], inline_job: Path | None = None
            ) -> tuple[bytes, dict[str, Any], bytes, str]:
        """(pdp run's output bytes, its --json report, mrjob inline's stdout, its stderr)."""
        key = (job, tuple(inputs), tuple(args), inline_job)
        if key not in self.cache:
            self.cache[key] = self._run(job, inputs, args, inline_job or job)
        return self.cache[key]

    def _run(self, job: Path, inputs: list[Path], args: list[str], inline_job: Path
             ) -> tuple[bytes, dict[str, Any], bytes, str]:
        work = self.root / f"run{len(self.cache)}"
        (work / "tmp").mkdir(parents=True)
        env = {**os.environ, "TMPDIR": str(work / "tmp")}
        paths = [str(p) for p in inputs]
        files = {n: open(work / n, "wb") for n in ("mr.out", "mr.err", "pdp.err")}
        procs: list[subprocess.Popen[bytes]] = []
        try:  # --num-cores 1: mrjob aims at 2 splits, so each input (< half of all) is one map, as in pdp run
            mr = subprocess.Popen([sys.executable, str(inline_job), "-r", "inline", "--no-conf", "--num-cores", "1",
                                   *paths, *args], stdout=files["mr.out"], stderr=files["mr.err"], cwd=work, env=env)
            procs.append(mr)
            pdp = subprocess.Popen([sys.executable, "-m", "pdp", "run", str(job), *paths, "-o", str(work / "pdp.out"),
                                    "--json", *(["--", *args] if args else [])],
                                   stdout=subprocess.DEVNULL, stderr=files["pdp.err"], cwd=work, env=env)
            procs.append(pdp)
            mr_rc, pdp_rc = mr.wait(TIMEOUT), pdp.wait(TIMEOUT)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for f in files.values():
                f.close()
        mr_err, pdp_err = (work / "mr.err").read_text(), (work / "pdp.err").read_text()
        assert mr_rc == 0, f"mrjob inline failed:\n{mr_err[-3000:]}"
        assert pdp_rc == 0, f"pdp run failed:\n{pdp_err[-3000:]}"
        return (work / "pdp.out").read_bytes(), json.loads(pdp_err), (work / "mr.out").read_bytes(), mr_err


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"))


def _lines(data: bytes) -> list[bytes]:
    return sorted(data.splitlines())


def _cli(*args: str, key_file: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if key_file is not None:
        env["PDP_KEY_FILE"] = str(key_file)
    return subprocess.run([sys.executable, "-m", "pdp", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=TIMEOUT)


def _mrjob_counters(stderr: str) -> dict[str, dict[str, int]]:
    """The counters mrjob's runner logs after each step (``Counters: N`` blocks), summed."""
    total: dict[str, dict[str, int]] = {}
    group = None
    for line in stderr.splitlines():
        if line.startswith("\t\t") and group is not None:
            name, _, n = line.strip().rpartition("=")
            total.setdefault(group, {})
            total[group][name] = total[group].get(name, 0) + int(n)
        elif line.startswith("\t"):
            group = line.strip()
        else:
            group = None
    return total


def _boom_line() -> tuple[int, str]:
    lines = (EXAMPLES / "mr_boom.py").read_text().splitlines()
    [n] = [k for k, text in enumerate(lines, 1) if "raise Exception('BOOM')" in text]
    return n, lines[n - 1].strip()


# -- 1. every supported example: `pdp run` == mrjob inline ----------------------------------------


@pytest.mark.parametrize("name,args", SUPPORTED, ids=[s[0] for s in SUPPORTED])
def test_pdp_run_matches_mrjob_inline(runs: Runs, books: list[Path], name: str, args: list[str]) -> None:
    inputs = _inputs(name, books)
    mine, report, theirs, _ = runs.get(EXAMPLES / f"{name}.py", inputs, args)
    assert mine and mine.endswith(b"\n")
    assert _lines(mine) == _lines(theirs)
    assert report["lines"] == len(mine.splitlines())
    if name == "mr_word_freq_count":  # sorted by key (str keys: by code point)
        keys = [json.loads(line.split(b"\t")[0]) for line in mine.splitlines()]
        assert keys == sorted(keys)
    if name == "mr_count_lines_wrong":  # no reducer: one count per map task, and pdp maps each file in one
        assert len(mine.splitlines()) == len(inputs)
    if name == "mr_count_lines_by_file":  # the names mrjob gives: file:// and the path
        assert {json.loads(line.split(b"\t")[0]) for line in mine.splitlines()} == {f"file://{p}" for p in inputs}
    if name == "mr_log_sampler":  # every line, CRLF stripped (the sample is bigger than the input)
        assert _lines(mine) == sorted(_text_lines(inputs))


def _text_lines(paths: list[Path]) -> list[bytes]:
    """The lines of the inputs as a mapper gets them (no line end; a last line without one too)."""
    out = []
    for p in paths:
        data = p.read_bytes()
        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()
        out.extend(line.removesuffix(b"\r") for line in lines)
    return out


def _word_stats_oracle(paths: list[Path], min_length: int) -> tuple[list[bytes], dict[str, dict[str, int]]]:
    """tests/jobs/word_stats.py computed directly: its output lines (sorted) and its counters."""
    counters: dict[str, Counter[str]] = {"lines": Counter(), "words": Counter(), "initials": Counter()}
    words: Counter[str] = Counter()
    for p in paths:
        text = p.read_bytes().decode("utf-8")
        for line in text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"):
            line = line.removesuffix("\r")
            counters["lines"]["all"] += 1
            counters["lines"]["blank"] += not line.strip()
            for word in re.findall(r"[\w']+", line):
                word = word.lower()
                if len(word) >= min_length:
                    counters["words"]["kept"] += 1
                    words[word] += 1
                else:
                    counters["words"]["short"] += 1
    counters["words"]["distinct"] = len(words)
    groups: dict[str, list[tuple[int, str]]] = {}
    for word, n in words.items():
        groups.setdefault(word[0], []).append((n, word))
    counters["initials"]["groups"] = len(groups)
    counters["initials"]["words"] = len(words)
    lines = [json.dumps(k).encode() + b"\t" + json.dumps([len(v), sum(n for n, _ in v), max(v)[1]]).encode()
             for k, v in groups.items()]
    return sorted(lines), {g: {k: n for k, n in c.items() if n} for g, c in counters.items() if any(c.values())}


@pytest.fixture(scope="module")
def word_stats_twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/jobs/word_stats.py on mrjob's classes instead of pdp's (for mrjob's inline runner)."""
    source = (JOBS / "word_stats.py").read_text()
    twin = source.replace("from pdp.job import MRJob, MRStep", "from mrjob.job import MRJob\nfrom mrjob.step import MRStep")
    assert twin != source
    path = tmp_path_factory.mktemp("twin") / "word_stats_mrjob.py"
    path.write_text(twin)
    return path


WORD_STATS_ARGS = ["--min-length", "3"]


def test_own_job_on_pdp_api_matches_mrjob_and_the_data(runs: Runs, books: list[Path], word_stats_twin: Path) -> None:
    """A job of pdp's API (`from pdp.job import MRJob, MRStep`): `pdp run` == the same class on
    mrjob's inline runner == computed from the data, output and counters; the status is the
    last one set."""
    mine, report, theirs, mr_err = runs.get(JOBS / "word_stats.py", books, WORD_STATS_ARGS, word_stats_twin)
    lines, counters = _word_stats_oracle(books, 3)
    assert _lines(mine) == _lines(theirs) == lines
    assert report["counters"] == _mrjob_counters(mr_err) == counters
    assert counters["words"]["short"] > 0 and counters["lines"]["blank"] > 0
    last = max(json.loads(line.split(b"\t")[0]) for line in lines)  # the last key reduced
    assert report["status"] == f"reduced {last}"


def test_log_sampler_samples_and_checks_its_args(books: list[Path], tmp_path: Path) -> None:
    job = str(EXAMPLES / "mr_log_sampler.py")
    out = tmp_path / "sample.txt"
    n = len(_text_lines(books))  # each line goes to the reducer with probability 1.2 * 25 / (n / 4)
    res = _cli("run", job, *map(str, books), "-o", str(out), "--", "--sample-size", "25", "--expected-length",
               str(n // 4))
    assert res.returncode == 0, res.stderr
    sample = out.read_bytes().splitlines()
    assert len(sample) == 25
    assert set(sample) <= set(_text_lines(books))
    res = _cli("run", job, str(books[0]), "-o", str(tmp_path / "never.txt"))
    assert res.returncode == 1 and "--sample-size" in res.stderr and not (tmp_path / "never.txt").exists()


# -- 5. unsupported examples fail at `pdp run`, naming the feature --------------------------------


@pytest.mark.parametrize("name,args,feature", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_example_fails_naming_the_feature(books: list[Path], tmp_path: Path, name: str,
                                                       args: list[str], feature: str) -> None:
    out = tmp_path / "never.tsv"
    res = _cli("run", str(EXAMPLES / f"{name}.py"), str(books[0]), "-o", str(out), *(["--", *args] if args else []))
    assert res.returncode == 1
    assert res.stderr.startswith("error:") and feature in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_boom_fails_with_the_users_traceback_in_pdp_run(books: list[Path], tmp_path: Path) -> None:
    n, text = _boom_line()
    res = _cli("run", str(EXAMPLES / "mr_boom.py"), str(books[0]), "-o", str(tmp_path / "never.tsv"))
    assert res.returncode == 1
    assert f'File "mr_boom.py", line {n}, in mapper_init' in res.stderr and text in res.stderr
    assert "Exception: BOOM" in res.stderr
    assert "pdp/" not in res.stderr  # the user's frames only


# -- 2-4. a party: two members run code, the third does not ---------------------------------------

_PARTIES: list[LocalParty] = []  # the module's party, stopped early by the test that needs its own


@pytest.fixture(scope="module")
def party(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with ready_party(tmp_path_factory.mktemp("code-party"), n=3, cpus=1,
                     settings={"allow_code": True, "heartbeat": 0.5, "dead_after": 2.0},
                     node_settings={NO_CODE: {"allow_code": False}}) as p:
        _PARTIES.append(p)
        yield p


def _job_detail(party: LocalParty, job_id: str) -> dict[str, Any]:
    """`pdp jobs ID --json` (through the no-code member: any member answers)."""
    res = _cli("jobs", job_id, "--json", "--node", party.addr(NO_CODE), key_file=party.key_file)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _task_nodes(detail: dict[str, Any]) -> set[str]:
    """Every member a task of the job ran on, or tried to."""
    return {name for t in detail["tasks"] for name in [t["node"], *(n for _, n in t["runs"]), *t["failed_on"]]
            if name}


# (example, job arguments, how: "cli" through `pdp submit`, "api" through run_job with SMALL_CHUNK)
ON_PARTY = [
    ("mr_word_freq_count", [], "api"),
    ("mr_word_freq_count", [], "cli"),
    ("mr_most_used_word", [], "cli"),
    ("mr_next_word_stats", [], "cli"),
    ("mr_wc", [], "api"),
    ("mr_count_lines_by_file", [], "api"),
    ("mr_log_sampler", ["--sample-size", "1000000"], "cli"),
]


@pytest.mark.parametrize("name,args,how", ON_PARTY, ids=[f"{n}-{h}" for n, _, h in ON_PARTY])
def test_submit_matches_pdp_run_and_mrjob(party: LocalParty, runs: Runs, books: list[Path], tmp_path: Path,
                                          name: str, args: list[str], how: str) -> None:
    """The party writes `pdp run`'s bytes, which are mrjob's lines; no task on the no-code member."""
    job, inputs = EXAMPLES / f"{name}.py", _inputs(name, books)
    mine, _, theirs, _ = runs.get(job, inputs, args)
    out = tmp_path / "out.tsv"
    if how == "cli":
        k = len(name) % party.n  # through different members (the no-code one too: it stores, not runs)
        res = _cli("submit", str(job), *map(str, inputs), "-o", str(out), "--node", party.addr(k), "--json",
                   *(["--", *args] if args else []), key_file=party.key_file)
        assert res.returncode == 0, res.stderr
        job_id = json.loads(res.stdout)["id"]
    else:
        job_id = f"{name.replace('_', '-')}-small-chunks"
        asyncio.run(run_job([party.addr(0)], party.key, str(job), inputs, job_id, out, args=args,
                            chunk_size=SMALL_CHUNK))
    assert out.read_bytes() == mine
    assert _lines(out.read_bytes()) == _lines(theirs)
    detail = _job_detail(party, job_id)
    assert detail["state"] == "done" and all(t["state"] == "done" for t in detail["tasks"])
    maps = [t for t in detail["tasks"] if t["phase"] == "map" and t["step"] == 1]
    if how == "api":
        assert len(maps) >= sum(p.stat().st_size for p in inputs) // SMALL_CHUNK
    assert party.names[NO_CODE] not in _task_nodes(detail)
    assert _task_nodes(detail) <= set(party.names)


def test_own_job_counters_and_status_on_the_party(party: LocalParty, runs: Runs, books: list[Path],
                                                  word_stats_twin: Path, tmp_path: Path) -> None:
    """`pdp submit` of a pdp-API job with job args: `pdp run`'s bytes; `pdp jobs ID --json`
    counters == `pdp run --json`'s == the data's; every step-2 reduce reports its status."""
    mine, report, theirs, _ = runs.get(JOBS / "word_stats.py", books, WORD_STATS_ARGS, word_stats_twin)
    lines, counters = _word_stats_oracle(books, 3)
    for how in ("cli", "api"):
        out = tmp_path / f"{how}.tsv"
        if how == "cli":
            res = _cli("submit", str(JOBS / "word_stats.py"), *map(str, books), "-o", str(out), "--node",
                       party.addr(1), "--json", "--", *WORD_STATS_ARGS, key_file=party.key_file)
            assert res.returncode == 0, res.stderr
            job_id = json.loads(res.stdout)["id"]
        else:
            job_id = "word-stats-small-chunks"
            asyncio.run(run_job([party.addr(2)], party.key, str(JOBS / "word_stats.py"), books, job_id, out,
                                args=WORD_STATS_ARGS, chunk_size=SMALL_CHUNK))
        assert out.read_bytes() == mine
        assert _lines(out.read_bytes()) == _lines(theirs) == lines
        detail = _job_detail(party, job_id)
        assert detail["steps"] == 2 and detail["args"] == WORD_STATS_ARGS
        assert detail["counters"] == report["counters"] == counters
        initials = {json.loads(line.split(b"\t")[0]) for line in lines}
        statuses = {t["stats"].get("status") for t in detail["tasks"] if t["phase"] == "reduce" and t["step"] == 2}
        statuses.discard(None)
        assert statuses and all(s.startswith("reduced ") and s[len("reduced "):] in initials for s in statuses)
        assert party.names[NO_CODE] not in _task_nodes(detail)


def test_boom_on_the_party_fails_with_the_users_traceback(party: LocalParty, books: list[Path],
                                                          tmp_path: Path) -> None:
    n, text = _boom_line()
    out = tmp_path / "never.tsv"
    res = _cli("submit", str(EXAMPLES / "mr_boom.py"), *map(str, books[:2]), "-o", str(out), "--node",
               party.addr(0), key_file=party.key_file)
    assert res.returncode == 1
    assert f'File "mr_boom.py", line {n}, in mapper_init' in res.stderr and text in res.stderr, res.stderr
    assert "Exception: BOOM" in res.stderr
    assert not out.exists()


def test_unsupported_example_fails_on_the_party(party: LocalParty, books: list[Path], tmp_path: Path) -> None:
    res = _cli("submit", str(EXAMPLES / "mr_grep.py"), str(books[0]), "-o", str(tmp_path / "never.tsv"), "--node",
               party.addr(1), "--", "-e", "the", key_file=party.key_file)
    assert res.returncode == 1 and "mapper_cmd" in res.stderr, res.stderr
    assert not (tmp_path / "never.tsv").exists()


def test_no_code_member_ran_no_task_of_any_code_job(party: LocalParty, books: list[Path], tmp_path: Path) -> None:
    """Over every job this module ran on the party (failed ones too): the no-code member never
    ran, nor was given, a task of a job file; a built-in word count does run there."""
    out = tmp_path / "wc.tsv"
    res = _cli("submit", "wordcount", *map(str, books), "-o", str(out), "--node", party.addr(0), "--json",
               key_file=party.key_file)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == oracle([str(p) for p in books])
    builtin_id = json.loads(res.stdout)["id"]

    async def details() -> list[dict[str, Any]]:
        async with Client(party.addr(1), party.key) as c:
            return [await c.job(j["id"]) for j in await c.jobs()]

    if not any(str(j["job"]).endswith(".py") for j in asyncio.run(details())):  # run alone: one code job
        asyncio.run(run_job([party.addr(0)], party.key, str(EXAMPLES / "mr_wc.py"), books, "mr-wc-alone",
                            tmp_path / "mr-wc.tsv", chunk_size=SMALL_CHUNK))
    jobs = asyncio.run(details())
    code_jobs = [j for j in jobs if str(j["job"]).endswith(".py")]
    assert code_jobs and {j["state"] for j in code_jobs} <= {"done", "failed"}
    for j in code_jobs:
        assert party.names[NO_CODE] not in _task_nodes(j), j["id"]
    [builtin_job] = [j for j in jobs if j["id"] == builtin_id]
    assert builtin_job["state"] == "done"
    # a built-in may run anywhere: give the no-code member a fair chance (small chunks, many maps)
    wc_id = "wordcount-small-chunks"
    asyncio.run(run_job([party.addr(1)], party.key, "wordcount", books, wc_id, tmp_path / "wc2.tsv",
                        chunk_size=4096))
    assert (tmp_path / "wc2.tsv").read_bytes() == out.read_bytes()
    assert party.names[NO_CODE] in _task_nodes(_job_detail(party, wc_id))


TRACE_JOB = '''
import os
from pdp.job import MRJob

with open({trace!r}, "a") as f:  # the module's top level runs wherever pdp loads this file
    f.write(os.getcwd() + "\\n")


class Traced(MRJob):
    def mapper(self, _, line):
        for word in line.split():
            yield word, 1

    def reducer(self, word, ones):
        yield word, sum(ones)
'''


def _lead(party: LocalParty, i: int, tries: int = 12) -> bool:
    """Make member ``i`` the Raft leader: freeze (SIGSTOP) whoever leads until another is
    elected, thaw it, again until ``i`` leads."""
    for _ in range(tries):
        leader = party.names.index(asyncio.run(party.wait_ready(60))["leader"])
        if leader == i:
            return True
        party.signal(leader, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    views = {asyncio.run(party.status(j))["leader"] for j in range(party.n) if j != leader}
                except Exception:  # noqa: BLE001 - a member between leaders may not answer yet
                    views = set()
                if len(views) == 1 and None not in views and party.names[leader] not in views:
                    break
                time.sleep(0.1)
        finally:
            party.signal(leader, signal.SIGCONT)
    return party.names.index(asyncio.run(party.wait_ready(60))["leader"]) == i


def test_no_code_leader_runs_no_users_code(party: LocalParty, books: list[Path], tmp_path: Path) -> None:
    """Last of the module's party tests (it moves the leadership): with the no-code member
    leading (it assembles the results), a job file's code still runs only on the members that
    allow it: not even its module's top level is imported on the leader."""
    if not _lead(party, NO_CODE):
        pytest.skip("could not make the no-code member the leader")
    trace = tmp_path / "trace.txt"
    job = tmp_path / "traced.py"
    job.write_text(TRACE_JOB.format(trace=str(trace)))
    asyncio.run(run_job([party.addr(0)], party.key, str(job), books[:2], "traced", tmp_path / "out.tsv",
                        chunk_size=SMALL_CHUNK))
    where = trace.read_text().splitlines()
    spool = str(party.root / party.names[NO_CODE])
    assert any(str(party.root) in w for w in where)  # tasks did load it (on the other members)
    assert not [w for w in where if w.startswith(spool + os.sep)]
    detail = _job_detail(party, "traced")
    assert detail["state"] == "done" and party.names[NO_CODE] not in _task_nodes(detail)
    assert detail["result"]["holders"][0] == party.names[NO_CODE]  # the leader assembled the result
    assert not (party.root / party.names[NO_CODE] / "spool" / "jobs" / "traced" / "code").exists()


# -- 6. a party where no member runs code ---------------------------------------------------------


def test_party_without_code_refuses_job_files_at_once(books: list[Path], tmp_path: Path) -> None:
    for p in _PARTIES:  # one party at a time on this machine: the module's is done by now
        p.stop()
    with LocalParty(tmp_path / "no-code", n=1, cpus=1) as p:
        asyncio.run(p.wait_ready(60))
        t0 = time.monotonic()
        out = tmp_path / "never.tsv"
        res = _cli("submit", str(EXAMPLES / "mr_word_freq_count.py"), str(books[0]), "-o", str(out), "--node",
                   p.addr(0), key_file=p.key_file)
        assert res.returncode == 1
        assert "allow_code" in res.stderr and "queued" not in res.stderr, res.stderr
        assert time.monotonic() - t0 < 10 and not out.exists()
        jobs = _cli("jobs", "--json", "--node", p.addr(0), key_file=p.key_file)
        assert jobs.returncode == 0 and json.loads(jobs.stdout) == []
        res = _cli("submit", "wordcount", str(books[0]), "-o", str(out), "--node", p.addr(0), key_file=p.key_file)
        assert res.returncode == 0, res.stderr  # built-ins run everywhere
        assert out.read_bytes() == oracle([str(books[0])])

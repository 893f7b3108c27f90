"""Other users' text in `pdp jobs`, `pdp jobs ID` and `pdp status` prints as it is: a comment,
submitter, error, member name or pause reason is never read as rich markup (``[/x]`` made rich
raise MarkupError) nor as an emoji code."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from pdp import cli

HOSTILE = "[/x] [red]hi [bold red]x[/] :skull: \\[y]"


def render(parts: Any) -> str:
    out = io.StringIO()
    con = Console(file=out, width=1000, color_system=None, force_terminal=False)
    for part in parts if isinstance(parts, list) else [parts]:
        con.print(part)
    return out.getvalue()


def job(text: str = HOSTILE) -> dict[str, Any]:
    return {"id": "wordcount-20240101-000000-" + "ab" * 16, "kind": "wordcount", "state": "failed",
            "error": f"map 1 failed on {text}", "form": {"size": 12, "submitter": text, "comment": text},
            "maps": 2, "maps_done": 1, "reduces": 1, "reduces_done": 0, "priority": 0, "backups": 1,
            "reruns": {f"member {text} lost": 1}}


def job_detail(text: str = HOSTILE) -> dict[str, Any]:
    tasks = [{"phase": "map", "index": 0, "state": "done", "node": text, "attempt": 1, "runs": [], "bytes": 5,
              "stats": {"seconds": 0.5}},
             {"phase": "map", "index": 1, "state": "running", "node": "", "attempt": 2, "runs": [[2, text]],
              "bytes": 7, "stats": {}}]
    return {**job(text), "tasks": tasks}


def status(text: str = HOSTILE) -> dict[str, Any]:
    member = {"name": text, "data_addr": f"{text}:7700", "cpus": 2, "score": 0.5, "rate": 0, "benched_until": 0,
              "record": {"done": 1, "failed": 0, "lost": 0}, "health": "alive", "heartbeat_age": 0.2,
              "tasks": [{"job": "j", "phase": "map", "index": 0, "progress": 10}], "paused": f"owner said {text}"}
    return {"node": text, "leader": text, "term": 3, "jobs": {"queued": 0},
            "raft": {"commit_idx": 1, "last_applied": 1, "truncations": 0, "diverged": False},
            "reruns": {f"member {text} lost": 2}, "members": [member, {**member, "name": "b", "paused": ""}]}


def test_jobs_table_prints_comments_literally() -> None:
    out = render(cli._jobs_table([job(), job("plain words")]))
    assert out.count(HOSTILE) == 3  # the error, the submitter and the comment, as typed
    assert f"failed: map 1 failed on {HOSTILE}" in out
    assert "plain words" in out


def test_job_view_prints_errors_and_node_names_literally() -> None:
    out = render(cli._job_view(job_detail()))
    assert f"failed: map 1 failed on {HOSTILE}" in out and f"re-runs 1× member {HOSTILE} lost" in out
    assert out.count(HOSTILE) >= 4  # head line (error, re-runs) and the two tasks' nodes


def test_status_view_prints_member_names_and_pause_reasons_literally() -> None:
    out = render(cli._status_view(status()))
    assert f"node {HOSTILE}; leader {HOSTILE}, term 3" in out
    assert f"tasks re-run: 2× member {HOSTILE} lost" in out
    assert f"{HOSTILE} (leader)" in out and f"{HOSTILE}:7700" in out
    assert f"paused: owner said {HOSTILE}; finishing j map 0 (10 B)" in out
    assert "j map 0 (10 B)" in out


@pytest.mark.parametrize("text", ["[/x]", "[bold red]", "[/]", "[link=file:///etc/passwd]x[/link]", "\\", "[", "]"])
def test_single_markup_fragments_never_raise(text: str) -> None:
    assert text in render(cli._jobs_table([job(text)]))
    assert text in render(cli._job_view(job_detail(text)))
    assert text in render(cli._status_view(status(text)))


def test_commands_print_hostile_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands themselves, with the party's answers faked."""
    answers = {"jobs": [job()], "job": job_detail()}

    async def fake_with_client(addr: str, key: bytes, op: Any) -> Any:
        class Fake:
            async def jobs(self) -> Any:
                return answers["jobs"]

            async def job(self, job_id: str) -> Any:
                return dict(answers["job"])

        return await op(Fake())

    async def fake_call(addr: str, key: bytes, kind: str, **fields: Any) -> Any:
        assert kind == "status"
        return status()

    monkeypatch.setattr(cli, "_with_client", fake_with_client)
    monkeypatch.setattr(cli, "_call", fake_call)
    monkeypatch.setattr(cli, "_key", lambda key_file: b"k" * 32)
    monkeypatch.setenv("COLUMNS", "1000")
    runner = CliRunner()
    for args in (["jobs"], ["jobs", "some-id"], ["status"]):
        res = runner.invoke(cli.app, args)
        assert res.exit_code == 0, (args, res.output, res.exception)
        assert HOSTILE in res.output, args

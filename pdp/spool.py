"""A node's spool directory: job inputs, fetched chunks, map outputs, reduce outputs, results.

Layout under ``<data-dir>/spool``::

    inputs/<job>-<k>            input k of a job, as uploaded by the submitter
    jobs/<job>/chunk-<m>        map m's line-aligned bytes fetched from a holder
    jobs/<job>/map-<m>          map m's output: every reduce partition (pdp.mapoutput)
    jobs/<job>/in-<r>-<k>       a reducer's k-th batch of partition r fetched from other members
    jobs/<job>/reduce-<r>       reduce r's output (sorted lines)
    jobs/<job>/part-<r>         the master's fetched copy of reduce-<r>
    jobs/<job>/result           the job's final output
    jobs/<job>/progress-<slot>  bytes done by the task running in a slot

Every name is built here from validated ids, so nothing from the wire picks a path.
"""

from __future__ import annotations

import re
from pathlib import Path

from pdp.errors import PdpError

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_NAME = re.compile(r"^(chunk-\d+|map-\d+|in-\d+-\d+|reduce-\d+|part-\d+|result|progress-\d+)$")


def check_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _ID.match(job_id) or ".." in job_id:
        raise PdpError(f"bad job id {job_id!r}: use letters, digits, '.', '_' and '-' (at most 96)")
    return job_id


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: set[str] = set()  # job dirs known to exist (a mkdir per file name is costly)
        (root / "inputs").mkdir(parents=True, exist_ok=True)
        (root / "jobs").mkdir(parents=True, exist_ok=True)

    def input(self, file_id: str) -> Path:
        return self.root / "inputs" / check_id(file_id)

    def job_dir(self, job_id: str) -> Path:
        path = self.root / "jobs" / check_id(job_id)
        if job_id not in self._made or not path.is_dir():  # the janitor may have removed it
            path.mkdir(exist_ok=True)
            self._made.add(job_id)
        return path

    def file(self, job_id: str, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.match(name):
            raise PdpError(f"bad spool file name {name!r}")
        return self.job_dir(job_id) / name

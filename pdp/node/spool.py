"""A node's spool directory: job inputs, fetched chunks, map outputs, reduce outputs, results.

Layout under ``<data-dir>/spool``::

    inputs/<job>-<k>            input k of a job, as uploaded by the submitter
    jobs/<job>/chunk-<m>        map m's line-aligned bytes fetched from a holder
    jobs/<job>/map-<m>          map m's output: every reduce partition (pdp.jobs.mapoutput)
    jobs/<job>/in-<r>-<k>       a reducer's k-th batch of partition r fetched from other members
    jobs/<job>/reduce-<r>       reduce r's output (sorted lines)
    jobs/<job>/part-<r>         the master's fetched copy of reduce-<r>
    jobs/<job>/result           the job's final output
    jobs/<job>/progress-<slot>  bytes done by the task running in a slot

Every name is built here from validated ids (matched whole: no newline or slash slips
through), so nothing from the wire picks a path. The spool's directories are the node
owner's alone (0700), so other accounts on the machine cannot read anyone's job data
whatever the modes of the files inside; files the spool creates itself are 0600 (FILE_MODE,
for writers such as ``atomic_writer(path, mode=FILE_MODE)``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pdp.errors import PdpError

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # job ids (at most 100) and file ids (job id + "-k")
_NAME = re.compile(r"chunk-\d+|map-\d+|in-\d+-\d+|reduce-\d+|part-\d+|result|progress-\d+|code|code\.bundle")
DIR_MODE = 0o700
FILE_MODE = 0o600


def check_id(job_id: str) -> str:
    if not isinstance(job_id, str) or _ID.fullmatch(job_id) is None or ".." in job_id:
        raise PdpError(f"bad job id {job_id!r}: use letters, digits, '.', '_' and '-' (at most 128), "
                       "starting with a letter or digit")
    return job_id


def private_dir(path: Path) -> Path:
    """Make ``path`` (and missing parents) a directory only its owner can enter: 0700."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != DIR_MODE:
        os.chmod(path, DIR_MODE)  # made earlier (or by an older version) with looser modes
    return path


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: set[str] = set()  # job dirs known to exist (a mkdir per file name is costly)
        private_dir(root)
        private_dir(root / "inputs")
        private_dir(root / "jobs")

    def input(self, file_id: str) -> Path:
        return self.root / "inputs" / check_id(file_id)

    def job_dir(self, job_id: str) -> Path:
        path = self.root / "jobs" / check_id(job_id)
        if job_id not in self._made or not path.is_dir():  # the janitor may have removed it
            private_dir(path)
            self._made.add(job_id)
        return path

    def file(self, job_id: str, name: str) -> Path:
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise PdpError(f"bad spool file name {name!r}")
        return self.job_dir(job_id) / name

"""Finding a job's class: a built-in by name, or a user's job file (pdp's or mrjob's ``MRJob``).

A job file is a Python module; its job class is the one ``MRJob`` subclass it defines (or
the one named by ``FILE.py:ClassName``). A file that imports ``mrjob.job`` runs as it is
where mrjob is installed: its steps, protocols and arguments are mrjob's own objects, and
pdp collects its counters. The module is compiled under the file's own name, so a
traceback points at the user's lines.
"""

from __future__ import annotations

import hashlib
import linecache
import os
import sys
import types
from pathlib import Path
from typing import Any

from pdp.errors import InputError
from pdp.jobs.api import JobDefinitionError
from pdp.jobs.api import MRJob as PdpMRJob

_MODULES: dict[str, types.ModuleType] = {}  # (source digest, path) -> module, per task process


def builtins() -> dict[str, type]:
    """The built-in jobs by name (test-only ones with PDP_TEST_KINDS=1)."""
    from pdp.jobs.builtin import BUILTINS, TEST_ONLY

    known = dict(BUILTINS)
    if os.environ.get("PDP_TEST_KINDS") == "1":
        known.update(TEST_ONLY)
    return known


def builtin(name: str) -> type:
    known = builtins()
    try:
        return known[name]
    except KeyError:
        raise InputError(f"unknown job {name!r}: give a job file (JOB.py) or a built-in: "
                         f"{', '.join(sorted(known))}") from None


def is_job_class(obj: Any) -> bool:
    if not isinstance(obj, type):
        return False
    if issubclass(obj, PdpMRJob) and obj is not PdpMRJob:
        return True
    mrjob = sys.modules.get("mrjob.job")
    base = getattr(mrjob, "MRJob", None) if mrjob is not None else None
    return base is not None and issubclass(obj, base) and obj is not base


def load_module(path: str, display: str | None = None) -> types.ModuleType:
    """Import a job file (once per process for the same bytes)."""
    source = Path(path).read_bytes()
    key = hashlib.sha256(source).hexdigest() + ":" + os.path.abspath(path)
    if key in _MODULES:
        return _MODULES[key]
    name = f"pdp_job_{key[:16]}"
    module = types.ModuleType(name)
    module.__file__ = os.path.abspath(path)
    shown = display or path
    text = source.decode("utf-8", errors="replace")
    linecache.cache[shown] = (len(text), None, text.splitlines(True), shown)
    sys.modules[name] = module
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)  # a job file may import modules shipped beside it (FILES)
    try:
        exec(compile(source, shown, "exec"), module.__dict__)  # noqa: S102 - the user's own job, run by choice
    except SyntaxError as exc:
        del sys.modules[name]
        raise JobDefinitionError(f"{shown}, line {exc.lineno}: {exc.msg}") from None
    _MODULES[key] = module
    return module


def job_class(module: types.ModuleType, cls: str = "", shown: str = "") -> type:
    """The job class a job file defines."""
    if cls:
        found = getattr(module, cls, None)
        if not is_job_class(found):
            raise JobDefinitionError(f"{shown or module.__file__} has no job class {cls!r}")
        return found  # type: ignore[return-value]
    mine = [obj for obj in vars(module).values() if is_job_class(obj) and obj.__module__ == module.__name__]
    if not mine:
        raise JobDefinitionError(f"{shown or module.__file__} defines no MRJob subclass "
                                 "(from pdp.job import MRJob, or mrjob.job)")
    if len(mine) > 1:
        names = ", ".join(sorted(c.__name__ for c in mine))
        raise JobDefinitionError(f"{shown or module.__file__} defines several job classes ({names}): "
                                 f"name one as FILE.py:ClassName")
    return mine[0]


def load_job(spec: dict[str, Any]) -> Any:
    """A new job instance for ``spec`` (one per task, as mrjob's one process per task; the
    module is imported once per process)."""
    args = tuple(str(a) for a in spec.get("args") or ())
    if spec.get("builtin"):
        key: tuple[Any, ...] = ("builtin", spec["builtin"], args)
    else:
        code = str(spec.get("code") or "")
        main = os.path.abspath(os.path.join(code, str(spec.get("main") or "job.py")))
        key = ("code", main, str(spec.get("cls", "")), args)
    if key[0] == "builtin":
        cls = builtin(str(spec["builtin"]))
    else:
        if not os.path.isfile(main):
            raise InputError(f"the job's code is missing here ({main})")
        os.chdir(os.path.dirname(main))  # mrjob runs a task in a directory holding its FILES
        cls = job_class(load_module(main, str(spec.get("shown") or os.path.basename(main))), str(spec.get("cls", "")))
    return new_job(cls, list(args))


def new_job(cls: type, args: list[str]) -> Any:
    """An instance of a job class with these job arguments (mrjob's classes take ``args=``);
    bad arguments raise :class:`JobDefinitionError`."""
    try:
        return cls(args=list(args)) if _is_mrjob(cls) else cls(list(args))
    except (ValueError, SystemExit) as exc:
        if isinstance(exc, JobDefinitionError):
            raise
        raise JobDefinitionError(f"bad job arguments {args!r} for {cls.__name__}: {exc}") from None


def _is_mrjob(cls: type) -> bool:
    mrjob = sys.modules.get("mrjob.job")
    base = getattr(mrjob, "MRJob", None) if mrjob is not None else None
    return base is not None and issubclass(cls, base)


class Prepared:
    """What a submitter sends for a job: its kind (a built-in's name or the job file's
    stem), the spec, the number of steps, and the code bundle of a user's job."""

    def __init__(self, kind: str, spec: dict[str, Any], steps: int, bundle: bytes | None) -> None:
        self.kind, self.spec, self.steps, self.bundle = kind, spec, steps, bundle


def split_ref(ref: str) -> tuple[str, str]:
    """``FILE.py:ClassName`` -> (FILE.py, ClassName); a plain reference has no class."""
    path, sep, cls = ref.rpartition(":")
    if sep and path.endswith(".py") and cls.isidentifier():
        return path, cls
    return ref, ""


def prepare(job: Any, args: list[str]) -> Prepared:
    """Load the job here (the submitter's own code, on its own machine) to check it and its
    arguments and count its steps; a job file travels with its FILES."""
    import inspect
    import re

    from pdp.jobs.bundle import make_bundle

    if isinstance(job, str) and not split_ref(job)[0].endswith(".py"):  # the party knows its built-ins
        return Prepared(job, {"builtin": job, "args": list(args)}, 0, None)
    if isinstance(job, type):
        source = inspect.getsourcefile(job)
        if source is None:
            raise InputError(f"cannot find the source file of {job.__name__}: define it in a .py file")
        path, cls_name = Path(source), job.__name__
    else:
        ref, cls_name = split_ref(str(job))
        path = Path(ref)
    if not path.is_file():
        raise InputError(f"job file {path} does not exist")
    module = load_module(str(path), path.name)
    cls = job_class(module, cls_name, path.name)
    instance = new_job(cls, list(args))
    from pdp.jobs.runtime import check_step, user_code

    with user_code("setup"):
        found = list(instance.steps())
    for k, step in enumerate(found):
        check_step(step, k)  # refused here, before any upload
    steps = len(found)
    files = job_files(instance, path)
    kind = re.sub(r"[^A-Za-z0-9_-]", "-", path.stem)[:64].lstrip("-_") or "job"
    spec = {"main": path.name, "cls": cls_name, "shown": path.name, "args": list(args)}
    return Prepared(kind, spec, steps, make_bundle(path, files))


def job_files(job: Any, path: Path) -> list[Path]:
    """The files a job names in ``FILES`` (relative ones beside its job file, as mrjob)."""
    files = [str(f).split("#")[0] for f in getattr(job, "FILES", None) or []]  # mrjob's "#rename" is not kept
    return [Path(f) if os.path.isabs(f) else path.parent / f for f in files]

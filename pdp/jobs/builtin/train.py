"""The training built-ins: ``train`` (rounds), ``predict`` (map only) and ``stats`` (one pass).

``train`` is an iterative job (``ITERATE``): the party runs it in rounds (see
:meth:`pdp.core.state.State._round`). Every round maps each chunk of the input where it is
stored and reduces the chunks' partial sums into one; between rounds the master calls
:meth:`Train.update` with the round's sum and commits the next model to the log, so a new
master continues from the last finished round.

* Round 1 *scans*: which columns are numbers, the categories seen, means for imputation and
  (k-means) a seeded sample (:mod:`pdp.train.table`). Its update fixes the feature layout.
* Every later round maps each chunk with the current model (:func:`pdp.train.models.partial`);
  a chunk's parsed arrays are cached beside the task's output, in the member's spool
  (``train-*.npz``), so later rounds on that member do not parse CSV again. The spool
  janitor deletes them with the job's other files.
* The result, written by the master, is the model file (:func:`pdp.train.models.finish`),
  JSON.

``predict`` maps each record through a model file, keyed by (input, line) so that the
result lists one JSON object per record in input order. ``stats`` reduces the chunks'
column summaries (:mod:`pdp.train.stats`) to one JSON object.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from functools import reduce
from typing import TYPE_CHECKING, Any

from pdp.errors import InputError
from pdp.jobs import inputs
from pdp.jobs.api import JSONValueProtocol, MRJob, RawValueProtocol
from pdp.train import FORMAT

if TYPE_CHECKING:  # numpy and the numerics load in the tasks that train, not with every built-in
    import numpy as np

    from pdp.train.fastcsv import Plain

KEY = "s"  # every chunk's partial goes to one key: one reduce sums them all
MAX_PLAIN = 256 << 20  # bytes of a chunk the fast path reads into memory at once
STATS_BLOCK = 1 << 20  # stats parse a chunk in blocks of about this many bytes


def _rows(path: str, start: int, end: int, spec: dict[str, Any]) -> tuple[str, Iterator[tuple[int, Any]]]:
    """(the input's name, its records as (line, record)) of a map's range."""
    data_type = spec.get("data_type") or "text"
    name = str(spec.get("name") or path)
    if data_type not in ("csv", "jsonl"):
        raise InputError(f"{name}: training data must be CSV (with a header row) or JSON Lines, not {data_type}; "
                         "give --data-type csv or jsonl if the extension does not say")
    records = inputs.records(path, start, end, data_type, name=name, line=int(spec.get("line", 1)),
                             header=spec.get("header"), numbered=True, base=int(spec.get("base", 0)))
    return name, _objects(records, name)


def _plain(path: str, start: int, end: int, spec: dict[str, Any], workdir: str | None = None,
           reuse: bool = False, columns: bool = False) -> Plain | None:
    """The range as a :class:`pdp.train.fastcsv.Plain` when it is a CSV chunk of plain
    numbers (the common case, parsed by numpy at C speed), else None (read record by record).
    With ``workdir`` (the job's spool), the parsed cells are kept there for the next round;
    with ``reuse`` too they are read back from there (without the cells' text, which only
    the scan needs). With ``columns``, a chunk with text columns is plain too (stats)."""
    import numpy as np

    from pdp.train import fastcsv

    if (spec.get("data_type") or "text") != "csv" or end - start > MAX_PLAIN:
        return None
    cache = _cache_path(workdir, "plain", path, start, end, spec) if workdir else None
    if cache is not None and reuse:
        try:
            with np.load(cache, allow_pickle=False) as got:
                return fastcsv.Plain([str(h) for h in got["header"]], got["cells"], [], int(got["line"]))
        except (OSError, KeyError, ValueError):
            pass
    found = _csv_body(path, start, end, spec)
    if found is None:
        return None
    data, header, line = found
    plain = (fastcsv.parse_columns if columns else fastcsv.parse)(data, header, line)
    if plain is not None and cache is not None:
        _save(cache, cells=plain.cells, header=np.array(plain.header), line=plain.line)
    return plain


def _csv_body(path: str, start: int, end: int, spec: dict[str, Any]) -> tuple[bytes, list[str], int] | None:
    """A CSV range's bytes without the input's BOM and header row, its header and the line
    its first record is on; None when the header row is quoted (the general path reads it)."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    header, line = spec.get("header"), int(spec.get("line", 1))
    if int(spec.get("base", 0)) + start == 0:  # the input's start: its BOM and header row
        data = data.removeprefix(b"\xef\xbb\xbf")
        first, _, data = data.partition(b"\n")
        if b'"' in first:
            return None
        header = header or first.decode("utf-8", "replace").removesuffix("\r").split(",")
        line += 1
    return data, list(header or []), line


def _blocks(data: bytes, line: int, size: int) -> Iterator[tuple[bytes, int]]:
    """``data`` (whole lines) in pieces of about ``size`` bytes, each with its first line."""
    at = 0
    while at < len(data):
        cut = data.find(b"\n", min(len(data), at + size) - 1)
        cut = len(data) if cut < 0 else cut + 1
        yield data[at:cut], line
        line += data.count(b"\n", at, cut)
        at = cut


def _plain_stats(path: str, start: int, end: int, spec: dict[str, Any]) -> dict[str, Any] | None:
    """:func:`pdp.train.stats.partial` of a plain CSV range, parsed by numpy in blocks (the
    cells' text stays small), or None: the general path reads it."""
    from pdp.train import fastcsv
    from pdp.train.stats import merge, partial_plain

    found = _csv_body(path, start, end, spec) if (spec.get("data_type") or "text") == "csv" else None
    if found is None:
        return None
    data, header, first = found
    parts = []
    for block, line in _blocks(data, first, STATS_BLOCK):
        plain = fastcsv.parse_columns(block, header, line)
        if plain is None:
            return None
        parts.append(partial_plain(plain.header, plain.cells, plain.tokens, plain.text))
    return reduce(merge, parts) if parts else None


def _cache_path(workdir: str, kind: str, path: str, start: int, end: int, spec: dict[str, Any],
                extra: Any = None) -> str:
    """Where a member keeps what it parsed of a map's range (its job's spool: the janitor
    deletes it with the job), named for the input, the range and ``extra`` (a layout)."""
    tag = hashlib.sha256(json.dumps([spec.get("name"), spec.get("input_index"), int(spec.get("base", 0)) + start,
                                     end - start, extra], sort_keys=True).encode())
    return os.path.join(workdir, f"train-{kind}-{tag.hexdigest()[:32]}.npz")


def _save(cache: str, **arrays: Any) -> None:
    import numpy as np

    tmp = f"{cache}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, cache)


def _objects(records: Iterable[tuple[Any, Any]], name: str) -> Iterator[tuple[int, Any]]:
    for line, value in records:
        if not isinstance(value, dict):
            raise InputError(f"{name} line {line}: a JSON Lines record must be an object with named fields, "
                             f"not {type(value).__name__}")
        yield line, value


def _params(pairs: list[str]) -> dict[str, Any]:
    """``--param NAME=VALUE`` (repeatable): numbers as numbers, true/false, else text."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise InputError(f"--param {pair!r}: give NAME=VALUE (e.g. --param C=0.5)")
        value: Any = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    pass
        params[name] = value
    return params


class _Blob:
    """The reduce's line (never written: the master writes the result of a round job)."""

    def write(self, key: Any, value: Any) -> bytes:
        return b""


class Train(MRJob):
    """``pdp train ALGORITHM``: fit a model in rounds (see the module docstring)."""

    ITERATE = True
    OUTPUT_PROTOCOL = _Blob

    def configure_args(self) -> None:
        from pdp.train.models import ALGORITHMS

        self.add_passthru_arg("--algorithm", required=True, choices=ALGORITHMS)
        self.add_passthru_arg("--target", default=None)
        self.add_passthru_arg("--features", default="", help="comma-separated columns (default: all but the target)")
        self.add_passthru_arg("--missing", default="drop", choices=("drop", "mean"))
        self.add_passthru_arg("--param", action="append", default=[], help="NAME=VALUE, e.g. C=0.5, k=3")

    def load_args(self, args: list[str]) -> None:
        from pdp.train.models import check_params

        super().load_args(args)
        self.params = _params(self.options.param)
        check_params(self.options.algorithm, self.params)  # a bad parameter is refused at submit, before any upload
        self.features = [f.strip() for f in self.options.features.split(",") if f.strip()] or None

    # -- workers --

    def map_chunk(self, path: str, start: int, end: int, spec: dict[str, Any], workdir: str
                  ) -> Iterator[tuple[str, bytes]]:
        from pdp.train import codec, fastcsv

        model = spec.get("model")
        if model is None:  # the first round scans
            from pdp.train.models import sample_size
            from pdp.train.table import scan_partial

            size, seed = sample_size(self.options.algorithm, self.params), int(self.params.get("seed", 0))
            plain = _plain(path, start, end, spec, workdir)
            if plain is not None:
                scan = fastcsv.scan(plain, str(spec.get("name") or path), sample=size, seed=seed)
            else:
                name, rows = _rows(path, start, end, spec)
                scan = scan_partial(rows, name, sample=size, seed=seed)
            yield KEY, codec.pack({"scan": scan})
            return
        from pdp.train.models import partial

        if model["layout"].get("text") is not None:  # naive Bayes over a text column: word counts
            from pdp.train import text

            name, rows = _rows(path, start, end, spec)
            lowercase = bool(model["params"].get("lowercase"))
            yield KEY, codec.pack({"fit": text.partial(rows, model["layout"], name, lowercase)})
            return
        x, y, dropped = self._arrays(path, start, end, spec, model["layout"], workdir)
        yield KEY, codec.pack({"fit": partial(model, x, y, dropped=dropped)})

    def _arrays(self, path: str, start: int, end: int, spec: dict[str, Any], layout: dict[str, Any],
                workdir: str) -> tuple[np.ndarray, np.ndarray | None, int]:
        """The chunk as arrays: parsed once per member and kept in ``workdir`` (the job's spool)."""
        import numpy as np

        from pdp.train import fastcsv
        from pdp.train.table import encode

        cache = _cache_path(workdir, "arrays", path, start, end, spec, layout)
        try:
            with np.load(cache, allow_pickle=False) as got:
                return got["x"], (got["y"] if bool(got["has_y"]) else None), int(got["dropped"])
        except (OSError, KeyError, ValueError):
            pass
        plain = _plain(path, start, end, spec, workdir, reuse=True)
        arrays = fastcsv.encode(plain, layout) if plain is not None else None
        if arrays is None:
            name, rows = _rows(path, start, end, spec)
            arrays = encode(rows, layout, name)
        x, y, dropped, _ = arrays
        _save(cache, x=x, y=y if y is not None else np.zeros(0), has_y=y is not None, dropped=dropped)
        return x, y, dropped

    def reducer(self, key: str, values: Iterable[bytes]) -> Iterator[tuple[str, bytes]]:
        from pdp.train import codec

        yield key, codec.pack(reduce(_merge, (codec.unpack(v) for v in values)))

    combiner = reducer

    # -- the master --

    def update(self, model: dict[str, Any] | None, values: list[bytes]) -> dict[str, Any]:
        """The next model from the round's sum: ``{"model", "done", "text"}``."""
        from pdp.train import codec

        total = reduce(_merge, (codec.unpack(v) for v in values))
        if model is None:
            from pdp.train.models import start, task_of
            from pdp.train.table import make_layout

            algorithm = self.options.algorithm
            layout = make_layout(total["scan"], target=self.options.target, features=self.features,
                                 missing=self.options.missing, task=task_of(algorithm),
                                 text=self.params.get("text"))
            model = start(algorithm, dict(self.params), layout, total["scan"])
            return {"model": model, "done": False, "text": f"{len(layout['features'])} features"}
        from pdp.train.models import update

        model, done = update(model, total["fit"])
        _check_size(model)
        loss = model.get("loss")
        return {"model": model, "done": bool(done), "text": f"loss {loss:.6g}" if isinstance(loss, float) else ""}

    def result(self, model: dict[str, Any]) -> bytes:
        from pdp.train.models import finish

        return json.dumps(finish(model), indent=1).encode() + b"\n"


def _check_size(model: dict[str, Any]) -> None:
    """InputError when the model is too big for the replicated log (MAX_MODEL), saying how
    to make it smaller."""
    import msgpack

    from pdp.core.state import MAX_MODEL

    size = len(msgpack.packb(model))
    if size > MAX_MODEL:
        hint = ("lower --param max_features" if model["params"].get("text") is not None
                else "use fewer features or categories")
        raise InputError(f"the model is {size / (1 << 20):.1f} MiB; a round's model may be at most "
                         f"{MAX_MODEL >> 20} MiB (it lives in the party's log): {hint}")


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    if "scan" in a:
        from pdp.train.table import merge_scan

        return {"scan": merge_scan(a["scan"], b["scan"])}
    from pdp.train.models import merge

    return {"fit": merge(a["fit"], b["fit"])}


class Predict(MRJob):
    """``pdp predict MODEL``: one JSON object per input record, in input order. The model
    file travels in the job's spec (``spec["model"]``, as a round job's model does)."""

    OUTPUT_PROTOCOL = JSONValueProtocol

    def map_chunk(self, path: str, start: int, end: int, spec: dict[str, Any], workdir: str
                  ) -> Iterator[tuple[list[int], Any]]:
        from pdp.train import fastcsv

        from pdp.train.models import predict
        from pdp.train.table import encode

        model = check_model(spec.get("model"))
        index = int(spec.get("input_index", 0))
        if model["layout"].get("text") is not None:  # naive Bayes over a text column: its words
            from pdp.train import text

            name, rows = _rows(path, start, end, spec)
            found, lines = text.docs(rows, model["layout"], bool(model["params"].get("lowercase")))
            for line, out in zip(lines, predict(model, found)):
                yield [index, line], out
            return
        plain = _plain(path, start, end, spec)
        arrays = fastcsv.encode(plain, model["layout"], need_target=False) if plain is not None else None
        if arrays is None:
            name, rows = _rows(path, start, end, spec)
            arrays = encode(rows, model["layout"], name, need_target=False)
        x, _, _, lines = arrays
        for line, out in zip(lines, predict(model, x)):
            yield [index, line], out

    def reducer(self, key: Any, values: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        for value in values:
            yield key, value


def check_model(model: Any) -> dict[str, Any]:
    """``model`` if it is a model file of ``pdp train``; InputError saying what it is not."""
    if not isinstance(model, dict) or model.get("format") != FORMAT:
        raise InputError(f"that is not a pdp model file (format {FORMAT}): make one with `pdp train`")
    return model


class Stats(MRJob):
    """``pdp stats``: per column count, missing, mean, std, min, max, quantiles, distinct, top."""

    OUTPUT_PROTOCOL = RawValueProtocol

    def map_chunk(self, path: str, start: int, end: int, spec: dict[str, Any], workdir: str
                  ) -> Iterator[tuple[str, bytes]]:
        from pdp.train import codec
        from pdp.train.stats import partial

        fast = _plain_stats(path, start, end, spec)
        if fast is not None:
            yield KEY, codec.pack(fast)
            return
        name, rows = _rows(path, start, end, spec)
        yield KEY, codec.pack(partial(rows, name))

    def combiner(self, key: str, values: Iterable[bytes]) -> Iterator[tuple[str, bytes]]:
        from pdp.train import codec
        from pdp.train.stats import merge

        yield key, codec.pack(reduce(merge, (codec.unpack(v) for v in values)))

    def reducer(self, key: str, values: Iterable[bytes]) -> Iterator[tuple[str, str]]:
        from pdp.train import codec
        from pdp.train.stats import finish, merge

        yield key, json.dumps(finish(reduce(merge, (codec.unpack(v) for v in values))), sort_keys=False)

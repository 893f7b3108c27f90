"""Models fitted in rounds: linear, logistic, naive Bayes and k-means.

The protocol, per round: every chunk computes ``partial(model, X, y)`` (numpy leaves), the
partials are combined with :func:`merge` (associative and commutative in exact arithmetic,
deterministic) and the master calls ``update(model, total) -> (model, done)``. Round 0 (the
scan, :mod:`pdp.train.table`) precedes :func:`start`. Models are plain data (no numpy).

* ``linear``: one round of centred co-moments (Chan's merge); ridge ``alpha`` (intercept
  not penalised), the minimum-norm solution when singular. ``loss``: training MSE.
* ``logistic``: Newton's method on ``C * sum(log loss) + 0.5 * ||W||^2`` (intercept not
  penalised; sklearn's minimiser), sigmoid for two classes, softmax over all K for more. A
  round evaluates loss and gradient at the last accepted point plus 1, 2, 4 and 8 times the
  Newton step (a conservative step far from the optimum, as on nearly separable classes,
  is lengthened in the same pass over the data: about 40 % fewer rounds), and the Hessian
  at the first; the lowest objective is accepted, and when none is lower than the last
  accepted one the step is halved (three shorter ones tried). Stops when, at an accepted
  point, ``max|gradient of the objective| / n <= tol`` and the Newton step moves no weight
  by more than ``tol * max(1, max|W|)``, or after ``max_iter`` rounds (the last accepted
  point is the model). ``loss``: mean training log loss.
* ``naive-bayes``: one round; ``kind`` "gaussian" (Chan-merged per-class moments,
  sklearn's ``var_smoothing``) or "multinomial" (non-negative counts, smoothing ``alpha``):
  over count columns, or with ``text=COL`` over the words of a text column
  (:mod:`pdp.train.text`; the vocabulary, at most ``max_features`` words, is the layout's
  ``features``).
  ``loss``: mean negative joint log-likelihood on the training rows.
* ``kmeans``: k-means++ on the scan's sample (seeded), then Lloyd rounds. ``tol`` is
  relative, like sklearn: stop when the total squared centre shift is at most ``tol`` times
  the mean per-feature variance of the data (measured in the first Lloyd round), or after
  ``max_iter`` Lloyd rounds; then one more round measures the final centres' inertia
  (none is needed when the centres did not move at all). ``loss``: inertia / rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pdp.errors import ConfigError, InputError
from pdp.train import FORMAT, table, text

ALGORITHMS = ("linear", "logistic", "naive-bayes", "kmeans")
_TASKS = {"linear": "regression", "logistic": "classification",
          "naive-bayes": "classification", "kmeans": "none"}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"alpha": 0.0},
    "logistic": {"C": 1.0, "tol": 1e-4, "max_iter": 100},
    "naive-bayes": {"kind": "gaussian", "alpha": 1.0, "var_smoothing": 1e-9, "text": None,
                    "max_features": 10000, "lowercase": False},
    "kmeans": {"k": None, "seed": 0, "tol": 1e-4, "max_iter": 300, "sample": 10000},
}
_MAX_HALVINGS = 40
_BLOCK = 1 << 21  # array cells per block of rows in the logistic and k-means partials


def task_of(algorithm: str) -> str:
    """The table task an algorithm needs: "regression", "classification" or "none"."""
    if algorithm not in _TASKS:
        raise ConfigError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    return _TASKS[algorithm]


def sample_size(algorithm: str, params: dict[str, Any]) -> int:
    """How many rows the scan round should sample (k-means' initialisation), else 0."""
    return int(params.get("sample", 10000)) if algorithm == "kmeans" else 0


def _number(params: dict[str, Any], key: str, lo: float, *, integer: bool = False) -> None:
    v = params[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= lo
    if not ok or (integer and v != int(v)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"parameter {key} must be {kind} >= {lo}, not {v!r}")
    params[key] = int(v) if integer else float(v)


def check_params(algorithm: str, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters with defaults filled in; ConfigError on an unknown or bad one."""
    task_of(algorithm)
    out = dict(_DEFAULTS[algorithm])
    unknown = sorted(set(params) - set(out) - {"seed"})
    if unknown:
        raise ConfigError(f"{algorithm} takes no parameter {', '.join(unknown)}; "
                          f"it takes {', '.join(sorted(out))}")
    out.update(params)
    if algorithm == "naive-bayes":
        _text_params(params, out)
    for key in ("alpha", "C", "tol", "var_smoothing"):
        if key in out:
            _number(out, key, 0.0)
    for key in ("max_iter", "k", "sample", "max_features"):
        if key in out:
            if out[key] is None:
                raise ConfigError(f"{algorithm} needs the parameter {key}")
            _number(out, key, 1, integer=True)
    if algorithm == "naive-bayes" and out["kind"] not in ("gaussian", "multinomial"):
        raise ConfigError(f"naive-bayes kind must be gaussian or multinomial, not {out['kind']!r}")
    if algorithm == "logistic" and out["C"] <= 0:
        raise ConfigError("parameter C must be > 0")
    return out


def _text_params(given: dict[str, Any], out: dict[str, Any]) -> None:
    """Naive Bayes over a text column: ``text=COL`` makes the kind multinomial (gaussian is
    refused); ``max_features`` and ``lowercase`` mean something only with it."""
    col = out["text"]
    if col is None:
        extra = sorted({"max_features", "lowercase"} & set(given))
        if extra:
            raise ConfigError(f"naive-bayes parameter {', '.join(extra)} needs text=COLUMN (a text column to count words in)")
        return
    if not isinstance(col, str) or not col:
        raise ConfigError(f"parameter text must name a column, not {col!r}")
    if given.get("kind", "multinomial") != "multinomial":
        raise ConfigError("naive Bayes over a text column counts words: its kind is multinomial, not "
                          f"{given['kind']!r}")
    out["kind"] = "multinomial"
    if not isinstance(out["lowercase"], bool):
        raise ConfigError(f"parameter lowercase must be true or false, not {out['lowercase']!r}")


# ---------------------------------------------------------------- merging partials


def moments(Z: np.ndarray, *, full: bool = False) -> dict[str, Any]:
    """Count, mean and centred second moments of the rows of ``Z`` (a mergeable leaf)."""
    n = Z.shape[0]
    mean = Z.mean(axis=0) if n else np.zeros(Z.shape[1])
    C = Z - mean
    m2 = C.T @ C if full else (C * C).sum(axis=0)
    return {"__m__": 1, "n": float(n), "mean": mean, "m2": m2}


def _merge_moments(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Chan et al.'s pairwise update, vectorised: scalar or per-group counts, full or diagonal."""
    na, nb = np.asarray(a["n"], dtype=float), np.asarray(b["n"], dtype=float)
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):
        wb = np.where(n > 0, nb / n, 0.0)
        f = np.where(n > 0, na * nb / n, 0.0)
    delta = b["mean"] - a["mean"]
    mean = a["mean"] + delta * wb[..., None]
    if np.ndim(a["m2"]) == np.ndim(a["mean"]) + 1:
        m2 = a["m2"] + b["m2"] + f[..., None, None] * delta[..., :, None] * delta[..., None, :]
    else:
        m2 = a["m2"] + b["m2"] + f[..., None] * delta * delta
    count: Any = float(n) if np.ndim(n) == 0 else n
    return {"__m__": 1, "n": count, "mean": mean, "m2": m2}


def merge(a: Any, b: Any) -> Any:
    """Two partials as one: numbers and arrays add, dicts merge key-wise, moment leaves
    (``{"__m__": 1, ...}``) by Chan's update, word counts (``{"__w__": 1, ...}``) by the
    union of their words, strings and None must agree."""
    if isinstance(a, dict):
        if a.get("__m__"):
            return _merge_moments(a, b)
        if a.get("__w__"):
            return text.merge_words(a, b)
        keys = list(a) + [k for k in b if k not in a]
        return {k: merge(a[k], b[k]) if k in a and k in b else (a[k] if k in a else b[k])
                for k in keys}
    if a is None or isinstance(a, str):
        if a != b:
            raise ValueError(f"partials disagree: {a!r} != {b!r}")
        return a
    return a + b


# ---------------------------------------------------------------- start / partial / update


def start(algorithm: str, params: dict[str, Any], layout: dict[str, Any],
          scan: dict[str, Any]) -> dict[str, Any]:
    """The model state after the scan round (plain data)."""
    params = check_params(algorithm, params)
    d = len(layout["features"])
    model: dict[str, Any] = {"algorithm": algorithm, "params": params, "layout": layout,
                             "round": 0, "rows": 0, "dropped": 0, "loss": None, "state": {}}
    if algorithm == "logistic":
        K = len(layout["classes"])
        size = (d + 1) if K == 2 else K * (d + 1)
        model["state"] = {"theta": [0.0] * size, "step": None, "ts": [1.0], "best": None, "halvings": 0}
    elif algorithm == "kmeans":
        centers = _kmeans_init(params, layout, scan)
        model["state"] = {"centers": centers, "init": centers, "tol_abs": None, "last": False}
    elif algorithm == "naive-bayes" and params["kind"] == "multinomial":
        for c in layout["columns"]:
            if c["kind"] == "numeric" and (scan["columns"][c["name"]]["min"] or 0.0) < 0:
                raise InputError(f"multinomial naive Bayes needs non-negative counts; column "
                                 f"{c['name']!r} has {scan['columns'][c['name']]['min']}")
    return model


def partial(model: dict[str, Any], X: np.ndarray, y: np.ndarray | None, *,
            dropped: int = 0) -> dict[str, Any]:
    """One chunk's statistics for the model's current round (``dropped``: rows encode skipped)."""
    alg = model["algorithm"]
    X = np.asarray(X, dtype=np.float64)
    out: dict[str, Any] = {"n": int(X.shape[0]), "dropped": int(dropped)}
    if alg == "linear":
        out["xy"] = moments(np.column_stack([X, np.asarray(y, dtype=float)]), full=True)
    elif alg == "logistic":
        out.update(_logistic_partial(model, X, np.asarray(y)))
    elif alg == "naive-bayes":
        out.update(_nb_partial(model, X, np.asarray(y)))
    else:
        out.update(_kmeans_partial(model, X))
    return out


def update(model: dict[str, Any], total: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The master's step: the next model and whether training is done."""
    if total["n"] == 0:
        raise InputError(f"no rows left to train on ({total['dropped']} dropped for missing values)")
    model = dict(model, round=model["round"] + 1, rows=total["n"], dropped=total["dropped"])
    alg = model["algorithm"]
    if alg == "linear":
        return _linear_update(model, total), True
    if alg == "logistic":
        return _logistic_update(model, total)
    if alg == "naive-bayes":
        return _nb_update(model, total), True
    return _kmeans_update(model, total)


# ---------------------------------------------------------------- linear


def _linear_update(model: dict[str, Any], total: dict[str, Any]) -> dict[str, Any]:
    m = total["xy"]
    n, mean, S = float(m["n"]), m["mean"], m["m2"]
    d = len(mean) - 1
    A = S[:d, :d] + model["params"]["alpha"] * np.eye(d)
    w = np.linalg.lstsq(A, S[:d, d], rcond=None)[0]
    b = mean[d] - mean[:d] @ w
    sse = S[d, d] - 2 * w @ S[:d, d] + w @ S[:d, :d] @ w
    state = {"coef": [w.tolist()], "intercept": [float(b)]}
    return dict(model, state=state, loss=max(float(sse), 0.0) / n)


# ---------------------------------------------------------------- logistic


def _split(model: dict[str, Any]) -> tuple[int, int]:
    return len(model["layout"]["classes"]), len(model["layout"]["features"])


_TRY = (1.0, 2.0, 4.0, 8.0)  # multiples of the Newton step a round tries (a longer one when it is better)


def _points(model: dict[str, Any]) -> np.ndarray:
    """The points a logistic round evaluates: ``base + t * step`` for each ``t`` of ``ts``."""
    st = model["state"]
    base, step = np.asarray(st["theta"]), np.asarray(st["step"] or np.zeros(len(st["theta"])))
    return np.array([base + t * step for t in st["ts"]])


def _logistic_partial(model: dict[str, Any], X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The summed log loss and its gradient at each of the round's points, the Hessian at
    the first; over blocks of rows (bounded memory)."""
    K, d = _split(model)
    points = _points(model)
    block = max(1, _BLOCK // (points.shape[1] if K > 2 else d + 1))
    out: dict[str, Any] = {}
    for i in range(0, max(len(X), 1), block):
        part = _logistic_block(K, d, points, X[i:i + block], y[i:i + block])
        out = merge(out, part) if out else part
    return out


def _logistic_block(K: int, d: int, points: np.ndarray, X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    Xa = np.column_stack([X, np.ones(len(X))])
    if K == 2:  # every point at once: one product for the margins, one for the gradients
        Z = Xa @ points.T
        L = np.logaddexp(0.0, Z)  # log(1 + e^z)
        P = np.exp(Z - L)  # the sigmoid
        B = Xa * np.sqrt(P[:, 0] * (1 - P[:, 0]))[:, None]
        return {"loss": (L - y[:, None] * Z).sum(axis=0), "grad": (P - y[:, None]).T @ Xa, "hess": B.T @ B}
    losses, grads = [], []
    hess = np.zeros(0)
    for k, theta in enumerate(points):
        W = theta.reshape(K, d + 1)
        Z = Xa @ W.T
        lse = np.logaddexp.reduce(Z, axis=1) if len(Z) else np.zeros(0)
        P = np.exp(Z - lse[:, None])
        Y = np.zeros_like(P)
        Y[np.arange(len(y)), y] = 1.0
        losses.append(float(np.sum(lse - Z[np.arange(len(y)), y])))
        grads.append(((P - Y).T @ Xa).ravel())
        if k == 0:
            M = (P[:, :, None] * Xa[:, None, :]).reshape(len(Xa), -1)
            hess = -(M.T @ M)
            for c in range(K):
                s = slice(c * (d + 1), (c + 1) * (d + 1))
                hess[s, s] += (Xa * P[:, c:c + 1]).T @ Xa
    return {"loss": np.array(losses), "grad": np.array(grads), "hess": hess}


def _penalty_mask(model: dict[str, Any]) -> np.ndarray:
    K, d = _split(model)
    row = np.r_[np.ones(d), 0.0]
    return row if K == 2 else np.tile(row, K)


def _logistic_update(model: dict[str, Any], total: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Accept the round's best point if it lowers the objective (else halve the step and try
    again), then take the Newton step from it (with the Hessian of the round's first point:
    the best one, but when a longer step did better) and try its multiples :data:`_TRY`."""
    p, st = model["params"], dict(model["state"])
    n, C, mask = total["n"], p["C"], _penalty_mask(model)
    points = _points(model)
    f = C * np.asarray(total["loss"]) + 0.5 * np.sum(mask * points * points, axis=1)
    noise = 1e-12 * max(1.0, abs(float(f[0])))  # (sums in another order differ by rounding only)
    i = 0
    for k in range(1, len(f)):  # a longer step only when it is clearly better
        if f[k] < f[i] - noise:
            i = k
    best = st["best"]
    if best is not None and f[i] > best["f"] + noise:
        st["halvings"] += 1
        st["ts"] = [min(st["ts"]) / 2 ** k for k in (1, 2, 3)]
        stuck = st["halvings"] > _MAX_HALVINGS
        return dict(model, state=st), stuck or model["round"] >= p["max_iter"]
    theta = points[i]
    best = {"theta": theta.tolist(), "f": float(f[i]), "loss": float(total["loss"][i]) / n}
    st.update(best=best, halvings=0)
    model = dict(model, loss=best["loss"])
    g = C * np.asarray(total["grad"])[i] + mask * theta
    H = C * np.asarray(total["hess"]) + np.diag(mask)
    step = -np.linalg.lstsq(H, g, rcond=None)[0]
    # Done when the mean gradient is within tol and the Newton step (the distance to the
    # optimum, near it) moves no weight by more than tol relative to the largest: a flat
    # objective (nearly separable classes) has a small gradient far from its optimum.
    small = float(np.max(np.abs(step))) <= p["tol"] * max(1.0, float(np.max(np.abs(theta))))
    if (float(np.max(np.abs(g))) / n <= p["tol"] and small) or model["round"] >= p["max_iter"]:
        return dict(model, state=st), True
    st.update(theta=theta.tolist(), step=step.tolist(), ts=list(_TRY))
    return dict(model, state=st), False


def _logistic_fit(model: dict[str, Any]) -> dict[str, Any]:
    K, d = _split(model)
    best = model["state"]["best"] or {"theta": model["state"]["theta"]}
    W = np.asarray(best["theta"]).reshape(1 if K == 2 else K, d + 1)
    return {"coef": W[:, :d].tolist(), "intercept": W[:, d].tolist()}


# ---------------------------------------------------------------- naive Bayes


def _nb_partial(model: dict[str, Any], X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    K = len(model["layout"]["classes"])
    Y = np.zeros((len(y), K))
    Y[np.arange(len(y)), y] = 1.0
    if model["params"]["kind"] == "multinomial":
        if X.size and X.min() < 0:
            raise InputError("multinomial naive Bayes needs non-negative features (counts)")
        return {"class_count": Y.sum(axis=0), "feature_count": Y.T @ X}
    d = X.shape[1]
    per = [moments(X[y == k]) for k in range(K)]
    by_class = {"__m__": 1, "n": np.array([m["n"] for m in per]),
                "mean": np.array([m["mean"] for m in per]).reshape(K, d),
                "m2": np.array([m["m2"] for m in per]).reshape(K, d)}
    return {"by_class": by_class, "all": moments(X)}


def _log_prior(count: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(count) - np.log(count.sum())


def _nb_update(model: dict[str, Any], total: dict[str, Any]) -> dict[str, Any]:
    p, n = model["params"], total["n"]
    if p["kind"] == "multinomial":
        cc = total["class_count"]
        if p.get("text") is not None:
            vocab, fc = text.vocabulary(total["words"], p["max_features"])
            model = dict(model, layout=dict(model["layout"], features=vocab))
        else:
            fc = total["feature_count"]
        smoothed = fc + p["alpha"]
        with np.errstate(divide="ignore"):
            flp = np.log(smoothed) - np.log(smoothed.sum(axis=1, keepdims=True))
        prior = _log_prior(cc)
        jll = float(np.sum(cc * np.where(cc > 0, prior, 0.0)) + np.sum(fc * flp))
        state = {"class_count": cc.tolist(), "class_log_prior": prior.tolist(),
                 "feature_log_prob": flp.tolist()}
        return dict(model, state=state, loss=-jll / n)
    bc, al = total["by_class"], total["all"]
    cnt = np.asarray(bc["n"])
    eps = p["var_smoothing"] * float(np.max(al["m2"] / al["n"]))
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(cnt[:, None] > 0, bc["m2"] / cnt[:, None], 0.0) + eps
        prior = _log_prior(cnt)
        ll = cnt * prior - 0.5 * np.sum(cnt[:, None] * np.log(2 * np.pi * var) + bc["m2"] / var, axis=1)
    jll = float(np.sum(np.where(cnt > 0, ll, 0.0)))
    state = {"class_count": cnt.tolist(), "class_log_prior": prior.tolist(),
             "theta": np.asarray(bc["mean"]).tolist(), "var": var.tolist(), "epsilon": eps}
    return dict(model, state=state, loss=-jll / n)


def _nb_jll(mf: dict[str, Any], X: np.ndarray | text.Docs) -> np.ndarray:
    prior = np.asarray(mf["class_log_prior"])
    if mf["params"]["kind"] == "multinomial":
        return X @ np.asarray(mf["feature_log_prob"]).T + prior
    theta, var = np.asarray(mf["theta"]), np.asarray(mf["var"])
    cols = [-0.5 * np.sum(np.log(2 * np.pi * var[k])) - 0.5 * np.sum((X - theta[k]) ** 2 / var[k], axis=1)
            for k in range(len(theta))]
    return np.array(cols).T.reshape(len(X), len(theta)) + prior


# ---------------------------------------------------------------- k-means


def _sample_X(layout: dict[str, Any], scan: dict[str, Any]) -> np.ndarray:
    """The scan's sampled rows encoded, grouped by file (in the order files first appear)."""
    by_name: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for _, line, name, rec in scan.get("sample", []):
        by_name.setdefault(name, []).append((line, rec))
    parts = [np.zeros((0, len(layout["features"])))]
    for name, rows in by_name.items():
        parts.append(table.encode(rows, layout, name, need_target=False)[0])
    return np.concatenate(parts)


def kmeans_pp(X: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ (2 + log k candidates per centre, like sklearn's), seeded."""
    rng = np.random.default_rng(seed)
    n = len(X)
    centers = [X[rng.integers(n)]]
    sq = (X * X).sum(axis=1)
    closest = ((X - centers[0]) ** 2).sum(axis=1)
    trials = 2 + int(np.log(k))
    for _ in range(1, k):
        pot = closest.sum()
        if pot <= 0:
            centers.append(X[rng.integers(n)])
            continue
        ids = np.searchsorted(np.cumsum(closest), rng.random(trials) * pot)
        ids = np.minimum(ids, n - 1)
        dist = np.maximum(sq[ids][:, None] - 2 * X[ids] @ X.T + sq[None, :], 0.0)
        cand = np.minimum(closest[None, :], dist)
        best = int(np.argmin(cand.sum(axis=1)))
        centers.append(X[ids[best]])
        closest = cand[best]
    return np.array(centers)


def _kmeans_init(params: dict[str, Any], layout: dict[str, Any], scan: dict[str, Any]) -> list[list[float]]:
    X = _sample_X(layout, scan)
    k = params["k"]
    if len(X) < k:
        raise InputError(f"k-means with k={k} needs at least {k} sampled rows with all features; "
                         f"the sample has {len(X)} (lower k or sample more rows)")
    return kmeans_pp(X, k, int(params.get("seed", 0))).tolist()


def assign(X: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centre and its squared distance."""
    d2 = (X * X).sum(axis=1)[:, None] - 2 * X @ C.T + (C * C).sum(axis=1)[None, :]
    labels = np.argmin(d2, axis=1) if len(X) else np.zeros(0, dtype=np.int64)
    return labels, ((X - C[labels]) ** 2).sum(axis=1)


def _kmeans_partial(model: dict[str, Any], X: np.ndarray) -> dict[str, Any]:
    C = np.asarray(model["state"]["centers"])
    labels, dist = assign(X, C)
    counts = np.bincount(labels, minlength=len(C)).astype(np.float64)
    sums = np.array([np.bincount(labels, weights=X[:, j], minlength=len(C))
                     for j in range(X.shape[1])]).T.reshape(C.shape)
    out: dict[str, Any] = {"counts": counts, "sums": sums, "inertia": float(dist.sum())}
    if model["state"]["tol_abs"] is None:
        out["all"] = moments(X)
    return out


def _kmeans_update(model: dict[str, Any], total: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    st, p = dict(model["state"]), model["params"]
    model = dict(model, loss=total["inertia"] / total["n"])
    st["inertia"] = total["inertia"]
    if st["last"]:
        return dict(model, state=st), True
    if st["tol_abs"] is None:
        st["tol_abs"] = p["tol"] * float(np.mean(total["all"]["m2"] / total["all"]["n"]))
    C = np.asarray(st["centers"])
    counts = total["counts"]
    new = np.where(counts[:, None] > 0, total["sums"] / np.maximum(counts, 1)[:, None], C)
    shift = float(((new - C) ** 2).sum())
    if shift == 0.0:
        return dict(model, state=st), True
    st["centers"] = new.tolist()
    st["last"] = shift <= st["tol_abs"] or model["round"] >= p["max_iter"]
    return dict(model, state=st), False


# ---------------------------------------------------------------- finish / predict


def finish(model: dict[str, Any]) -> dict[str, Any]:
    """The model file (JSON-able)."""
    alg, layout, st = model["algorithm"], model["layout"], model["state"]
    out: dict[str, Any] = {"format": FORMAT, "algorithm": alg, "features": layout["features"],
                           "layout": layout, "classes": layout["classes"], "params": model["params"],
                           "rows": model["rows"], "dropped": model["dropped"],
                           "rounds": model["round"], "loss": model["loss"]}
    if alg == "linear":
        out.update(coef=st["coef"], intercept=st["intercept"])
    elif alg == "logistic":
        out.update(_logistic_fit(model))
    elif alg == "naive-bayes":
        out.update({k: v for k, v in st.items()})
    else:
        out.update(centers=st["centers"], inertia=st["inertia"], init_centers=st.get("init", st["centers"]))
    return out


def _softmax(Z: np.ndarray) -> np.ndarray:
    Z = Z - Z.max(axis=1, keepdims=True)
    E = np.exp(Z)
    return E / E.sum(axis=1, keepdims=True)


def predict_proba(mf: dict[str, Any], X: np.ndarray | text.Docs) -> np.ndarray:
    """Class probabilities (n, K) of a classifier's model file."""
    if mf["algorithm"] == "naive-bayes":
        return _softmax(_nb_jll(mf, X))
    W, b = np.asarray(mf["coef"]), np.asarray(mf["intercept"])
    Z = X @ W.T + b
    if W.shape[0] == 1:
        p1 = np.exp(-np.logaddexp(0.0, -Z[:, 0]))
        return np.column_stack([1 - p1, p1])
    return _softmax(Z)


def predict(model_file: dict[str, Any], X: np.ndarray | text.Docs) -> list[dict[str, Any]]:
    """Per row ``{"prediction"}``, plus ``probabilities`` (classifiers) or ``cluster`` (k-means)."""
    alg = model_file["algorithm"]
    if not isinstance(X, text.Docs):
        X = np.asarray(X, dtype=np.float64)
    if alg == "linear":
        yhat = X @ np.asarray(model_file["coef"][0]) + model_file["intercept"][0]
        return [{"prediction": v} for v in yhat.tolist()]
    if alg == "kmeans":
        assert not isinstance(X, text.Docs)
        labels, _ = assign(X, np.asarray(model_file["centers"]))
        return [{"prediction": c, "cluster": c} for c in labels.tolist()]
    classes = model_file["classes"]
    P = predict_proba(model_file, X)
    best = np.argmax(P, axis=1).tolist()
    return [{"prediction": classes[i], "probabilities": dict(zip(classes, row))}
            for i, row in zip(best, P.tolist())]

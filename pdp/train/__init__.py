"""Training data over a party: column statistics and models fitted in rounds.

* :mod:`pdp.train.codec`: partial statistics (dicts with numpy arrays) to msgpack and back.
* :mod:`pdp.train.table`: the scan round (which columns are numeric, the categories seen,
  means for imputation, a seeded sample), the feature layout, rows to arrays.
* :mod:`pdp.train.models`: linear, logistic, naive Bayes and k-means as rounds of
  ``partial`` (per chunk, on the workers), ``merge`` (the reduce) and ``update`` (the
  master), and ``predict``.
* :mod:`pdp.train.stats`: ``pdp stats``: exact moments (Chan's merge), KLL quantiles,
  distinct counts and top values, mergeable across chunks.

Everything here is pure and deterministic (no sockets, no clocks): the party's glue is the
built-in job :mod:`pdp.jobs.builtin.train`. This module itself imports nothing (numpy is
loaded only by the tasks that train).
"""

FORMAT = "pdp-model/1"  # the model file's "format"

"""The built-in jobs, each a job class on the job API with its sequential oracle."""

from __future__ import annotations

from pdp.jobs.builtin.chaos import Chaos, SlowTrain
from pdp.jobs.builtin.grep import Grep
from pdp.jobs.builtin.indexer import Indexer
from pdp.jobs.builtin.sort import Sort
from pdp.jobs.builtin.train import Predict, Stats, Train
from pdp.jobs.builtin.wordcount import WordCount

BUILTINS: dict[str, type] = {"wordcount": WordCount, "grep": Grep, "indexer": Indexer, "sort": Sort,
                             "train": Train, "predict": Predict, "stats": Stats}
TEST_ONLY: dict[str, type] = {"chaos": Chaos, "slowtrain": SlowTrain}  # with PDP_TEST_KINDS=1 only

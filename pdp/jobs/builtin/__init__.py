"""The built-in jobs, each a job class on the job API with its sequential oracle."""

from __future__ import annotations

from pdp.jobs.builtin.chaos import Chaos
from pdp.jobs.builtin.wordcount import WordCount

BUILTINS: dict[str, type] = {"wordcount": WordCount}
TEST_ONLY: dict[str, type] = {"chaos": Chaos}  # with PDP_TEST_KINDS=1 only

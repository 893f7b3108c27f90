"""The job API for users: ``from pdp.job import MRJob, MRStep`` (mrjob's names and defaults).

See :mod:`pdp.jobs.api` for what a job may define."""

from pdp.jobs.api import (JSONProtocol, JSONValueProtocol, MRJob, MRStep, RawProtocol, RawValueProtocol,
                          TabProtocol)

__all__ = ["JSONProtocol", "JSONValueProtocol", "MRJob", "MRStep", "RawProtocol", "RawValueProtocol", "TabProtocol"]

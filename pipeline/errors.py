"""`VarrayError`: the base of every expected failure of a job.

Its message is one line that says what went wrong and where (the field, the file, the shard and
sample). Every CLI runs through `pipeline.job_cli.run_job`, which prints that line and exits 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class VarrayError(Exception):
    """An expected failure: bad config, missing or damaged input, unreachable storage, bad data."""


__all__ = ["VarrayError"]

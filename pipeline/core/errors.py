"""`VarrayError`: the base of every expected failure of a job.

Its message is one line that says what went wrong and where (the field, the file, the shard and
sample). Every CLI runs through `pipeline.core.job_cli.run_job`, which prints that line and exits 2; any
other exception is a bug and keeps its traceback. Raised inside a Ray task, actor or Train worker,
the error reaches the driver wrapped, as a traceback's text: `expected_error_in` finds it there.
"""

from __future__ import annotations

import re


class VarrayError(Exception):
    """An expected failure: bad config, missing or damaged input, unreachable storage, bad data."""


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def expected_error_in(exc: BaseException) -> VarrayError | None:
    """The VarrayError inside whatever Ray wrapped it in (RayTaskError, TrainingFailedError, ...): the
    exception itself, a cause in its chain, or the `<Class>: <line>` of one in a wrapped traceback."""
    kinds = {cls.__name__: cls for cls in _subclasses(VarrayError)}
    in_text = re.compile(rf"\b({'|'.join(map(re.escape, kinds))}): ([^\n]+)") if kinds else None
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        text = str(current)
        # A RayTaskError(X) is an X too, but its text is a whole traceback: take the line, not the text.
        if isinstance(current, VarrayError) and "\n" not in text:
            return current
        found = in_text.search(text) if in_text else None
        if found:
            return kinds[found.group(1)](found.group(2).strip())
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None


__all__ = ["VarrayError", "expected_error_in"]

"""Progress of long work, reported by callback.

Why a callback and not a bar here: the library runs in the CLI (a rich bar on a
terminal, nothing when piped), in Ray actors and in tests, and only the caller knows
where progress should go. A phase calls ``progress(stage, done, total)`` after each batch
(``done`` starts at 0 for every stage), so one callback can drive one bar per stage with a
count, a rate and an ETA.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]


def report(progress: ProgressFn | None, stage: str, done: int, total: int) -> None:
    """Call ``progress`` if there is one (the common no-op case stays one line)."""
    if progress is not None:
        progress(stage, done, total)

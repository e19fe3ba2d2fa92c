"""Counting a phase's work for a ``progress(done, total)`` callback (the trainer's phases, the WebUI's bar)."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]


def tally(progress: Progress | None, total: int) -> Callable[[int], None]:
    """Report ``(0, total)`` now and return ``add(k)``, which reports the running count after each piece of ``k``
    (a phase and its ETA clock start before the first piece, not after it).  ``progress`` None: counts silently."""
    done = 0

    def add(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    return add


__all__ = ["Progress", "tally"]

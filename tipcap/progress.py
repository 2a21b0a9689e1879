"""Progress bars that suit a terminal and a log file alike.

On a terminal (or in a notebook) a bar is ``tqdm``'s, redrawn in place as often as it likes. Written to a
file or a pipe, where every redraw stays in the log, a bar redraws only each ``1/LOG_LINES`` of its total
(so about ``LOG_LINES`` states per bar, the last one at completion), or at most once a minute when its
total is unknown; setting its postfix waits for the next redraw instead of forcing one.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as notebook_tqdm
from tqdm.std import tqdm as std_tqdm

LOG_LINES = 20
UNKNOWN_TOTAL_INTERVAL_S = 60.0


class _LogBar(std_tqdm):
    """A bar whose redraws are counted out by ``miniters`` alone (no timer forces one in between)."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    file: IO[str] | None = None,
    **kwargs: Any,
) -> std_tqdm:
    """A ``tqdm`` bar over ``iterable`` (or updated by hand up to ``total``), written to ``file`` (stderr).

    Takes ``tqdm``'s keyword arguments (``desc``, ``unit``, ``disable``, ``initial``, ...); when ``file``
    is not a terminal, ``miniters``, ``mininterval`` and ``maxinterval`` are set to bound its lines.
    """
    stream = sys.stderr if file is None else file
    in_notebook = notebook_tqdm is not std_tqdm
    if kwargs.get("disable") or in_notebook or _is_terminal(stream):
        return tqdm(iterable, total=total, file=file, **kwargs)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if total:
        kwargs.update(miniters=max(1, math.ceil(total / LOG_LINES)), mininterval=0.0)
    else:
        kwargs.update(mininterval=UNKNOWN_TOTAL_INTERVAL_S)
    return _LogBar(iterable, total=total, file=stream, maxinterval=math.inf, **kwargs)

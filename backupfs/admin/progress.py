"""Progress bars for long operations: shown on a terminal, silent in scripts."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def progress_bar(desc: str, total: int | None = None, unit: str = "it", enabled: bool | None = None):
    """A tqdm bar on stderr when it is a terminal (or when told), else a no-op bar."""
    show = sys.stderr.isatty() if enabled is None else enabled
    with tqdm(total=total, desc=desc, unit=unit, disable=not show, leave=False,
              unit_scale=True, file=sys.stderr) as bar:
        yield bar

"""Long index work in the event loop's thread (a big truncate, a snapshot deletion),
done in pieces so that the mount keeps answering.

Each piece is PIECE index entries (~20-30 us each here, so ~25 ms a piece); between
pieces the work pauses for PAUSE, in which the requests that came meanwhile run all
their steps. A request takes several turns of the loop (read it, handle it, reply), and
`trio.sleep(0)` gave it only one turn per piece: with 4,096 entries a piece and no
pause, other requests waited up to 0.34-0.38 s during a snapshot deletion through a
mount; with 1,024 and 2 ms, 0.03-0.04 s, and the deletion took no longer (1.4-1.7 s
against 1.6-1.7 s for 65,535 versions, interleaved runs).
"""

from __future__ import annotations

import trio

PIECE = 1024
PAUSE = 0.002


async def between_pieces() -> None:
    await trio.sleep(PAUSE)

"""Every FUSE handler answers with a FUSEError or a result, never anything else.

In pyfuse3 an exception that is not a FUSEError ends `pyfuse3.main` and leaves the mount
dead ("Transport endpoint is not connected"). `fuse_handler` maps OSError to its errno,
a corrupt block to EIO with a log line, and logs anything unexpected before answering EIO.
"""

from __future__ import annotations

import errno
import functools
import logging

import pyfuse3

from ..errors import CorruptBlock, MissingBlock

log = logging.getLogger("backupfs.fs")


def fuse_handler(fn):
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise fuse_error(fn.__name__, e) from None

    return wrapper


def fuse_error(handler: str, e: BaseException) -> pyfuse3.FUSEError:
    """The FUSEError that answers for `e`, logged as it deserves."""
    # Reads fetch blocks in a nursery: a bad block arrives wrapped in an exception group.
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) >= 1:
        e = e.exceptions[0]
    if isinstance(e, pyfuse3.FUSEError):
        return e
    if isinstance(e, CorruptBlock):
        block = "" if e.file_block is None else f" block {e.file_block}"
        log.error("%s: reading %s%s failed: %s", handler, e.file or "a file", block, e)
        return pyfuse3.FUSEError(errno.EIO)
    if isinstance(e, MissingBlock):
        log.error("%s: index references a missing block: %s", handler, e)
        return pyfuse3.FUSEError(errno.EIO)
    if isinstance(e, OSError) and e.errno is not None:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            log.warning("%s: %s", handler, e)
        return pyfuse3.FUSEError(e.errno)
    log.error("%s: unexpected error, answering EIO", handler, exc_info=e)
    return pyfuse3.FUSEError(errno.EIO)

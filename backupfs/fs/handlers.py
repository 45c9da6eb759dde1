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
        except CorruptBlock as e:
            log.error("%s: read failed: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except MissingBlock as e:
            log.error("%s: index references a missing block: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as e:
            if e.errno is None:
                log.exception("%s: OSError without errno", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                log.warning("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("%s: unexpected error, answering EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper

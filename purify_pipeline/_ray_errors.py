"""A bad row inside a Ray Data UDF, raised so that the user's ``except ShardError`` catches it on the driver.

Ray Data wraps UDF errors in ``UserCodeException("UDF failed to process a data block.")`` unless the dataset's
``DataContext.raise_original_map_exception`` is set; with it set, the driver gets a ``RayTaskError`` that is
also an instance of the raised class. ``RowError`` is both a ``ShardError`` (message naming shard and key,
``.shard``/``.key``) and a ``UserCodeException`` (so Ray Data logs it as a user error, not as an internal one).
"""
from __future__ import annotations

from ray.exceptions import UserCodeException

from purify_pipeline.data._samples import ShardError


class RowError(ShardError, UserCodeException):
    """A ShardError raised by a Ray Data UDF (see the module docstring)."""

    def __reduce__(self):  # keep the class, .shard and .key across Ray's process boundary
        return (_rebuild_row_error, (self.args[0], self.shard, self.key))


def _rebuild_row_error(msg: str, shard: str | None, key: str | None) -> RowError:
    err = RowError.__new__(RowError)
    ValueError.__init__(err, msg)
    err.shard, err.key = shard, key
    return err


def row_error(e: ShardError) -> RowError:
    """`e` as a RowError with the same message, shard and key."""
    return _rebuild_row_error(str(e), e.shard, e.key)

"""Errors raised for bad input, shared by every package of the project.

Every error a user can cause (a missing store, a mismatched map, an unknown name, a bad
range) is a :class:`SatError`. The ``sat`` command turns these into a one-line message and
exit code 2; anything else is a bug and keeps its traceback.
"""


class SatError(Exception):
    """Base class of all user-facing errors. The message is one line and names the problem."""


class StoreNotFoundError(SatError):
    """No store exists at the given location."""


class StoreFormatError(SatError):
    """The location holds something that is not a saliency store of a supported version."""


class MapNotFoundError(SatError, KeyError):
    """The split or map name does not exist in the store."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0]) if self.args else ""


class MismatchError(SatError):
    """A map or split does not match the data it is used with (length, ids, fingerprint)."""


class IncompleteMapError(SatError):
    """A map has chunks that were never written; opened without ``allow_partial``."""


class WriterLockedError(SatError):
    """Another live writer holds the map."""


class ReadOnlyError(SatError):
    """A write was attempted through a read-only handle."""


class CorruptChunkError(SatError):
    """A chunk failed its checksum or could not be decoded."""


class MissingChunkError(CorruptChunkError):
    """A chunk the store records as written has no file (it was deleted or never copied).

    A subclass of :class:`CorruptChunkError`: the data is damaged, and code that refuses
    damaged data refuses this too.
    """

"""Errors that the CLI turns into one readable line and a non-zero exit."""


class MeraError(Exception):
    """A user-facing error: bad input, bad config, missing file. Printed without a traceback."""


class ConfigError(MeraError):
    pass


class DataError(MeraError):
    """A malformed dataset file or media file; the message names the file and the problem."""


class CheckpointError(MeraError):
    pass


class WriteError(MeraError):
    """A file could not be written: the disk is full, a quota is exceeded, an I/O error, a read-only
    or size-limited filesystem. The message names the file and what to do (mera.io builds it);
    ``path`` and ``errno`` say the same for code."""

    def __init__(self, message: str, path: str | None = None, errno: int | None = None):
        super().__init__(message)
        self.path = path
        self.errno = errno

    def __reduce__(self):  # whole across a process boundary (a --workers pool sends it to the parent)
        return type(self), (str(self), self.path, self.errno)


class CheckpointWriteError(WriteError, CheckpointError):
    """A stage checkpoint file could not be written (the stage is not marked done)."""

"""Errors that the CLI turns into one readable line and a non-zero exit."""


class MeraError(Exception):
    """A user-facing error: bad input, bad config, missing file. Printed without a traceback."""


class ConfigError(MeraError):
    pass


class DataError(MeraError):
    """A malformed dataset file or media file; the message names the file and the problem."""


class CheckpointError(MeraError):
    pass

"""Errors a user can fix. The entry point prints them as one paragraph, without a traceback."""


class DdistError(Exception):
    """Base class: the message says what went wrong and which option to change."""


class ConfigError(DdistError):
    """A bad option, a missing data directory or missing weights."""


class CheckpointError(DdistError):
    """An unreadable, corrupt or mismatched checkpoint or artifact."""


class DivergenceError(DdistError):
    """A loss became NaN or infinite; the message names the stage and the iteration."""


class CacheError(CheckpointError):
    """A cache entry that is damaged, or that must be built where the cache cannot be written."""

    what = ""  # a damaged entry: what is wrong with it, without the advice (the rebuild's warning)


class WriteError(DdistError):
    """A file could not be written (a full disk, a quota); nothing partial was left."""

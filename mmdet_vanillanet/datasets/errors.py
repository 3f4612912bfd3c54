"""The errors of the data checks, for users to catch: a broken data config or annotation file, a missing path."""


class DataConfigError(ValueError):
    """A dataset of the config is missing or its annotation file is malformed; the message says which, and the fix."""


class DataNotFoundError(DataConfigError, FileNotFoundError):
    """A data root, image folder or annotation file named by the config does not exist."""

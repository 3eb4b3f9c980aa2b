"""Errors that carry a message meant for the user, not a traceback."""


class LmforgeError(Exception):
    """Base class: the CLI prints these as one clear line and exits non-zero."""


class ConfigError(LmforgeError):
    """A config key is unknown, missing or of the wrong type."""


class DataError(LmforgeError):
    """Input data is missing, empty, corrupt or inconsistent."""


class CheckpointError(LmforgeError):
    """A checkpoint is missing, truncated, corrupt or unsafe."""

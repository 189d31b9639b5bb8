"""Errors that reach the user as one line (the CLI prints them without a traceback)."""


class CllError(Exception):
    """Base class: a user mistake or a missing resource, reported in one line."""


class ConfigError(CllError):
    """A bad run or grid configuration value."""


class DataError(CllError):
    """A data set that is missing, incomplete or malformed."""

"""Errors a user can cause and fix; the entry points print them as one line."""


class RecsysError(Exception):
    """A problem with the user's config or data, with the fix in its message."""


class ConfigError(RecsysError):
    """A config value that is missing, mistyped or out of range."""


class DataError(RecsysError):
    """Data that does not match the configured feature spec."""

"""The one error type the sweeper stops with: Hydra prints its message alone, no traceback."""

from hydra.errors import CompactHydraException


class SweepError(CompactHydraException):
    """A sweep setting or outcome the user must fix; the message names the setting and the fix."""

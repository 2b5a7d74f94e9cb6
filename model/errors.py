"""Errors a user can cause, each carrying one sentence that names the bad value and the fix."""


class ConfigError(ValueError):
    """An invalid model or objective setting (bad value or impossible combination)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""

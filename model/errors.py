"""Errors a user can cause, each carrying one sentence that names the bad value and the fix."""


class ConfigError(ValueError):
    """An invalid model or objective setting (bad value or impossible combination)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint that names a global outside the allowlist of a safe load: loading it
    fully could run code from the file, so it needs the user's explicit trust."""

    def __init__(self, message: str, global_name: str):
        super().__init__(message)
        self.global_name = global_name

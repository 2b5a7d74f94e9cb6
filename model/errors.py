"""Errors a user can cause, each carrying one sentence that names the bad value and the fix.

Every library in the project (``model``, ``sampling``, ``evaluation``, the data code and the
run setup in ``pretrain``) raises a subclass of :class:`UserError` for a mistake a user can
make; the command lines print its message as one line and exit with status 2. Anything else
is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake a user can make and fix: the message is one sentence naming the bad value,
    file or path, and the fix."""


class ConfigError(UserError):
    """An invalid model or objective setting (bad value or impossible combination)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint that names a global outside the allowlist of a safe load: loading it
    fully could run code from the file, so it needs the user's explicit trust."""

    def __init__(self, message: str, global_name: str):
        super().__init__(message)
        self.global_name = global_name

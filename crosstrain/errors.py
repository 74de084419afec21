"""The one exception type for user mistakes.

Anything the user can fix (a bad preset, an unknown key, a missing file, a mesh that does not divide
the devices) raises `UserError`; the CLI prints its message on one line and exits 2. Every other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input. The message names the field or file at fault."""

    exit_code = 2


class ConfigError(UserError):
    """A config field with a wrong type or an impossible value."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field

"""The one exception type for bad user input.

Anything the user can fix (a missing file, a recipe typo, a corrupt image) raises `UserError`; the CLI
prints its message as one line and exits with code 2. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2."""

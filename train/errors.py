"""The one exception type that command-line entry points turn into a one-line error."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): reported in one line, exit code 2."""

    exit_code = 2

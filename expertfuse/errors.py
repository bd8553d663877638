"""The exceptions that command-line entry points turn into a one-line error and an exit code."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): reported in one line, exit code 2."""

    exit_code = 2


class ParityError(UserError):
    """An artifact disagrees with its PyTorch reference beyond the tolerance of its use: exit code 1."""

    exit_code = 1


class NothingMeasured(UserError):
    """A measurement run that measured nothing (every point failed or was refused); its report says why: exit code 1."""

    exit_code = 1

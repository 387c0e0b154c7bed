"""Errors that reach the user as one line and an exit status, never as a traceback."""


class IlrdpoError(Exception):
    """Base class: the CLI prints `error: <message>` and exits with `exit_code`."""

    exit_code = 1


class UserInputError(IlrdpoError):
    """Bad input (file, line, config key): exit status 2."""

    exit_code = 2


class TrainingDiverged(IlrdpoError):
    """A non-finite loss; the last good model on disk is kept."""

    exit_code = 1

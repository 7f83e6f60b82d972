"""Errors the CLI prints as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user (config, files, arguments). The message names the field and the fix."""


class RunError(Exception):
    """A run cannot go on (engine unreachable, stale weights, every request failing). The message says
    what happened and what to check; the run's files written so far are kept."""

"""The project's own error type: the CLI turns it into one line on stderr and exit code 2."""


class DeflectError(Exception):
    """A problem with the user's input or stored data that deflect can name in one line."""

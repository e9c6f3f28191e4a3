"""The one exception type the CLI turns into a single sentence on stderr."""


class MistralError(Exception):
    """An expected failure with a message meant for the user (one sentence, no traceback)."""

    exit_code = 1


class UsageError(MistralError):
    """Bad option values or input: exit status 2, like a command-line usage error."""

    exit_code = 2

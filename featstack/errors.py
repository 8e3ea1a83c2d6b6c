"""The one exception type users see: a one-line message that says what is wrong and what to do."""


class FeatstackError(Exception):
    """A user-facing error; the command-line entry points print it on one line and exit non-zero."""

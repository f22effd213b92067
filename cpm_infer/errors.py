"""The project's error type: the CLI turns it into a one-line message and exit code 1."""


class CpmError(Exception):
    """Any user-facing failure: bad input, missing files, mismatched artifacts."""

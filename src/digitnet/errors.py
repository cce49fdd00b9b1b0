"""The one exception type users see: a short message that says what is wrong and how to fix it."""


class DigitnetError(Exception):
    """A user-facing error: bad config, missing/corrupt data, bad checkpoint.

    Entry points print ``str(err)`` without a traceback and exit with status 2.
    """

"""The one exception type users see: a short message that says what is wrong and how to fix it."""


class DigitnetError(Exception):
    """A user-facing error: bad config, missing/corrupt data, bad checkpoint.

    Entry points print ``str(err)`` without a traceback and exit with status 2.
    """


def check_number(key: str, value: object, ok, valid: str) -> float:
    """Config value `key` must be a number for which `ok` holds (`valid` says which), else a DigitnetError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise DigitnetError(f"{key}={value} must be {valid}")
    return float(value)

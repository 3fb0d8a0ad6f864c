"""User-facing errors. The CLI prints their message (no traceback) and exits non-zero."""


class LayerflowError(Exception):
    """A problem with the user's input or environment, explained in the message.

    Messages name the bad value and what would be valid instead.
    """


def did_you_mean(value: str, valid: list[str]) -> str:
    """'Valid: a, b, c' plus the closest match when there is one."""
    import difflib

    close = difflib.get_close_matches(value, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"Valid: {', '.join(valid)}.{hint}"

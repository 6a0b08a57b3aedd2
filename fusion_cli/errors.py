"""User-facing errors: one line that says what is wrong and what to do; the CLI exits 2."""


class FusionError(Exception):
    """Bad input or usage. The message is shown to the user as is, without a traceback."""

"""Errors a user can fix. The CLI prints them as one line, without a traceback."""


class UserError(ValueError):
    """Bad input or configuration; the message says what to change."""


class ContextTooLongError(UserError):
    """The context does not fit the window at this k."""


class IncompatiblePluginError(UserError):
    """A plug-in was trained for a different base LLM."""

"""The one exception type users see: a clear, one-line message, no traceback in the CLI."""


class LlmcadError(Exception):
    """A problem with the user's input or environment (a file, a model, a setting)."""

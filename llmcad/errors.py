"""The one exception type users see: a clear, one-line message, no traceback in the CLI."""


class LlmcadError(Exception):
    """A problem with the user's input or environment (a file, a model, a setting)."""


class BudgetTooSmall(LlmcadError):
    """The memory budget cannot hold even a fully streamed target; `minimum` (bytes) could."""

    def __init__(self, message: str, minimum: int):
        super().__init__(message)
        self.minimum = minimum

"""The one exception type users see: a clear, one-line message naming the file and the fix."""


class InpformerError(Exception):
    """A problem with the user's input (file, folder, option, checkpoint), not a bug.

    The CLI prints ``str(error)`` on one line and exits with status 2; the message must name
    the offending file or option and say how to fix it.
    """


class TrainingStopped(Exception):
    """Training stopped at a SIGINT or SIGTERM after its current step, having saved the state it resumes from.

    ``str(error)`` says how to resume; the CLI prints it on one line and exits with 128 + ``signal``, as shells do.
    """

    def __init__(self, message: str, signal: int):
        super().__init__(message)
        self.signal = signal


def first_line(error: BaseException) -> str:
    """`error`'s message cut to one short line (or its type when it has none), for wrapping in an InpformerError."""
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__

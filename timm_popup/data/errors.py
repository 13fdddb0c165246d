"""The data package's errors: a dataset problem the user can fix, and an image that cannot be read; one line each."""

from __future__ import annotations

__all__ = ["DataError", "UnreadableImageError", "one_line"]

class DataError(ValueError):
    """A dataset problem the user can fix (bad id/path, split or column); the message is one line."""

    def __init__(self, message: str) -> None:
        # datasets' own messages span lines; the CLI prints ours as a single line.
        super().__init__(" ".join(str(message).split()))


class UnreadableImageError(DataError):
    """An image of the dataset cannot be decoded (a truncated or corrupt file); the message names it."""

    def __init__(self, message: str) -> None:
        # An exception raised in a DataLoader worker reaches the main process re-built from the worker's traceback
        # text (torch's ExceptionWrapper.reraise calls type(text) with "Caught ... Original Traceback ...
        # <module>.UnreadableImageError: <message>"): keep only the original message.
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1]
        super().__init__(message)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

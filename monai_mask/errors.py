"""Project errors: every user-facing failure names the file (or object) and the reason."""

from __future__ import annotations

from os import PathLike

__all__ = ["MonaiMaskError", "InputError", "CheckpointError", "ConfigError"]


class MonaiMaskError(Exception):
    """Base class of all errors raised deliberately by monai-mask."""


class InputError(MonaiMaskError):
    """Bad input data: the message is ``"<path>: <reason>"`` on one line.

    Args:
        path: the offending file or folder (or a short description of the object).
        reason: why it is rejected, one line, no patient identifiers.
    """

    def __init__(self, path: str | PathLike | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}" if self.path else self.reason)


class CheckpointError(InputError):
    """A checkpoint cannot be loaded safely or does not match the network."""


class ConfigError(MonaiMaskError):
    """Invalid configuration or arguments."""

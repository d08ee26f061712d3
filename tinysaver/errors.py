"""tinysaver's one error family.

Every error that means "the input, the options or the files are wrong" is a ``TinysaverError``, so
the command line catches that family alone and prints its one-line message; any other exception is a
bug and is shown as one. Each class also derives from the builtin a Python caller would expect
(``ValueError``, ``ImportError``, ``LookupError``), so ``except ValueError`` keeps working.
"""
from __future__ import annotations


class TinysaverError(Exception):
    """Base of every error raised for bad input; its message is one sentence naming the fix."""


class UsageError(TinysaverError, ValueError):
    """An option, or a combination of options, that cannot work."""


class ZooError(TinysaverError, ValueError):
    """A zoo on disk is missing, incomplete or malformed (the message names the file and field)."""


class DatasetError(TinysaverError, ValueError):
    """A dataset or image source that cannot be read."""


class ImageError(DatasetError):
    """One image that cannot be used; the message is a plain sentence about the file, never a decoder's repr."""


class PixelCapError(ImageError):
    """An image with more pixels than the cap (``--max-pixels``); refused from its header alone."""


class SelectionError(TinysaverError, ValueError):
    """A selection (savers and thresholds) that is inconsistent or cannot be met."""


class CascadeError(TinysaverError, ValueError):
    """A cascade that cannot be built or run as asked."""


class BackendError(TinysaverError, ValueError):
    """A runtime backend that is unknown, not installed, or cannot run this model."""


class ModelNotFoundError(TinysaverError, ValueError):
    """A model name no registry knows."""


class CheckpointError(TinysaverError, ValueError):
    """A weights or ESN checkpoint that cannot be used."""


class ServeError(TinysaverError, ValueError):
    """A service that cannot be configured or started as asked."""


class DeviceError(TinysaverError, RuntimeError):
    """A device (a GPU, say) that was asked for and is not there."""


class MissingExtraError(TinysaverError, ImportError):
    """An optional dependency is not installed; the message gives the pip command."""


class NotFoundError(TinysaverError, KeyError):
    """A name that is not in a table or index (the message lists what is)."""

    def __str__(self) -> str:  # KeyError's own str() would print the message in quotes
        return str(self.args[0]) if self.args else ""


class MissingFileError(TinysaverError, FileNotFoundError):
    """A file the user named does not exist."""


__all__ = ["TinysaverError", "UsageError", "ZooError", "DatasetError", "ImageError", "PixelCapError", "SelectionError", "CascadeError",
           "BackendError", "ModelNotFoundError", "CheckpointError", "ServeError", "DeviceError", "MissingExtraError",
           "NotFoundError", "MissingFileError"]

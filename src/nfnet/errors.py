"""The error types every layer raises; the command line turns each into one line.

A config error is not a checkpoint's business: lower layers say what is wrong with a file, an
input or the training itself in their own terms, and the app layer names the config key.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message is the one line shown to the user."""


class InputError(ValueError):
    """An input the user pointed at (an image, a folder, a camera, a weights file) that cannot
    be used; the message is one line naming it and what to do."""


class TrainingStopped(RuntimeError):
    """The run was stopped on purpose; the message says why and what was kept."""


class NonFiniteCheckpointError(TrainingStopped):
    """A checkpoint would have held NaN or Inf; it was not written."""


class CheckpointWriteError(TrainingStopped):
    """A checkpoint could not be written (the disk is full); the file it would have replaced is kept."""


class FolderInUse(InputError):
    """Another live process holds the lock of a run folder this run would write."""

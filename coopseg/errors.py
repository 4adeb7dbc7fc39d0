"""The exceptions coopseg raises for bad user input (the bottom of the import graph).

Each is a ValueError whose message names the file, config key or value at fault; the
command line (coopseg.cli) prints it as the one line ``coopseg: error: <message>`` and
exits with status 2. Nothing here imports anything.
"""


class CoopsegError(ValueError):
    """Base class of coopseg's user errors."""


class ConfigError(CoopsegError):
    """A config key or setting with a bad value; the message names the key and the expected value."""


class VolumeError(CoopsegError):
    """A problem with a file of a manifest; the message names the file."""


class CheckpointError(CoopsegError):
    """A file that is not a usable coopseg checkpoint (or one written for another run); the message names it."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A weights or checkpoint file that does not exist (also a FileNotFoundError); the message names it."""

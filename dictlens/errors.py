"""User-facing errors.

Every mistake a user can make (a missing file, a bad hook name, a corrupt shard) raises a
subclass of :class:`DictlensError` with a one-line message that names what is wrong. The
CLI prints that line and exits non-zero; unexpected failures still show a traceback.
"""

from __future__ import annotations


class DictlensError(Exception):
    """An expected mistake in the user's input; the message is shown as is."""


class ConfigError(DictlensError):
    """A configuration field is unknown, missing or has an invalid value."""


class InputError(DictlensError):
    """A file, corpus or model given by the user cannot be used."""


class HookError(DictlensError):
    """A hook point does not exist on the model."""


class CacheError(DictlensError):
    """An activation cache is corrupt, incomplete, or does not match the request."""


class CheckpointError(DictlensError):
    """A saved dictionary or training checkpoint is missing, damaged, or not what its config says."""


class CheckpointMismatch(CheckpointError):
    """A training checkpoint holds another run (other SAE or settings): resuming it is refused."""


class AnalysisError(DictlensError):
    """A feature database or code store is missing or damaged."""


class ActivationError(DictlensError):
    """Activations contain NaN or Inf values."""


class FormatError(CheckpointError):
    """A foreign dictionary file is of an unknown layout, or holds what dictlens cannot express."""

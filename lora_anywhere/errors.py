"""Errors a user can fix. Each message says what was wrong and how to fix it."""


class LoraError(ValueError):
    """Base class of every error lora_anywhere raises on bad input."""


class TargetError(LoraError):
    """`targets`, `exclude` or `trainable` matched nothing, or named something unknown."""


class RankError(LoraError):
    """A rank is not a positive integer, or is larger than a layer's full rank."""


class AlreadyAdaptedError(LoraError):
    """The model already carries an adapter of that name."""


class NotAdaptedError(LoraError):
    """An operation needs an adapter that the model does not carry."""


class LazyLayerError(LoraError):
    """A lazy layer has no weights yet, so there is nothing to adapt."""


class AdapterFileError(LoraError):
    """An adapter file or folder is missing, corrupt or of another format."""


class ShapeMismatchError(LoraError):
    """A saved adapter does not fit the model it is loaded onto."""

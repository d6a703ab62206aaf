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


class ShapeMismatchError(AdapterFileError):
    """A saved adapter does not fit the model it is loaded onto (another architecture
    or sizes); an `AdapterFileError` like every refusal of an adapter folder."""


class ExportError(LoraError):
    """An adapter cannot be written in the requested format exactly (some layers have no exact equivalent there)."""


class ShardingError(LoraError):
    """An operation needs whole tensors but the model is sharded (FSDP2), or a sharded save failed."""


class PluginError(LoraError):
    """A plugin cannot be registered or unregistered as asked."""


class TaskError(LoraError):
    """A task name is unknown, or the data cannot be split as the task needs."""


class ConfigError(LoraError):
    """A config file, a trainer option or a command-line model description cannot be used as it is."""


class DataSpecError(ConfigError):
    """The [data] section of a config, or the files it points at, cannot be used."""


class DemoError(LoraError):
    """A domain's exactness check failed, or the demo was asked for something it lacks."""


class NonFiniteLossError(LoraError, FloatingPointError):
    """The loss became NaN or infinite; training stopped before the bad step was taken."""


class ResumeError(ConfigError):
    """A checkpoint was written by a run set up otherwise (another optimizer, other
    parameter groups); resuming it would mix the two."""

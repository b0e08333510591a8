"""The one family of user-facing errors: the CLI prints them as one line and exits 2."""


class SegkitError(Exception):
    """A problem with the user's input, files or settings; the message names the fix."""


class ConfigError(SegkitError):
    """A recipe or override that does not match the schema."""


class InputError(SegkitError):
    """An input file that cannot be read, or holds data segkit cannot segment."""


class TileSizeError(SegkitError):
    """A tile size the model cannot take."""


class CheckpointError(SegkitError):
    """A checkpoint that is missing, corrupt or of another kind of model."""


class OutputExistsError(SegkitError):
    """The output path exists and overwriting it was not asked for."""


class OutputError(SegkitError):
    """An output that cannot be written: the input itself, a name or kind segkit does not write,
    a folder that is missing or read-only, a full disk."""


class MissingDependencyError(SegkitError):
    """An optional package is needed for this feature."""


class Cancelled(SegkitError):
    """A prediction stopped because its cancel event was set (between tile batches); nothing is kept."""

    def __init__(self, message: str = "prediction cancelled") -> None:
        super().__init__(message)


class OptionTypeError(SegkitError, TypeError):
    """A prediction option of the wrong type (the Python API: `batch="4"`); a TypeError too."""


class OptionValueError(SegkitError, ValueError):
    """A prediction option out of its range (`batch=0`, `tile=380.7`); a ValueError too."""

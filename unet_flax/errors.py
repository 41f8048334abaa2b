"""The errors a user's mistake raises, each printed by the commands as one line naming what to fix.

The commands map them to exit codes (cli.run_command): ConfigError and UsageError exit 2 (a bad value
or combination of flags); DataError, TrainingError, SaveError and ConversionError exit 1 (data, a run or
files that cannot be used). Anything else is a fault of the program and keeps its traceback.
"""


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the value."""


class UsageError(ValueError):
    """A bad flag or flag combination: one line on stderr, exit code 2."""


class DataError(ValueError):
    """The data cannot be used; the message names the file or value."""


class ConversionError(ValueError):
    """Weights that do not fit the model: the message names the file, or the key and both shapes."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, unusable workdir, no checkpoint restores): exit code 1."""


class SaveError(RuntimeError):
    """The file system refused a checkpoint write: the run stops, exit code 1."""

"""The one family of user-facing errors: caught at the CLI boundary, printed as one line, exit code 2."""


class IronCoreError(Exception):
    """A problem with the user's input (config, data, checkpoint), not a bug in IronCore."""


class ConfigError(IronCoreError):
    """The config names an unknown field, a wrong type or value, or settings that contradict each other."""


class DataError(IronCoreError):
    """A dataset, column, row or tokenizer is missing or malformed."""


class CheckpointError(IronCoreError):
    """A checkpoint or pretrained directory is missing, incomplete or does not match the config."""

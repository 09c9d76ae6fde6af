"""Project exceptions.

Every error a user can cause (a bad file, a bad argument, a bad tensor) is raised as a
`TuluError` whose message names what was wrong and where. The CLI prints these without a
traceback and exits non-zero; anything else is a bug and keeps its traceback.
"""


class TuluError(Exception):
    """Base class for errors caused by the user's input."""


class ConfigError(TuluError):
    """A model config (config.json or preset) is missing, malformed or unsupported."""


class CheckpointError(TuluError):
    """A checkpoint directory or file is missing, corrupt, or does not match the config."""


class TokenizerError(TuluError):
    """Tokenizer files are missing or inconsistent."""


class ChatFormatError(TuluError):
    """A conversation cannot be rendered in the Tulu chat format."""


class GenerationError(TuluError):
    """A generation request is invalid (bad sampling value, prompt too long, ...)."""


class DataError(TuluError):
    """Instruction data is malformed, or a data recipe or setting is invalid."""

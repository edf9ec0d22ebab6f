"""Errors a user can cause. Each message names the file, field or value at fault."""


class Gemma3nError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ConfigError(Gemma3nError):
    """config.json is missing, malformed or inconsistent."""


class CheckpointError(Gemma3nError):
    """Weights are missing, corrupt, of the wrong shape, or cannot be downloaded."""


class InputError(Gemma3nError):
    """A prompt, audio clip, image or option that cannot be used as given."""

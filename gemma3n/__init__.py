"""gemma3n: run Google's Gemma 3n on-device models the way they were designed to run.

import gemma3n
model = gemma3n.load("google/gemma-3n-E2B-it")     # or a local directory; None = tiny default
print(model.generate(messages=[{"role": "user", "content": "Hi!"}]).text)
"""

from .cache import PromptCache
from .errors import CheckpointError, ConfigError, Gemma3nError, InputError
from .model import Model, load

__all__ = ["load", "Model", "PromptCache", "Gemma3nError", "ConfigError", "CheckpointError", "InputError"]
__version__ = "0.1.0"

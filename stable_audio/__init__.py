"""Stable Audio Open in MLX. The package's face: what users import, from where it
lives."""

from .audio import resample
from .batch import generate_many
from .model_io import DEFAULT_REPO, Config, load, load_config
from .pipeline import Conditioning, StableAudio, check_finite, limit_memory
from .settings import DEFAULTS, ArgumentError, Settings

__all__ = [
    "ArgumentError",
    "Conditioning",
    "Config",
    "DEFAULTS",
    "DEFAULT_REPO",
    "Settings",
    "StableAudio",
    "check_finite",
    "generate_many",
    "limit_memory",
    "load",
    "load_config",
    "resample",
]

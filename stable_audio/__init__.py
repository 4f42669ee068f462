"""Stable Audio Open in MLX. The package's face: what users import, from where it lives."""

from .audio import resample
from .model_io import DEFAULT_REPO, Config, load, load_config
from .pipeline import DEFAULTS, ArgumentError, Conditioning, StableAudio, check_arguments, check_finite, check_lora, limit_memory, settings

__all__ = [
    "ArgumentError", "DEFAULTS", "DEFAULT_REPO", "Conditioning", "Config", "StableAudio", "check_arguments", "check_lora",
    "check_finite", "limit_memory", "load", "load_config", "resample", "settings",
]

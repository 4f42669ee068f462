from .model_io import DEFAULT_REPO, load

"""Finding a checkpoint: a local folder, or a Hub repo downloaded to the cache (only the
files we read), checked to hold every file of its layout; every Hub failure said in one
sentence that tells what to do."""

import re
from pathlib import Path

DEFAULT_REPO = "stabilityai/stable-audio-open-1.0"
PICKLED = (  # read only when asked (convert.py --allow-pickle): unpickling can run code
    "model.ckpt"
)

# The files of the released Hub repo that we read (it also holds model.ckpt and
# diffusers folders)
RELEASED_FILES = {
    "config": "model_config.json",
    "weights": "model.safetensors",
    "t5_config": "text_encoder/config.json",
    "t5_weights": "text_encoder/model.safetensors",
    "tokenizer": "tokenizer/spiece.model",
}
# The files convert.py writes: one safetensors file per component
COMPONENTS = ("t5", "conditioner", "dit", "vae")
CONVERTED_FILES = ["config.json", "spiece.model"] + [
    f"{c}.safetensors" for c in COMPONENTS
]


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and not (
        folder / "model_config.json"
    ).is_file()


LOCAL_COPY = (
    "or download the folder elsewhere and pass its path instead (convert.py --hf-path,"
    " txt2audio.py --model)"
)


def _transport_errors() -> tuple:
    """The HTTP library's own failures (a dropped connection, say): requests' are
    OSErrors (huggingface_hub 0.x); httpx's, under huggingface_hub 1.x and 2.x, are
    not."""
    errors = [OSError]
    for module in ("httpx", "httpx2"):
        try:
            errors.append(__import__(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _download(repo: str, patterns: list) -> Path:
    """snapshot_download, its failures turned into one sentence that says what to do
    (the messages are ours: huggingface_hub's span several lines). Written for
    huggingface_hub 0.36 to 2.x, whose errors differ: LocalEntryNotFoundError (nothing
    cached, and the Hub not reached or failing) is an HfHubHTTPError in 0.x and only an
    OSError since.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    login = "log in with `hf auth login` or set HF_TOKEN"
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except GatedRepoError:
        message = (
            f"{repo} is gated: accept its licence on https://huggingface.co/{repo},"
            f" {login}, {LOCAL_COPY}."
        )
    except RepositoryNotFoundError:
        message = (
            f"{repo} is not on the Hugging Face Hub, or it is private and you are not"
            f" logged in ({login}); check the name, {LOCAL_COPY}."
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:
        # LocalEntryNotFoundError: nothing cached, and the Hub answered with an error
        # (its cause), could not be reached, or downloads are off
        response = e.__cause__ if isinstance(e, LocalEntryNotFoundError) else e
        status = getattr(getattr(response, "response", None), "status_code", None)
        if status in (401, 403):
            message = (
                f"The Hugging Face Hub refused access to {repo} (HTTP {status}): accept"
                f" its licence on https://huggingface.co/{repo}, {login} with a token"
                f" that may read it, {LOCAL_COPY}."
            )
        elif status is not None:
            message = (
                f"The Hugging Face Hub failed to serve {repo} (HTTP {status}); try"
                f" again later, {LOCAL_COPY}."
            )
        elif constants.HF_HUB_OFFLINE:
            message = (
                f"{repo} is not in the local Hugging Face cache and downloads are off"
                f" (HF_HUB_OFFLINE is set): unset it, {LOCAL_COPY}."
            )
        else:
            message = (
                f"{repo} is not in the local Hugging Face cache and the Hub cannot be"
                f" reached: check the connection, {LOCAL_COPY}."
            )
    except (
        _transport_errors()
    ) as e:  # the connection dropped mid-download, the disk is full, ...
        message = (
            f"Downloading {repo} failed ({type(e).__name__}); run again to resume,"
            f" {LOCAL_COPY}."
        )
    raise ValueError(message)


def resolve(
    path_or_repo: str, configs_only: bool = False, allow_pickle: bool = False
) -> Path:
    """A local folder, or a Hub repo id downloaded (only the files we read) to the
    cache; either way checked to hold every file of its layout."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        folder = path
    elif path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_repo)):
        raise ValueError(
            f"{path_or_repo} is neither a model folder nor a Hugging Face repo id."
        )
    else:
        patterns = list(RELEASED_FILES.values()) + CONVERTED_FILES
        if configs_only:
            patterns = [p for p in patterns if p.endswith(".json")]
        folder = _download(path_or_repo, patterns)
        if (
            allow_pickle
            and not configs_only
            and not (folder / RELEASED_FILES["weights"]).is_file()
        ):
            folder = _download(path_or_repo, [PICKLED])
    _check_layout(folder, path_or_repo, configs_only, allow_pickle)
    return folder


def _check_layout(folder: Path, name: str, configs_only: bool, allow_pickle: bool):
    """Refuse a folder that lacks a file of its layout, before anything is read."""
    if is_converted(folder):
        files = list(CONVERTED_FILES)
    elif (folder / RELEASED_FILES["config"]).is_file():
        files = list(RELEASED_FILES.values())
        if allow_pickle and (folder / PICKLED).is_file():
            files.remove(RELEASED_FILES["weights"])
    else:
        raise ValueError(
            f"{name} is not a Stable Audio model: it has neither model_config.json "
            "(the released layout) nor config.json (a folder written by convert.py)."
        )
    missing = [
        f
        for f in files
        if not (folder / f).is_file() and (f.endswith(".json") or not configs_only)
    ]
    if not missing:
        return
    more = f" (and {len(missing) - 1} more of its files)" if len(missing) > 1 else ""
    if missing[0] == RELEASED_FILES["weights"] and (folder / PICKLED).is_file():
        raise ValueError(
            f"{name} has no model.safetensors, only the pickled {PICKLED}, which is not"
            " read by default (unpickling can run code): if you trust it, convert it"
            f" once with `python convert.py --hf-path {name} --allow-pickle` (needs"
            " torch)."
        )
    if folder != Path(name).expanduser():  # a Hub snapshot
        raise ValueError(
            f"{name} lacks {missing[0]}{more}: the repo does not hold it, or it is not"
            " in the local cache and the Hub could not be reached to download it."
        )
    raise ValueError(f"{folder} lacks {missing[0]}{more}: copy or download it again.")

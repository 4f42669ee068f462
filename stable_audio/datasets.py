"""Fine-tuning data: a folder of audio files and their captions, prepared as
stable-audio-tools 0.0.20 prepares its training audio
(stable_audio_tools/data/dataset.py, SampleDataset; docs/reference.md, "Fine-tuning").

Captions come from a same-named .txt beside each file, or from a metadata.jsonl or
metadata.csv in the folder with "file" and "prompt" columns. Each file is read at any
rate, resampled to the model's, and given the model's channels (mono doubled, extra
channels dropped, as 0.0.20's Stereo does); a window is cut from it and zero-padded as
PadCrop_Normalized_T does, with a mask of the valid samples.

Fine-tuning encodes each file once, whole, and keeps its latents' posterior (mean and
standard deviation) in a cache on disk; every step then takes a random window of the
file's latents (a random crop per epoch, as 0.0.20 takes a random crop of the audio) and
a fresh posterior sample of it, as 0.0.20's encoder draws one."""

import csv
import hashlib
import io
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .audio import peak_dbfs, prepare_audio, read_audio
from .model_io import read_safetensors, write_safetensors

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff", ".opus")
SILENCE_DB = -60.0  # 0.0.20 rejects a window whose peak is below this
CACHE_VERSION = "1"  # bump when what the cache holds, or how it is computed, changes


def _read_text(path: Path) -> str:
    """A caption or metadata file's text, UTF-8 (a byte-order mark dropped); one that
    is not is refused by name."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {data[e.start]:#04x} at position"
            f" {e.start}); save it as UTF-8."
        ) from None


def _metadata_captions(folder: Path) -> dict:
    """{file name: caption} from metadata.jsonl or metadata.csv, if the folder has
    one."""
    rows = []
    if (folder / "metadata.jsonl").is_file():
        path = folder / "metadata.jsonl"
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise ValueError(
                        f"{path}, line {number}, is not valid JSON."
                    ) from None
    elif (folder / "metadata.csv").is_file():
        path = folder / "metadata.csv"
        rows = list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
    else:
        return {}
    captions = {}
    for number, row in enumerate(rows, 1):
        if not (
            isinstance(row, dict)
            and isinstance(row.get("file"), str)
            and isinstance(row.get("prompt"), str)
        ):
            raise ValueError(
                f'{path}, row {number}, lacks a "file" and a "prompt" (text).'
            )
        captions[row["file"]] = row["prompt"]
    return captions


def find_clips(folder) -> list:
    """[(audio file, caption)] of a folder (sorted by name), every file captioned."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"The data folder {folder} does not exist.")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
    )
    if not files:
        raise ValueError(
            f"The data folder {folder} holds no audio files"
            f" ({', '.join(AUDIO_SUFFIXES)})."
        )
    listed = _metadata_captions(folder)
    clips = []
    for path in files:
        if path.name in listed:
            caption = listed[path.name]
        elif path.with_suffix(".txt").is_file():
            caption = _read_text(path.with_suffix(".txt")).strip()
        else:
            raise ValueError(
                f"{path} has no caption: add {path.with_suffix('.txt').name} or a row"
                " in metadata.jsonl."
            )
        clips.append((path, caption))
    return clips


def load_clip(path, sample_rate: int, channels: int) -> np.ndarray:
    """A whole file as (channels, n) float32 at `sample_rate`."""
    rate, audio = read_audio(str(path))
    length = math.ceil(
        audio.shape[1] * sample_rate / rate
    )  # the resampler's own length
    return prepare_audio(audio, rate, sample_rate, length, channels)


def pad_crop(
    audio: np.ndarray, window: int, sample_rate: int, offset: int = 0
) -> tuple:
    """PadCrop_Normalized_T: the `window` samples from `offset` (zero-padded at the
    end), the mask of the valid ones, seconds_start (the offset in whole seconds) and
    seconds_total (the whole file's length, rounded up)."""
    n = audio.shape[-1]
    chunk = np.zeros((audio.shape[0], window), dtype=audio.dtype)
    piece = audio[:, offset : offset + window]
    chunk[:, : piece.shape[1]] = piece
    mask = np.zeros(window, dtype=bool)
    mask[: piece.shape[1]] = True
    return chunk, mask, math.floor(offset / sample_rate), math.ceil(n / sample_rate)


def is_silent(audio: np.ndarray) -> bool:
    """0.0.20's test: the window's peak is below -60 dBFS."""
    return peak_dbfs(audio) < SILENCE_DB


def latent_mask(mask: np.ndarray, length: int) -> np.ndarray:
    """A sample mask (..., n) at latent length, as 0.0.20's resize_padding_mask: the
    first ceil(valid * length / n) latents are valid."""
    valid = np.ceil(mask.sum(axis=-1, keepdims=True) * length / mask.shape[-1])
    return np.arange(length) < np.minimum(valid, length)


def block_peaks(audio: np.ndarray, ratio: int, length: int) -> np.ndarray:
    """The peak of each run of `ratio` samples (one latent's worth), over `length`
    latents (zero past the audio's end)."""
    padded = np.zeros((audio.shape[0], length * ratio), dtype=np.float32)
    padded[:, : audio.shape[1]] = np.abs(audio[:, : length * ratio])
    return padded.reshape(audio.shape[0], length, ratio).max(axis=(0, 2))


def crop_starts(peaks: np.ndarray, samples: int, ratio: int, window: int) -> np.ndarray:
    """The latent offsets of the windows a random crop may take: as 0.0.20's random
    crop, anywhere from the start to where the window ends with the file (at whole
    latents, as the file is encoded once), leaving out the silent ones, which 0.0.20
    rejects."""
    last = max(samples - window * ratio, 0) // ratio
    loudest = sliding_window_view(peaks, window)[: last + 1].max(axis=1)
    return np.flatnonzero(loudest >= 10 ** (SILENCE_DB / 20))


class Clip:
    """A file prepared for fine-tuning: the posterior of its latents (for each polarity
    prepared: as recorded, and phase-flipped), its length in samples and latents, and
    the offsets a window may start at."""

    def __init__(
        self,
        path,
        caption: str,
        posteriors: list,
        samples: int,
        peaks: np.ndarray,
        ratio: int,
        window: int,
    ):
        self.path, self.caption, self.posteriors, self.samples = (
            path,
            caption,
            posteriors,
            samples,
        )
        self.latents = math.ceil(samples / ratio)  # the valid (unpadded) latents
        self.starts = crop_starts(peaks, samples, ratio, window // ratio)
        self.unsaved = None  # (cache file, tensors, metadata) not yet written


def _cache_file(cache: Path, path: Path, model_key: str, settings: dict) -> Path:
    stat = path.stat()
    identity = json.dumps(
        [
            CACHE_VERSION,
            str(path.resolve()),
            stat.st_size,
            stat.st_mtime_ns,
            model_key,
            settings,
        ]
    )
    return (
        cache / f"{path.stem[:40]}-{hashlib.sha256(identity.encode()).hexdigest()[:24]}"
        ".safetensors"
    )


def encode_clip(
    vae,
    path,
    caption: str,
    sample_rate: int,
    window: int,
    phase_flip: bool,
    cache: Path = None,
    model_key: str = "",
    chunk: int = 128,
) -> Clip:
    """`path` read at the model's rate and channels, zero-padded to whole latents and at
    least one window, encoded once (`chunk` latents at a time) to its posterior, and
    that kept for `cache` (a folder; None for none; see save_to_cache) under a name made
    of the file's own identity (path, size, time), the model's (`model_key`) and the
    preparation's, so a later run reads it back instead. With `phase_flip`, the flipped
    audio is encoded too.
    """
    config = vae.config
    ratio, dtype = config.downsampling_ratio, vae.encoder.layers[0].weight.dtype
    settings = {
        "rate": sample_rate,
        "channels": config.audio_channels,
        "window": window,
        "dtype": str(dtype),
    }
    names = ["mean", "std"] + (["flipped_mean", "flipped_std"] if phase_flip else [])
    stored = cache and _cache_file(cache, Path(path), model_key, settings)
    if stored and stored.is_file():
        try:
            tensors, metadata = read_safetensors(stored, (mx.float32,), metadata=True)
            posteriors = [
                (tensors[a], tensors[b]) for a, b in zip(names[::2], names[1::2])
            ]
            return Clip(
                path,
                caption,
                posteriors,
                int(metadata["samples"]),
                np.array(tensors["peaks"]),
                ratio,
                window,
            )
        except (ValueError, KeyError, OSError):
            pass  # damaged or older: encode again
    audio = load_clip(path, sample_rate, config.audio_channels)
    length = max(math.ceil(audio.shape[1] / ratio), window // ratio)
    padded = np.zeros((length * ratio, audio.shape[0]), dtype=np.float32)
    padded[: audio.shape[1]] = np.clip(
        audio, -1, 1
    ).T  # 0.0.20 clamps to +-1 before encoding
    posteriors = []
    for sign in (1, -1)[: 1 + phase_flip]:
        mean, std = vae.posterior(mx.array(sign * padded[None]).astype(dtype), chunk)
        posteriors.append((mean[0].astype(mx.float32), std[0].astype(mx.float32)))
    peaks = block_peaks(audio, ratio, length)
    clip = Clip(path, caption, posteriors, audio.shape[1], peaks, ratio, window)
    if stored:  # written by save_to_cache once the whole preparation has succeeded
        tensors = {
            n: a for n, a in zip(names, [x for pair in posteriors for x in pair])
        }
        tensors["peaks"] = mx.array(peaks)
        clip.unsaved = (
            stored,
            tensors,
            {"samples": str(audio.shape[1]), "file": str(path)},
        )
    return clip


def save_to_cache(clips: list) -> str:
    """Write the cache entries encode_clip made for `clips`; returns why not, if it
    could not (a read-only data folder: training goes on without)."""
    for clip in clips:
        if clip.unsaved:
            path, tensors, metadata = clip.unsaved
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_safetensors(path, tensors, metadata)
            except OSError as e:
                return f"{path.parent}: {e.strerror or e}"
            clip.unsaved = None
    return ""

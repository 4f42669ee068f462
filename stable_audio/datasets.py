"""Fine-tuning data: a folder of audio files and their captions, prepared as
stable-audio-tools 0.0.20 prepares its training audio (SAT_0_0_20.md §5 "Data").

Captions come from a same-named .txt beside each file, or from a metadata.jsonl or
metadata.csv in the folder with "file" and "prompt" columns. Each file is read at any
rate, resampled to the model's, and given the model's channels (mono doubled, extra
channels dropped, as 0.0.20's Stereo does); a window is cut from it and zero-padded as
PadCrop_Normalized_T does, with a mask of the valid samples."""

import csv
import json
import math
from pathlib import Path

import numpy as np

from .audio import prepare_audio, read_audio

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff", ".opus")
SILENCE_DB = -60.0  # 0.0.20 rejects a window whose peak is below this


def _metadata_captions(folder: Path) -> dict:
    """{file name: caption} from metadata.jsonl or metadata.csv, if the folder has one."""
    rows = []
    if (folder / "metadata.jsonl").is_file():
        path = folder / "metadata.jsonl"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise ValueError(f"{path}, line {number}, is not valid JSON.") from None
    elif (folder / "metadata.csv").is_file():
        path = folder / "metadata.csv"
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        return {}
    captions = {}
    for number, row in enumerate(rows, 1):
        if not (isinstance(row, dict) and isinstance(row.get("file"), str) and isinstance(row.get("prompt"), str)):
            raise ValueError(f"{path}, row {number}, lacks a \"file\" and a \"prompt\" (text).")
        captions[row["file"]] = row["prompt"]
    return captions


def find_clips(folder) -> list:
    """[(audio file, caption)] of a folder (sorted by name), every file captioned."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"The data folder {folder} does not exist.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"The data folder {folder} holds no audio files ({', '.join(AUDIO_SUFFIXES)}).")
    listed = _metadata_captions(folder)
    clips = []
    for path in files:
        if path.name in listed:
            caption = listed[path.name]
        elif path.with_suffix(".txt").is_file():
            caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        else:
            raise ValueError(f"{path} has no caption: add {path.with_suffix('.txt').name} or a row in metadata.jsonl.")
        clips.append((path, caption))
    return clips


def load_clip(path, sample_rate: int, channels: int) -> np.ndarray:
    """A whole file as (channels, n) float32 at `sample_rate`."""
    rate, audio = read_audio(str(path))
    length = math.ceil(audio.shape[1] * sample_rate / rate)  # the resampler's own length
    return prepare_audio(audio, rate, sample_rate, length, channels)


def pad_crop(audio: np.ndarray, window: int, sample_rate: int, offset: int = 0) -> tuple:
    """PadCrop_Normalized_T: the `window` samples from `offset` (zero-padded at the end),
    the mask of the valid ones, seconds_start (the offset in whole seconds) and
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
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    return peak == 0 or 20 * math.log10(peak) < SILENCE_DB


def latent_mask(mask: np.ndarray, length: int) -> np.ndarray:
    """A sample mask (..., n) at latent length, as 0.0.20's resize_padding_mask: the first
    ceil(valid * length / n) latents are valid."""
    valid = np.ceil(mask.sum(axis=-1, keepdims=True) * length / mask.shape[-1])
    return np.arange(length) < np.minimum(valid, length)

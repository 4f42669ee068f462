"""Audio in and out, as plain functions of numpy arrays (channels, samples): reading and
writing files, resampling, and preparing audio for the autoencoder."""

import math
from pathlib import Path

import numpy as np
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view

from .files import written

# The file types we write, by extension: soundfile's format and its sample encoding
FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}
LEVELS = ("peak", "clamp", "none")


def read_audio(path: str, seconds: float = None) -> tuple:
    """(sample_rate, samples (channels, n)) of a file soundfile reads, opened once (so a
    pipe works); with `seconds`, only the first `seconds` (and a little more) are
    decoded, whatever the file's length."""
    try:
        with sf.SoundFile(path) as f:
            rate = f.samplerate
            frames = math.inf if seconds is None else int(seconds * rate) + rate
            samples = _read_frames(f, frames)
    except (RuntimeError, OSError) as e:  # soundfile's errors are RuntimeErrors
        raise ValueError(f"Cannot read audio from {path!r}: {e}") from None
    if len(samples) == 0:
        raise ValueError(f"{path!r} holds no audio.")
    return rate, samples.T


def _read_frames(f: sf.SoundFile, frames) -> np.ndarray:
    """Up to `frames` frames (channels last), block by block: a pipe's length is not
    known until it ends."""
    blocks, n = [], 0
    while n < frames:
        block = f.read(min(frames - n, 1 << 16), dtype="float32", always_2d=True)
        if not len(block):
            break
        blocks.append(block)
        n += len(block)
    return np.concatenate(blocks) if blocks else np.zeros((0, f.channels), np.float32)


def peak_normalize(audio: np.ndarray) -> np.ndarray:
    """Scaled so that the loudest sample is at full scale, as the official interfaces
    do."""
    return np.clip(audio / max(np.abs(audio).max(), 1e-8), -1, 1)


def peak_dbfs(audio) -> float:
    """The peak level of `audio` in dB of full scale: -inf for silence, nan where it
    holds NaN or Inf."""
    audio = np.asarray(audio)
    if not np.isfinite(audio).all():
        return math.nan
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    return 20 * math.log10(peak) if peak > 0 else -math.inf


def set_level(audio: np.ndarray, level: str = "peak") -> np.ndarray:
    """The output's level: "peak" scales the loudest sample to full scale (as the
    official interfaces did, and ours by default), "clamp" clips to [-1, 1] (0.0.20's
    page), "none" leaves the decoder's output as it is (a float WAV keeps what lies
    beyond +-1; other encodings clip it)."""
    if level == "peak":
        return peak_normalize(audio)
    if level == "clamp":
        return np.clip(audio, -1, 1)
    if level == "none":
        return audio
    raise ValueError(f"Unknown level {level!r}; choose one of {', '.join(LEVELS)}.")


def write_audio(path: Path, audio: np.ndarray, sample_rate: int, subtype: str = None):
    """Write (channels, samples) in the format of `path`'s extension (see FORMATS;
    `subtype` replaces its encoding), appearing only when whole (files.written)."""
    path = Path(path)
    file_format, encoding = FORMATS[path.suffix.lower()]
    if (subtype or encoding) != "FLOAT":
        audio = np.clip(audio, -1, 1)  # integer and MPEG encodings would wrap around
    with written(path) as tmp:
        sf.write(
            tmp, audio.T, sample_rate, subtype=subtype or encoding, format=file_format
        )


def resample(
    audio: np.ndarray, rate: int, new_rate: int, length: int = None
) -> np.ndarray:
    """(channels, samples) at `rate` Hz to `new_rate` Hz by windowed-sinc interpolation,
    the design of torchaudio's Resample that stable-audio-tools uses: a Hann window over
    6 zero crossings, cut off at 0.99 of the lower Nyquist frequency. With `length`,
    only the first `length` output samples are made (and only the input they need is
    read).
    """
    if rate == new_rate:
        return audio[:, :length]
    g = math.gcd(rate, new_rate)
    up, down = new_rate // g, rate // g
    cutoff = min(up, down) * 0.99
    width = math.ceil(6 * down / cutoff)
    if up * (2 * width + down) > 2**24:
        raise ValueError(
            f"Cannot resample {rate} Hz to {new_rate} Hz (their ratio is too fine);"
            " convert the file first."
        )
    # kernel[j, i]: the weight of input sample i (of a frame) in output phase j
    t = (-np.arange(up)[:, None] / up + np.arange(-width, width + down) / down) * cutoff
    t = np.clip(t, -6, 6)
    kernel = (np.sinc(t) * np.cos(t * np.pi / 12) ** 2 * cutoff / down).astype(
        np.float32
    )
    n = math.ceil(audio.shape[1] * up / down)
    n = n if length is None else min(n, length)
    audio = audio[:, : math.ceil(n * down / up) + width + down]
    padded = np.pad(audio.astype(np.float32), [(0, 0), (width, width + down)])
    frames = sliding_window_view(padded, kernel.shape[1], axis=-1)[:, ::down]
    # einsum sums each output in one fixed order, so that `length` gives exactly the
    # first samples of the whole (a BLAS matmul's order may change with the number of
    # rows)
    return np.einsum("cfk,pk->cfp", frames, kernel).reshape(len(audio), -1)[:, :n]


def prepare_audio(
    audio, sample_rate: int, model_rate: int, length: int, channels: int
) -> np.ndarray:
    """Audio (channels, samples) or (samples,) at `sample_rate` made ready for the
    encoder as stable-audio-tools makes init audio ready: resampled to `model_rate`, cut
    or zero-padded at the end to `length` samples, mono doubled to stereo (or extra
    channels dropped, or stereo averaged for a mono model). Returns (channels, length)
    float32.
    """
    audio = np.asarray(audio, dtype=np.float32)
    audio = audio[None] if audio.ndim == 1 else audio
    if audio.ndim != 2 or audio.size == 0:
        raise ValueError(
            "Audio must be (channels, samples) with some samples; got shape"
            f" {audio.shape}."
        )
    if not np.isfinite(audio).all():
        raise ValueError("The audio holds NaN or infinite samples.")
    audio = resample(audio, sample_rate, model_rate, length=length)
    audio = np.pad(audio, [(0, 0), (0, length - audio.shape[1])])
    if channels == 1:
        audio = audio.mean(axis=0, keepdims=True)
    elif len(audio) == 1:
        audio = np.repeat(audio, channels, axis=0)
    return audio[:channels]

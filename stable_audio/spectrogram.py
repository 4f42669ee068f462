"""A picture of a sound: the log-magnitude spectrogram of audio as a PNG, with numpy and
the standard library only (zlib for PNG's compression)."""

import struct
import zlib

import numpy as np

from .files import written

WIDTH, HEIGHT = (
    1024,
    256,
)  # pixels: time left to right, frequency (log scale) bottom to top
FLOOR_DB = -80.0  # the darkest colour, below the loudest bin
# a dark-to-bright palette (black, purple, red, orange, pale yellow), interpolated
PALETTE = np.array(
    [[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]],
    dtype=np.float64,
)


def log_magnitude(
    audio: np.ndarray, sample_rate: int, n_fft: int = 2048, hop: int = 512
) -> tuple:
    """(dB (frames, n_fft / 2 + 1) relative to the loudest bin, bin frequencies in Hz)
    of the channels' mean, by a Hann-windowed STFT."""
    mono = (
        np.asarray(audio, dtype=np.float64)
        .reshape(-1, np.shape(audio)[-1])
        .mean(axis=0)
    )
    mono = np.pad(mono, (n_fft // 2, n_fft // 2 + max(0, n_fft - len(mono))))
    frames = np.lib.stride_tricks.sliding_window_view(mono, n_fft)[::hop] * np.hanning(
        n_fft
    )
    magnitude = np.abs(np.fft.rfft(frames, axis=-1))
    db = 20 * np.log10(np.maximum(magnitude, 1e-10))
    return db - db.max(), np.fft.rfftfreq(n_fft, 1 / sample_rate)


def image(
    audio: np.ndarray, sample_rate: int, width: int = WIDTH, height: int = HEIGHT
) -> np.ndarray:
    """The spectrogram as (height, width, 3) uint8: frames averaged into columns, the
    frequencies from 20 Hz to Nyquist on a log scale, FLOOR_DB..0 dB through PALETTE."""
    db, freqs = log_magnitude(audio, sample_rate)
    columns = (
        np.array_split(np.arange(len(db)), width)
        if len(db) >= width
        else [[i * len(db) // width] for i in range(width)]
    )
    db = np.stack([db[c].mean(axis=0) for c in columns])  # (width, bins)
    rows = np.geomspace(20.0, freqs[-1], height)[
        ::-1
    ]  # the top row is the highest frequency
    db = np.stack(
        [np.interp(rows, freqs, column) for column in db], axis=1
    )  # (height, width)
    level = np.clip(1 - db / FLOOR_DB, 0, 1) * (len(PALETTE) - 1)
    low = np.minimum(level.astype(int), len(PALETTE) - 2)
    fraction = (level - low)[..., None]
    return np.round(PALETTE[low] * (1 - fraction) + PALETTE[low + 1] * fraction).astype(
        np.uint8
    )


def png(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of (height, width, 3) uint8 pixels."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(
        b"\x00" + row.tobytes() for row in pixels
    )  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


def write_spectrogram(path, audio: np.ndarray, sample_rate: int):
    """Write `audio`'s spectrogram to `path` (a PNG), appearing only when whole."""
    with written(path) as tmp:
        tmp.write_bytes(png(image(audio, sample_rate)))

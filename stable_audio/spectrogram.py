"""A picture of a sound: the log-magnitude spectrogram of audio, with numpy and the
standard library only (zlib for PNG's compression, base64 to embed it).

`write_spectrogram(NAME.svg, ...)` writes it with axes: an SVG holding the spectrogram's
pixels as an embedded PNG, and around them, as SVG lines and text, time in seconds along
the bottom, frequency in Hz (log scale) up the side and a colour bar in dB. SVG rather
than digits drawn into the PNG because it carries real text with no font or dependency
of ours: any browser shows it sharp at any size, and its labels can be read back (by
people, search, and the tests). `write_spectrogram(NAME.png, ...)` writes the bare
raster, without axes."""

import base64
import math
import struct
import zlib
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from .files import written

WIDTH, HEIGHT = (
    1024,
    256,
)  # pixels: time left to right, frequency (log scale) bottom to top
LOWEST = 20.0  # Hz: the bottom row; the top row is Nyquist
HOP = 512  # samples between the STFT's frames
FLOOR_DB = -80.0  # the darkest colour, below the loudest bin
# a dark-to-bright palette (black, purple, red, orange, pale yellow), interpolated
PALETTE = np.array(
    [[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]],
    dtype=np.float64,
)
# the SVG's margins around the raster, in its pixels: frequency labels and title on the
# left, time labels and title below, the dB colour bar and its labels on the right
LEFT, TOP, RIGHT, BOTTOM = 64, 12, 84, 44
FONT = 'font-family="sans-serif" font-size="14" fill="#222"'


def log_magnitude(
    audio: np.ndarray, sample_rate: int, n_fft: int = 2048, hop: int = HOP
) -> tuple:
    """(dB (frames, n_fft / 2 + 1) relative to the loudest bin, bin frequencies in Hz)
    of the channels' mean, by a Hann-windowed STFT: frame k is centred on sample
    k * hop, for every such sample within the audio (its frames span the audio, no
    more)."""
    mono = (
        np.asarray(audio, dtype=np.float64)
        .reshape(-1, np.shape(audio)[-1])
        .mean(axis=0)
    )
    count = len(mono) // hop + 1  # the frames centred within the audio
    mono = np.pad(mono, (n_fft // 2, n_fft // 2 + max(0, n_fft - len(mono))))
    frames = np.lib.stride_tricks.sliding_window_view(mono, n_fft)[::hop][:count]
    frames = frames * np.hanning(n_fft)
    magnitude = np.abs(np.fft.rfft(frames, axis=-1))
    db = 20 * np.log10(np.maximum(magnitude, 1e-10))
    return db - db.max(), np.fft.rfftfreq(n_fft, 1 / sample_rate)


def image(
    audio: np.ndarray, sample_rate: int, width: int = WIDTH, height: int = HEIGHT
) -> np.ndarray:
    """The spectrogram as (height, width, 3) uint8: the audio's time from left edge to
    right edge (frames averaged into columns, or each column the frame nearest its
    middle), the frequencies from LOWEST to Nyquist on a log scale, bottom to top,
    FLOOR_DB..0 dB through PALETTE."""
    db, freqs = log_magnitude(audio, sample_rate)
    hops = np.shape(audio)[-1] / HOP  # the audio's length in hops
    edges = np.round(np.linspace(0, len(db), width + 1)).astype(int)  # even in time
    columns = (
        [np.arange(a, b) for a, b in zip(edges[:-1], edges[1:])]
        if len(db) >= width
        else [[min(round((i + 0.5) * hops / width), len(db) - 1)] for i in range(width)]
    )
    db = np.stack([db[c].mean(axis=0) for c in columns])  # (width, bins)
    rows = np.geomspace(LOWEST, freqs[-1], height)[
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


def nice_step(span: float, most: int) -> float:
    """The smallest step of 1, 2 or 5 times a power of ten that cuts `span` into at
    most `most` parts."""
    power = 10.0 ** math.floor(math.log10(span / most))
    return next(m * power for m in (1, 2, 5, 10) if span / (m * power) <= most + 1e-9)


def time_ticks(seconds: float) -> list:
    """Round times from 0 to `seconds`: at most 10 steps of 1, 2 or 5 times a power of
    ten (0.5 s for 3 s, 5 s for 47 s)."""
    if not seconds > 0:
        return []
    step = nice_step(seconds, 10)
    return [round(k * step, 9) for k in range(int(seconds / step + 1e-9) + 1)]


def frequency_ticks(nyquist: float) -> list:
    """1, 2 and 5 times the powers of ten from LOWEST to `nyquist` (20, 50, 100, 200,
    500, 1k, ..., 20k Hz at 44.1 kHz): about as far apart on the log axis."""
    ticks = [m * 10.0**k for k in range(1, 6) for m in (1, 2, 5)]
    return [f for f in ticks if LOWEST <= f <= nyquist]


def frequency_label(hz: float) -> str:
    return f"{hz / 1000:g}k" if hz >= 1000 else f"{hz:g}"


def frequency_row(hz: float, nyquist: float, height: int = HEIGHT) -> float:
    """The row (from the top, fractional) where image() puts `hz`: its rows are
    geomspace(LOWEST, nyquist, height) reversed."""
    return (height - 1) * math.log(nyquist / hz) / math.log(nyquist / LOWEST)


def axes(seconds: float, nyquist: float, width: int, height: int) -> tuple:
    """The SVG lines of svg()'s ticks and the SVG texts of its labels, around a raster
    of `width` x `height` at (LEFT, TOP)."""
    right, bottom = LEFT + width, TOP + height
    bar = right + 14  # the colour bar's left edge; it is 12 wide
    lines, labels = [], []

    def tick(x1, y1, x2, y2):
        lines.append(f'<line x1="{x1:g}" y1="{y1:g}" x2="{x2:g}" y2="{y2:g}"/>')

    def label(kind, x, y, text, anchor, baseline="central", extra=""):
        labels.append(
            f'<text class="{kind}" x="{x:g}" y="{y:g}" text-anchor="{anchor}"'
            f' dominant-baseline="{baseline}"{extra}>{escape(text)}</text>'
        )

    for t in time_ticks(seconds):
        x = round(LEFT + t / seconds * width, 2)
        tick(x, bottom, x, bottom + 5)
        label("time", x, bottom + 8, f"{t:g}", "middle", "hanging")
    for hz in frequency_ticks(nyquist):
        y = round(TOP + frequency_row(hz, nyquist, height) + 0.5, 2)  # a row's middle
        tick(LEFT - 5, y, LEFT, y)
        label("frequency", LEFT - 8, y, frequency_label(hz), "end")
    step = 20 if -FLOOR_DB > 40 else 10
    for db in np.arange(0, FLOOR_DB - 1e-9, -step):
        y = round(TOP + db / FLOOR_DB * height, 2)
        tick(bar + 12, y, bar + 17, y)
        label("db", bar + 20, y, f"{db:g}", "start")
    label("axis", LEFT + width / 2, bottom + 40, "time (s)", "middle", "auto")
    label(
        "axis",
        16,
        TOP + height / 2,
        "frequency (Hz)",
        "middle",
        extra=f' transform="rotate(-90 16 {TOP + height / 2:g})"',
    )
    label("axis", bar + 6, bottom + 22, "dB", "middle", "hanging")
    return lines, labels


def svg(
    audio: np.ndarray, sample_rate: int, width: int = WIDTH, height: int = HEIGHT
) -> str:
    """The spectrogram with its axes, as the text of an SVG: image()'s pixels as an
    embedded PNG at (LEFT, TOP), one SVG pixel each; time ticks (class "time") below,
    frequency ticks (class "frequency") on the left, each label centred on its
    position; the colour bar with its dB labels (class "db") on the right."""
    seconds = np.shape(audio)[-1] / sample_rate
    nyquist = sample_rate / 2
    raster = base64.b64encode(png(image(audio, sample_rate, width, height))).decode()
    right, bottom = LEFT + width, TOP + height
    bar = right + 14  # the colour bar's left edge; it is 12 wide
    lines, labels = axes(seconds, nyquist, width, height)
    stops = "".join(  # the palette's colours, bright at the top: the raster's mapping
        f'<stop offset="{i / (len(PALETTE) - 1):g}"'
        f' stop-color="rgb({r:g},{g:g},{b:g})"/>'
        for i, (r, g, b) in enumerate(PALETTE[::-1])
    )
    full_width, full_height = right + RIGHT, bottom + BOTTOM
    title = (
        f"Spectrogram: {seconds:g} s, {LOWEST:g} Hz to {nyquist:g} Hz (log scale),"
        f" {-FLOOR_DB:g} dB below the loudest bin"
    )
    return "\n".join(
        [
            '<?xml version="1.0" encoding="UTF-8"?>',
            f'<svg xmlns="http://www.w3.org/2000/svg"'
            f' xmlns:xlink="http://www.w3.org/1999/xlink" width="{full_width}"'
            f' height="{full_height}" viewBox="0 0 {full_width} {full_height}">',
            f"<title>{escape(title)}</title>",
            f'<defs><linearGradient id="db" x1="0" y1="0" x2="0" y2="1">{stops}'
            "</linearGradient></defs>",
            f'<rect width="{full_width}" height="{full_height}" fill="#fff"/>',
            f'<image x="{LEFT}" y="{TOP}" width="{width}" height="{height}"'
            ' preserveAspectRatio="none"'
            f' xlink:href="data:image/png;base64,{raster}"/>',
            f'<rect x="{bar}" y="{TOP}" width="12" height="{height}" fill="url(#db)"/>',
            f'<g stroke="#444" fill="none"><rect x="{LEFT - 0.5}" y="{TOP - 0.5}"'
            f' width="{width + 1}" height="{height + 1}"/>',
            *lines,
            "</g>",
            f"<g {FONT}>",
            *labels,
            "</g>",
            "</svg>",
            "",
        ]
    )


def write_spectrogram(path, audio: np.ndarray, sample_rate: int):
    """Write `audio`'s spectrogram to `path`, appearing only when whole: with its axes
    if `path` ends in .svg, the bare raster if in .png."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".svg", ".png"):
        raise ValueError(f"A spectrogram is written as .svg or .png, not {path}.")
    with written(path) as tmp:
        if suffix == ".svg":
            tmp.write_text(svg(audio, sample_rate), encoding="utf-8")
        else:
            tmp.write_bytes(png(image(audio, sample_rate)))

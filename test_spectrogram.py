"""The spectrogram's picture read back as a viewer sees it: the SVG parsed, its embedded
PNG decoded here (zlib, no image library), and each axis label found where the pixels
put what it names: a 1 kHz tone's row at "1k", a click at "2" s, a tone 40 dB down
read as -40 dB on the colour bar; and 100 Hz, 1 kHz and 10 kHz each at its label,
which a linear frequency axis would miss."""

import base64
import struct
import zlib
from xml.etree import ElementTree

import numpy as np
import pytest

from stable_audio import spectrogram

SVG = "{http://www.w3.org/2000/svg}"
XLINK = "{http://www.w3.org/1999/xlink}href"


def decode_png(data: bytes) -> np.ndarray:
    """(height, width, 3) uint8 of an 8-bit RGB PNG whose rows are unfiltered, as
    spectrogram.png writes them, every chunk's CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at : at + 4]), data[at + 4 : at + 8]
        body = data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = chunks.get(kind, b"") + body
        at += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks  # 8-bit RGB
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8)
    rows = rows.reshape(height, 1 + width * 3)
    assert (rows[:, 0] == 0).all()  # filter type 0
    return rows[:, 1:].reshape(height, width, 3)


class Picture:
    """A written spectrogram: its raster's pixels and box, its labels by class."""

    def __init__(self, path):
        self.root = ElementTree.parse(path).getroot()
        (image,) = self.root.iter(SVG + "image")
        prefix = "data:image/png;base64,"
        assert image.get(XLINK).startswith(prefix)
        self.pixels = decode_png(base64.b64decode(image.get(XLINK)[len(prefix) :]))
        self.x, self.y, self.width, self.height = (
            float(image.get(k)) for k in ("x", "y", "width", "height")
        )

    def labels(self, kind: str) -> dict:
        """{text: (x, y)} of the labels of class `kind`."""
        return {
            t.text: (float(t.get("x")), float(t.get("y")))
            for t in self.root.iter(SVG + "text")
            if t.get("class") == kind
        }

    def row_y(self, row: float) -> float:
        """Where the middle of the raster's `row` is drawn."""
        return self.y + (row + 0.5) * self.height / self.pixels.shape[0]

    def column_x(self, column: float) -> float:
        return self.x + (column + 0.5) * self.width / self.pixels.shape[1]

    def bar_colour(self, y: float) -> np.ndarray:
        """The dB colour bar's colour at `y`, interpolated from its gradient's stops."""
        bar = next(
            r for r in self.root.iter(SVG + "rect") if r.get("fill") == "url(#db)"
        )
        top, height = float(bar.get("y")), float(bar.get("height"))
        stops = [
            (
                float(s.get("offset")),
                [float(c) for c in s.get("stop-color")[4:-1].split(",")],
            )
            for s in self.root.iter(SVG + "stop")
        ]
        offsets, colours = zip(*stops)
        at = (y - top) / height
        return np.array([np.interp(at, offsets, c) for c in zip(*colours)])


@pytest.mark.parametrize("seconds, click", [(4, 2), (30, 20)])
def test_the_labels_are_where_a_tone_and_a_click_fall(tmp_path, seconds, click):
    """A 1 kHz tone with a click: the "1k" label is level with the picture's brightest
    row, and the click's time label (2 s of 4, fewer frames than columns; 20 s of 30,
    more) above its brightest column, at click / seconds of the raster's width."""
    rate = 44100
    t = np.arange(seconds * rate) / rate
    audio = 0.5 * np.sin(2 * np.pi * 1000 * t)
    audio[click * rate] += 1.0
    path = tmp_path / "tone.svg"
    spectrogram.write_spectrogram(path, np.stack([audio, audio]), rate)
    picture = Picture(path)
    assert picture.pixels.shape == (spectrogram.HEIGHT, spectrogram.WIDTH, 3)
    assert (picture.width, picture.height) == (spectrogram.WIDTH, spectrogram.HEIGHT)
    brightness = picture.pixels.astype(int).sum(axis=-1)
    row = brightness.mean(axis=1).argmax()
    assert picture.labels("frequency")["1k"][1] == pytest.approx(
        picture.row_y(row), abs=1.5
    )
    columns = brightness.sum(axis=0)
    column = np.flatnonzero(columns == columns.max()).mean()
    x = picture.labels("time")[str(click)][0]
    assert x == pytest.approx(picture.column_x(column), abs=2)
    assert x == pytest.approx(picture.x + click / seconds * picture.width, abs=0.01)
    step = 0.5 if seconds == 4 else 5
    assert list(picture.labels("time")) == [
        f"{k * step:g}" for k in range(int(seconds / step) + 1)
    ]


def test_frequency_labels_follow_the_log_axis(tmp_path):
    """100 Hz, 1 kHz and 10 kHz, a second each (at 20480 Hz, each an FFT bin's middle):
    each second's brightest row is level with its label, so a linear axis, which would
    put 100 Hz and 1 kHz near the bottom, fails; the labels' heights are a straight line
    in log frequency, 1-2-5 steps from 20 Hz to Nyquist."""
    rate = 20480
    t = np.arange(rate) / rate
    audio = np.concatenate([np.sin(2 * np.pi * f * t) for f in (100, 1000, 10000)])
    path = tmp_path / "tones.svg"
    spectrogram.write_spectrogram(path, audio[None], rate)
    picture = Picture(path)
    labels = picture.labels("frequency")
    assert list(labels) == ["20", "50", "100", "200", "500", "1k", "2k", "5k", "10k"]
    brightness = picture.pixels.astype(int).sum(axis=-1)
    width = brightness.shape[1]
    for third, name in enumerate(("100", "1k", "10k")):
        middle = brightness[:, width * third // 3 + 40 : width * (third + 1) // 3 - 40]
        row = middle.mean(axis=1).argmax()
        assert labels[name][1] == pytest.approx(picture.row_y(row), abs=1.5), name
    hz = np.array([20, 50, 100, 200, 500, 1000, 2000, 5000, 10000])
    y = np.array([p[1] for p in labels.values()])
    slope, intercept = np.polyfit(np.log(hz), y, 1)
    assert np.abs(slope * np.log(hz) + intercept - y).max() < 0.02  # straight in log f
    assert y[0] == pytest.approx(picture.row_y(picture.pixels.shape[0] - 1))  # 20 Hz


def test_the_colour_bar_reads_the_levels(tmp_path):
    """A 1 kHz tone, then the same tone 40 dB down, then silence: read on the colour bar
    (the place of the tone row's colour, between its dB labels) the three are 0 dB,
    40 dB below it, and the floor, -80 dB."""
    rate = 44100
    t = np.arange(rate) / rate
    tone = np.sin(2 * np.pi * 1000 * t)
    audio = np.concatenate([tone, tone / 100, 0 * tone])
    path = tmp_path / "levels.svg"
    spectrogram.write_spectrogram(path, audio[None], rate)
    picture = Picture(path)
    labels = picture.labels("db")
    assert list(labels) == ["0", "-20", "-40", "-60", "-80"]
    label_y = [y for _, y in labels.values()]
    places = np.linspace(label_y[0], label_y[-1], 2001)
    bar = np.stack([picture.bar_colour(y) for y in places])

    def read(colour) -> float:
        """The dB the bar shows for `colour`."""
        y = places[np.abs(bar - colour).sum(axis=1).argmin()]
        return np.interp(y, label_y, [float(v) for v in labels])

    brightness = picture.pixels.astype(int).sum(axis=-1)
    row = picture.pixels[brightness.mean(axis=1).argmax()].astype(float)
    width = len(row)
    loud, quiet, silent = (
        read(row[width * k // 3 + 40 : width * (k + 1) // 3 - 40].mean(axis=0))
        for k in range(3)
    )
    assert loud == pytest.approx(0, abs=1.5) and silent == -80
    assert quiet - loud == pytest.approx(-40, abs=0.5)


@pytest.mark.parametrize(
    "seconds, step",
    [(0.01, 0.001), (3, 0.5), (4, 0.5), (10, 1), (47.55, 5), (512, 100)],
)
def test_time_ticks_are_round_numbers(seconds, step):
    ticks = spectrogram.time_ticks(seconds)
    assert ticks[0] == 0 and len(ticks) <= 11 and ticks[-1] <= seconds
    assert np.diff(ticks) == pytest.approx(step) and seconds - ticks[-1] < step


def test_a_png_is_the_bare_raster_and_other_names_are_refused(tmp_path):
    audio = np.zeros((2, 4000), np.float32)
    spectrogram.write_spectrogram(tmp_path / "a.png", audio, 44100)
    pixels = decode_png((tmp_path / "a.png").read_bytes())
    assert pixels.shape == (spectrogram.HEIGHT, spectrogram.WIDTH, 3)
    with pytest.raises(ValueError, match=r"\.svg or \.png"):
        spectrogram.write_spectrogram(tmp_path / "a.jpg", audio, 44100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_a_sound_shorter_than_a_hop_is_one_frame_across(tmp_path):
    """441 samples (0.01 s) of noise: one frame, centred on its start, across the whole
    raster; no columns of the padding after it (the time axis ends where the sound
    does)."""
    audio = np.random.default_rng(0).standard_normal((2, 441))
    pixels = spectrogram.image(audio, 44100)
    assert (pixels == pixels[:, :1]).all()
    path = tmp_path / "short.svg"
    spectrogram.write_spectrogram(path, audio, 44100)
    assert list(Picture(path).labels("time"))[-1] == "0.01"

"""Pieces longer than the model's window, and continuations of a recording, made window
by window on one latent grid.

Each window after the first keeps the last `overlap` latents of what is already made
(the window before, or the file being continued) as its inpainting source, so they stay
exactly as they were, and generates the rest. Its timing conditions are those the model
was trained on for a crop of a long file (stable_audio_tools/data/utils.py,
PadCrop_Normalized_T): seconds_start is where the window starts in the piece, in whole
seconds, and seconds_total the whole piece's length, rounded up. The piece's latents are
decoded once, by the chunked decoder, so there is no seam in the audio."""

import math
from dataclasses import replace

import mlx.core as mx
import numpy as np

from .audio import prepare_audio
from .settings import continued_latents


def plan_windows(total: int, window: int, overlap: int, made: int = 0) -> list:
    """[(start, keep)] in latents: each window covers [start, start + window) and keeps
    its first `keep` latents, already made, regenerating the rest; together they cover
    [0, total). `made` latents exist before the first window (a file being continued).
    A window starts `overlap` latents before the end of what is made, or earlier where
    the piece ends sooner, so that every window is whole."""
    if not 0 <= overlap < window:
        raise ValueError("The overlap must leave part of each window to generate.")
    windows = []
    while made < total or not windows:
        start = max(min(made - overlap, total - window), 0) if made else 0
        windows.append((start, made - start))
        made = start + window
    return windows


def timing(start: int, total_samples: int, ratio: int, sample_rate: int) -> dict:
    """The seconds conditions of a window starting at latent `start` of a piece of
    `total_samples` samples: PadCrop_Normalized_T's for a crop at that offset."""
    return {
        "seconds_start": math.floor(start * ratio / sample_rate),
        "seconds_total": math.ceil(total_samples / sample_rate),
    }


def windows(config, seconds_total: float, overlap: float, made: int = 0) -> list:
    """plan_windows for a piece of `seconds_total` whose windows keep `overlap` seconds
    of the one before, after `made` latents already there (checked with the
    settings)."""
    ratio = config.vae.downsampling_ratio
    window = config.sample_size // ratio
    total = math.ceil(round(seconds_total * config.sample_rate) / ratio)
    return plan_windows(
        total, window, round(overlap * config.sample_rate / ratio), made
    )


def encode_whole(pipe, audio, sample_rate: int) -> mx.array:
    """Latents (1, T, C) of all of `audio` (any length; the posterior mean, encoded a
    few latents at a time), T its whole latents: a partial last one is left out."""
    ratio, channels = pipe.config.vae.downsampling_ratio, pipe.config.vae.audio_channels
    audio = np.asarray(audio, dtype=np.float32)
    length = continued_latents(pipe.config, sample_rate, audio) * ratio
    if length == 0:
        raise ValueError(
            f"The audio is shorter than one latent ({ratio} samples at "
            f"{pipe.sample_rate} Hz)."
        )
    prepared = prepare_audio(audio, sample_rate, pipe.sample_rate, length, channels)
    prepared = mx.array(prepared.T[None]).astype(
        pipe.vae.encoder.layers[0].weight.dtype
    )
    mean, _ = pipe.vae.posterior(prepared, chunk=128)
    return mean.astype(mx.float32)


def canvas(pipe, windows: list, batch_size: int = 1) -> mx.array:
    """The zero latents (B, T, C) that `windows` fill."""
    size = windows[-1][0] + pipe.latent_shape()[1]
    return mx.zeros((batch_size, size, pipe.config.dit.io_channels))


def sample(pipe, conditionings: list, windows: list, piece: mx.array, settings):
    """Fill `piece` (B, T, C; its first latents those of a file being continued, if
    any) window by window: window i is sampled with seed + i, keeping its first `keep`
    latents as the inpainting source. Yields each window's latents after every sampler
    step; `piece` holds the result at the end."""
    window = pipe.latent_shape()[1]
    for i, ((start, keep), conditioning) in enumerate(zip(windows, conditionings)):
        inpaint = None
        if keep:
            inpaint = (piece[:, start : start + window], mx.arange(window) >= keep)
        seed = (settings.seed + i) % 2**64
        latents = pipe.generate_latents(
            conditioning, settings=replace(settings, seed=seed), inpaint=inpaint
        )
        for x in latents:
            yield x
        piece[:, start + keep : start + window] = x[:, keep:]


class Piece:
    """generate()'s mode for a piece beyond the window or a continuation."""

    def __init__(self, pipe, settings):
        self.pipe, self.s = pipe, settings

    def encode(self) -> list:
        """The continued audio's latents (if any); the windows are planned after
        them."""
        s, made = self.s, []
        if s.continue_audio is not None:
            rate, audio = s.continue_audio
            made = [encode_whole(self.pipe, audio, rate)]
        length = made[0].shape[1] if made else 0
        self.windows = windows(self.pipe.config, s.seconds_total, s.overlap, length)
        self.steps = s.steps * len(self.windows)
        self.latents = canvas(self.pipe, self.windows, s.batch_size)
        if made:
            self.latents[:, :length] = made[0]
        return made

    def condition(self) -> list:
        pipe, s = self.pipe, self.s
        samples, ratio = (
            round(s.seconds_total * pipe.sample_rate),
            pipe.config.vae.downsampling_ratio,
        )
        self.conditionings = [
            pipe.condition(
                s.prompt,
                s.negative_prompt,
                batch_size=s.batch_size,
                **timing(start, samples, ratio, pipe.sample_rate),
            )
            for start, _ in self.windows
        ]
        return self.conditionings

    def sample(self):
        return sample(self.pipe, self.conditionings, self.windows, self.latents, self.s)

    def decode(self) -> mx.array:
        audio = self.pipe.decode(self.latents)
        return audio[..., : round(self.s.seconds_total * self.pipe.sample_rate)]

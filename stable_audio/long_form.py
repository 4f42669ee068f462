"""Pieces longer than the model's window, made window by window on one latent grid.

Each window after the first keeps the last `overlap` latents of what is already made
(the window before, or the file being continued) as its inpainting source, so they stay
exactly as they were, and generates the rest. Its timing conditions are those the model
was trained on for a crop of a long file (stable-audio-tools' PadCrop_Normalized_T):
seconds_start is where the window starts in the piece, in whole seconds, and
seconds_total the whole piece's length, rounded up. The piece's latents are decoded once,
by the chunked decoder, so there is no seam in the audio."""

import math


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
    return {"seconds_start": math.floor(start * ratio / sample_rate), "seconds_total": math.ceil(total_samples / sample_rate)}

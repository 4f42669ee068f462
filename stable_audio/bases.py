"""The -xs adapters' SVD bases, and a cache of them on disk.

An -xs adapter (lora-xs, dora-rows-xs, dora-cols-xs, bora-xs) holds only an r x r core
per layer; its bases U and V are the top singular vectors of the layer's original
weight, which 0.0.20 computes (or reads from a torch pickle, which we do not). For SAO
1.0's 178 DiT layers that is minutes of float32 SVDs on a few CPU cores, so the bases
are kept on disk and a second load computes nothing.
"""

import hashlib
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from .model_io import read_safetensors, write_safetensors

CACHE_VERSION = "1"  # bump when what an entry holds, or how it is computed, changes


def svd_bases(weight, rank: int) -> tuple:
    """U (out, rank) and V (in, rank), the top singular vectors of `weight` (out, in),
    for the -xs types: a float32 SVD, each U column's largest-magnitude entry made
    positive (and its V column flipped with it), as 0.0.20's _canonicalize_svd_signs
    does, so that the bases do not depend on the LAPACK that computed them."""
    u, _, vt = np.linalg.svd(np.asarray(weight, np.float32), full_matrices=False)
    u, v = u[:, :rank], vt[:rank].T
    signs = np.sign(u[np.abs(u).argmax(axis=0), np.arange(rank)])
    signs[signs == 0] = 1
    return mx.array(u * signs), mx.array(v * signs)


def cache_folder() -> Path:
    """Where the bases are kept: svd-bases in $STABLE_AUDIO_CACHE if set, else in
    stable-audio-mlx of the user's cache folder ($XDG_CACHE_HOME, or ~/.cache)."""
    root = os.environ.get("STABLE_AUDIO_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        root = root / "stable-audio-mlx"
    return Path(root).expanduser() / "svd-bases"


def weight_digest(weight: np.ndarray) -> str:
    """The name of a float32 (out, in) weight's entry: a SHA-256 of its shape and values
    (SHA-256 rather than BLAKE2: CPUs hash it in hardware, 2 GB/s here)."""
    h = hashlib.sha256(f"{CACHE_VERSION} {weight.shape}".encode())
    h.update(np.ascontiguousarray(weight, np.float32))
    return h.hexdigest()[:40]


def cached_bases(weight, rank: int, folder=None) -> tuple:
    """svd_bases(weight, rank), read from the cache in `folder` (cache_folder() if None)
    when it holds them, else computed and kept there.

    Entries are keyed by the weight's content (a digest of its float32 values and
    shape), not by the file it came from: the layer's weight is what identifies the
    layer, so the key is exact whatever dtype or quantization the model was loaded
    with, and bases can never be stale after a file changes. One file per weight,
    DIGEST.safetensors, holds U and V at the largest rank computed so far; a smaller
    rank is its first columns (the top singular vectors come first and the sign fix is
    per column, so they are bit for bit what svd_bases returns at that rank); a larger
    one is computed and replaces it. An entry that cannot be read is computed again; a
    folder that cannot be written is skipped. The cache never fails a load.
    """
    weight = np.ascontiguousarray(np.asarray(weight, np.float32))
    folder = Path(folder) if folder is not None else cache_folder()
    path = folder / f"{weight_digest(weight)}.safetensors"
    try:
        stored = read_safetensors(path, (mx.float32,)) if path.is_file() else {}
        u, v = stored["U"], stored["V"]
        if (
            u.ndim == v.ndim == 2
            and u.shape[0] == weight.shape[0]
            and v.shape[0] == weight.shape[1]
            and u.shape[1] == v.shape[1] >= rank
        ):
            u, v = u[:, :rank], v[:, :rank]
            mx.eval(u, v)  # read now, not after another writer replaced the file
            return u, v
    except (ValueError, KeyError, OSError, RuntimeError):
        pass  # none, damaged or unreadable: computed, and kept
    u, v = svd_bases(weight, rank)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, {"U": u, "V": v}, {"rank": str(rank)})
    except (OSError, RuntimeError):
        pass  # a read-only or full cache: the bases are still returned
    return u, v

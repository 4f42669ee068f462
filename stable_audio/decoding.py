"""Decoding latents to audio with the VAE within a memory budget: a few latents at a
time, each chunk with the context its receptive field needs, so that the result equals
one-shot decoding and memory does not grow with the length; and circularly, for loops.
"""

import math

import mlx.core as mx

# The most memory decoding takes beyond the decoder's weights, by choice: 47 s decode in
# 3 chunks in float32 (2 in float16). docs/performance.md gives the measurements.
DECODE_BUDGET = 4e9


def dtype(vae) -> mx.Dtype:
    return vae.decoder.layers[0].weight.dtype


def chunk_length(vae, length: int) -> int:
    """How many latents decode() decodes at once: all `length` if they fit in half the
    memory still free (at most DECODE_BUDGET bytes), else as few equal chunks as fit;
    chunks of about 128 latents when little is free (as under --low-memory)."""
    config = vae.config
    # the decoder's peak grows by ~8 full-rate activations a latent
    per_latent = 9 * config.channels * config.downsampling_ratio * dtype(vae).size
    info = mx.device_info()
    device = info.get("max_recommended_working_set_size") or info.get("memory_size")
    memory = min(mx.get_memory_limit(), device or math.inf)
    budget = min((memory - mx.get_active_memory()) / 2, DECODE_BUDGET)
    fits = max(int(budget // per_latent), 128)
    chunks = -(-length // fits)
    return -(-length // chunks)


def decode(vae, latents: mx.array, chunk: int = None) -> mx.array:
    """Audio (B, channels, samples), float32, from latents (B, T, C), decoded one batch
    item and `chunk` latents (default: chunk_length(T)) at a time. Each chunk is decoded
    with as many extra latents on each side as the decoder's receptive field reaches (11
    for SAO 1.0), which are then cut off again."""
    ratio, overlap = vae.config.downsampling_ratio, vae.config.decoder_context
    chunk = chunk or chunk_length(vae, latents.shape[1])
    latents = latents.astype(dtype(vae))
    audios = []
    for item in latents:
        pieces = []
        for start in range(0, item.shape[0], chunk):
            lo, hi = max(start - overlap, 0), min(
                start + chunk + overlap, item.shape[0]
            )
            audio = vae.decode(item[None, lo:hi])[0]
            audio = audio[(start - lo) * ratio : (min(start + chunk, hi) - lo) * ratio]
            mx.eval(audio)
            pieces.append(audio)
        audios.append(mx.concatenate(pieces, axis=0).T)
    return mx.stack(audios).astype(mx.float32)


def decode_circular(vae, latents: mx.array) -> mx.array:
    """Audio (B, channels, L * ratio) of latents (B, L, C) that repeat forever: the
    decoder sees, on each side, the latents of the other end, as far as it reaches."""
    length, ratio = latents.shape[1], vae.config.downsampling_ratio
    context = vae.config.decoder_context
    around = mx.array([i % length for i in range(-context, length + context)])
    return decode(vae, latents[:, around])[
        ..., context * ratio : (context + length) * ratio
    ]

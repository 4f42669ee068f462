"""Guidance as stable-audio-tools 0.0.20 computes it (stable_audio_tools/models/dit.py,
DiffusionTransformer.forward): functions of the conditional and the unconditional
prediction of one doubled-batch model evaluation. docs/reference.md, "Guidance", gives
the equations."""

import math

import mlx.core as mx


def cfg(cond: mx.array, uncond: mx.array, scale: float) -> mx.array:
    """Classifier-free guidance: uncond + scale (cond - uncond)."""
    return uncond + (cond - uncond) * scale


def projected(x, t, cond, uncond, scale, apg_scale, norm_threshold, objective):
    """APG and the norm threshold, on the denoised estimates x0 = alpha x - sigma v:
    their difference d is scaled to a norm <= `norm_threshold` (0: no cap), `apg_scale`
    of its part parallel to the conditional x0 removed, and x0_cond + (scale - 1) d
    turned back into a prediction. In float32 (the reference projects in float64, which
    Metal lacks).
    """
    t = t.astype(mx.float32)[:, None, None]
    if objective == "v":
        alpha, sigma = mx.cos(t * math.pi / 2), mx.sin(t * math.pi / 2)
    else:
        alpha, sigma = 1.0, t
    x = x.astype(mx.float32)
    norm = lambda a: mx.sqrt(mx.sum(a * a, axis=(1, 2), keepdims=True))
    x0_cond = alpha * x - sigma * cond
    diff = x0_cond - (alpha * x - sigma * uncond)
    if norm_threshold > 0:
        diff = diff * mx.minimum(1.0, norm_threshold / norm(diff))
    if apg_scale != 0.0:
        direction = x0_cond / mx.maximum(norm(x0_cond), 1e-12)
        parallel = mx.sum(diff * direction, axis=(1, 2), keepdims=True) * direction
        diff = apg_scale * (diff - parallel) + (1 - apg_scale) * diff
    return (alpha * x - (x0_cond + (scale - 1) * diff)) / sigma


def rescale(guided: mx.array, cond: mx.array, phi: float) -> mx.array:
    """CFG rescale (the reference's scale_phi): `phi` of the guided prediction brought
    to the conditional one's standard deviation, along the channels."""
    std = lambda a: mx.std(a, axis=-1, keepdims=True, ddof=1)
    return phi * guided * (std(cond) / std(guided)) + (1 - phi) * guided


def guide(
    dit,
    x: mx.array,
    t: mx.array,
    conditioning: dict,
    cfg_scale: float = 1.0,
    cfg_rescale: float = 0.0,
    apg_scale: float = 0.0,
    cfg_norm_threshold: float = 0.0,
) -> tuple:
    """The guided and the unconditional prediction (both float32) of `dit` for latents
    `x` at times `t`, guidance computed in one doubled batch as the reference does.

    The unconditional half sees all-zero cross-attention tokens (or the negative
    prompt's, if `conditioning` holds them) but keeps the global token. With `cfg_scale`
    1 the model runs once, on the prompt alone. APG and the norm threshold (see
    projected) with 0 give plain CFG, which is computed directly."""
    if cfg_scale == 1.0:
        v = dit(x, t, dit.prompt_only(conditioning, x.shape[0]))
        return v, v
    double = lambda a: mx.concatenate([a, a], axis=0)
    cond, uncond = mx.split(dit(double(x), double(t), conditioning), 2, axis=0)
    if apg_scale == 0.0 and cfg_norm_threshold == 0.0:
        guided = cfg(cond, uncond, cfg_scale)  # what x0 space gives, exactly
    else:
        guided = projected(
            x, t, cond, uncond, cfg_scale, apg_scale, cfg_norm_threshold, dit.objective
        )
    if cfg_rescale != 0.0:
        guided = rescale(guided, cond, cfg_rescale)
    return guided, uncond

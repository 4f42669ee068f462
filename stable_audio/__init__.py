import math
import secrets
from typing import NamedTuple

import mlx.core as mx

from . import sampler as samplers
from .model_io import DEFAULT_REPO, Config, load, load_config


class Conditioning(NamedTuple):
    cross: mx.array  # (B, tokens, cond_dim): text, then the seconds tokens
    global_cond: mx.array  # (B, global_cond_dim): the seconds embeddings side by side
    negative_cross: mx.array = None  # the negative prompt's tokens, if any


def check_arguments(
    config: Config,
    seconds_start: float = 0.0,
    seconds_total: float = None,
    steps: int = 100,
    cfg_scale: float = 7.0,
    sampler: str = "dpmpp-3m-sde",
    sigma_min: float = 0.3,
    sigma_max: float = 500.0,
    batch_size: int = 1,
):
    """Refuse, with a one-line ValueError, what the model or the samplers cannot do."""
    window = config.sample_size / config.sample_rate
    total = window if seconds_total is None else seconds_total
    start_max = config.conditioner.numbers.get("seconds_start", (0, math.inf))[1]
    finite = all(math.isfinite(v) for v in (seconds_start, total, cfg_scale, sigma_min, sigma_max))
    problems = [
        (not finite, "numbers must be finite"),
        (not 0 < total <= window + 1e-9, f"seconds_total must be in (0, {window:.2f}], the model's window"),
        (not 0 <= seconds_start <= start_max, f"seconds_start must be in [0, {start_max:g}]"),
        (steps < 1, "steps must be at least 1"),
        (sampler not in samplers.SAMPLERS, f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}"),
        (not 0 < sigma_min < sigma_max, "sigmas must satisfy 0 < sigma_min < sigma_max"),
        (batch_size < 1, "the number of audios must be at least 1"),
    ]
    for failed, message in problems:
        if failed:
            raise ValueError(message + ".")


class StableAudio:
    """Text to audio with Stable Audio Open: T5, the DiT with a k-diffusion sampler, the VAE."""

    def __init__(self, components):
        self.config = components.config
        self.tokenizer = components.tokenizer
        self.t5 = components.t5
        self.conditioner = components.conditioner
        self.dit = components.dit
        self.vae = components.vae

    @classmethod
    def from_pretrained(
        cls, path_or_repo: str = DEFAULT_REPO, dtype=None, vae_dtype=mx.float32, quantize: int = None
    ):
        """A converted folder, a released-layout folder, or a Hub repo id. `dtype` is for T5
        and the DiT (None: as stored); `quantize` (4 or 8) quantizes a float DiT's blocks."""
        q = {"group_size": 64, "bits": quantize} if quantize else None
        return cls(load(path_or_repo, dtype=dtype, vae_dtype=vae_dtype, quantize=q))

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def window_seconds(self) -> float:
        return self.config.sample_size / self.config.sample_rate

    def condition(
        self,
        prompt: str,
        negative_prompt: str = None,
        seconds_start: float = 0.0,
        seconds_total: float = None,
        batch_size: int = 1,
    ) -> Conditioning:
        """Encode the prompt and the timing; afterwards T5 may be deleted (`del pipe.t5`)."""
        seconds_total = self.window_seconds if seconds_total is None else seconds_total
        seconds = dict(seconds_start=[seconds_start] * batch_size, seconds_total=[seconds_total] * batch_size)
        seconds = {k: v for k, v in seconds.items() if k in self.conditioner.numbers}

        def encode(text):
            tokens, mask = self.tokenizer([text] * batch_size)
            return self.conditioner(self.t5(tokens, mask), mask, **seconds)

        cross, global_cond = encode(prompt)
        negative_cross = None if negative_prompt is None else encode(negative_prompt)[0]
        return Conditioning(cross, global_cond, negative_cross)

    def generate_latents(
        self,
        conditioning: Conditioning,
        steps: int = 100,
        cfg_scale: float = 7.0,
        sampler: str = "dpmpp-3m-sde",
        sigma_min: float = 0.3,
        sigma_max: float = 500.0,
        seed: int = None,
        cfg_rescale: float = 0.0,
        noise: mx.array = None,
        noise_sampler=None,
        compile: bool = False,
    ):
        """Yield the latents (B, T, C) after each sampler step, on the model's full window.

        `noise` (the initial N(0, 1) latents) and `noise_sampler(sigma, sigma_next)` (each
        SDE step's N(0, 1) noise) default to draws from `seed`. With `compile`, the whole
        step (DiT, guidance and sampler update) runs as one compiled function.
        """
        B = conditioning.cross.shape[0]
        shape = (B, self.config.sample_size // self.config.vae.downsampling_ratio, self.config.dit.io_channels)
        seed = secrets.randbits(32) if seed is None else seed
        init_key, step_key = mx.random.split(mx.random.key(seed))
        if noise is None:
            noise = mx.random.normal(shape, key=init_key)
        if noise_sampler is None:
            step_keys = iter(mx.random.split(step_key, steps))
            noise_sampler = lambda sigma, sigma_next: mx.random.normal(shape, key=next(step_keys))

        sigmas = samplers.polyexponential_sigmas(steps, sigma_min, sigma_max)
        coefficients = samplers.step_coefficients(sampler, sigmas)
        # compiled per generation: a cached compiled function would keep the DiT's
        # weights alive after `del pipe.dit`
        step = mx.compile(self._step) if compile else self._step
        dit_conditioning = self.dit.condition(*conditioning)  # the same at every step
        x = noise * sigmas[0]
        zeros = mx.zeros_like(x)
        d1 = d2 = zeros  # the denoised estimates of the last two steps
        for (sigma, sigma_next), k in zip(zip(sigmas, sigmas[1:]), coefficients):
            # draw only where k-diffusion draws, so that a noise_sampler sees the same calls
            step_noise = noise_sampler(sigma, sigma_next) if k[-1] else zeros
            x, d1, d2 = step(x, d1, d2, step_noise, mx.array(k), dit_conditioning, cfg_scale, cfg_rescale)
            yield x

    def _step(self, x, d1, d2, noise, k, dit_conditioning, cfg_scale, cfg_rescale):
        def model(x, t):
            return self.dit.guide(x, t, dit_conditioning, cfg_scale, cfg_rescale)

        return samplers.step(model, x, d1, d2, noise, k)

    def decode(self, latents: mx.array, chunk: int = 128) -> mx.array:
        """Audio (B, channels, samples) from latents (B, T, C), decoded one batch item and
        `chunk` latents at a time. Each chunk is decoded with as many extra latents on each
        side as the decoder's receptive field reaches (11 for SAO 1.0), then those are cut
        off again: the result equals one-shot decoding, and memory does not grow with T."""
        ratio, overlap = self.config.vae.downsampling_ratio, self.config.vae.decoder_context
        latents = latents.astype(self.vae.decoder.layers[0].weight.dtype)
        audios = []
        for item in latents:
            pieces = []
            for start in range(0, item.shape[0], chunk):
                lo, hi = max(start - overlap, 0), min(start + chunk + overlap, item.shape[0])
                audio = self.vae.decode(item[None, lo:hi])[0]
                audio = audio[(start - lo) * ratio : (min(start + chunk, hi) - lo) * ratio]
                mx.eval(audio)
                pieces.append(audio)
            audios.append(mx.concatenate(pieces, axis=0).T)
        return mx.stack(audios).astype(mx.float32)

    def generate(
        self,
        prompt: str,
        negative_prompt: str = None,
        seconds_start: float = 0.0,
        seconds_total: float = None,
        steps: int = 100,
        cfg_scale: float = 7.0,
        sampler: str = "dpmpp-3m-sde",
        sigma_min: float = 0.3,
        sigma_max: float = 500.0,
        seed: int = None,
        batch_size: int = 1,
        cfg_rescale: float = 0.0,
        noise: mx.array = None,
        noise_sampler=None,
        compile: bool = False,
    ) -> mx.array:
        """Audio (batch_size, channels, samples) at `sample_rate`, cut to `seconds_total`."""
        seconds_total = self.window_seconds if seconds_total is None else seconds_total
        check_arguments(self.config, seconds_start, seconds_total, steps, cfg_scale, sampler, sigma_min, sigma_max, batch_size)
        conditioning = self.condition(prompt, negative_prompt, seconds_start, seconds_total, batch_size)
        latents = self.generate_latents(
            conditioning, steps, cfg_scale, sampler, sigma_min, sigma_max, seed,
            cfg_rescale=cfg_rescale, noise=noise, noise_sampler=noise_sampler, compile=compile,
        )
        for latents in latents:
            mx.eval(latents)
        check_finite(latents, "sampling")
        audio = self.decode(latents)
        check_finite(audio, "decoding")
        return audio[..., : round(seconds_total * self.sample_rate)]


def limit_memory(headroom: float = 0.5) -> int:
    """Bound MLX's memory to what is in use now plus `headroom` GB; returns the old limit.

    MLX runs ahead of the GPU, and the buffers of freed intermediates stay allocated
    until the GPU has passed them; at its limit MLX waits for pending work instead. Call
    this once the weights that generation needs are loaded (and T5 freed)."""
    return mx.set_memory_limit(mx.get_active_memory() + int(headroom * 1e9))


def check_finite(x: mx.array, stage: str):
    if not mx.all(mx.isfinite(x)).item():
        raise FloatingPointError(
            f"{stage.capitalize()} produced NaN or Inf values; "
            f"float16 may overflow: try --dtype float32 (or bfloat16)."
        )

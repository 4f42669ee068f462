"""One window of the model: text to audio, a variation of init audio, or an inpainting.

A variation starts sampling from the init audio's latents (a sample of the VAE's
posterior) noised to init_noise_level, as stable-audio-tools does. An inpainting keeps
the posterior mean of its audio outside the ranges to regenerate: after every sampler
step those latents are put back, noised to the step's level, so that they end exactly
as they were."""

import math

import mlx.core as mx
import numpy as np


def init_latents(pipe, audio, sample_rate: int, seed: int) -> mx.array:
    """Init audio's latents as stable-audio-tools makes them: a sample of the posterior
    (its noise drawn from `seed`)."""
    key = mx.random.split(mx.random.key(seed), 3)[2]  # unlike generate_latents' two
    noise = mx.random.normal(pipe.latent_shape(1), key=key)
    return pipe.encode(audio, sample_rate, noise)


def inpaint_source(pipe, audio, sample_rate: int, ranges) -> tuple:
    """generate_latents' `inpaint`: the posterior mean of `audio` (its most faithful
    latents) and the mask of the latents that overlap the (start, end) `ranges` in
    seconds, which are regenerated."""
    T, ratio = pipe.latent_shape()[1], pipe.config.vae.downsampling_ratio
    regenerate = np.zeros(T, dtype=bool)
    for start, end in ranges:
        lo = math.floor(start * pipe.sample_rate / ratio)
        hi = math.ceil(end * pipe.sample_rate / ratio)
        regenerate[lo:hi] = True
    return pipe.encode(audio, sample_rate), mx.array(regenerate)


class Window:
    """generate()'s mode for one window; `noise` and `noise_sampler` as
    generate_latents'."""

    def __init__(self, pipe, settings, noise=None, noise_sampler=None):
        self.pipe, self.s = pipe, settings
        self.steps = settings.steps
        self.sampling = dict(noise=noise, noise_sampler=noise_sampler)

    def encode(self) -> list:
        """The init or inpaint audio's latents, if any is given."""
        s = self.s
        if s.init_audio is not None:
            rate, audio = s.init_audio
            self.sampling["init_latents"] = init_latents(self.pipe, audio, rate, s.seed)
            return [self.sampling["init_latents"]]
        if s.inpaint_audio is not None:
            rate, audio = s.inpaint_audio
            source = inpaint_source(self.pipe, audio, rate, s.inpaint_ranges)
            self.sampling["inpaint"] = source
            return [source[0]]
        return []

    def condition(self) -> list:
        s = self.s
        self.conditioning = self.pipe.condition(
            s.prompt, s.negative_prompt, s.seconds_start, s.seconds_total, s.batch_size
        )
        return [self.conditioning]

    def sample(self):
        latents = self.pipe.generate_latents(
            self.conditioning, settings=self.s, **self.sampling
        )
        for x in latents:
            self.latents = x
            yield x

    def decode(self) -> mx.array:
        audio = self.pipe.decode(self.latents)
        return audio[..., : round(self.s.seconds_total * self.pipe.sample_rate)]

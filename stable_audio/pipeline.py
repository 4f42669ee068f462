"""The text-to-audio pipeline: loading and adapters, conditioning, the one sampling
generator, encoding and decoding; generate() composes them for every mode."""

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
from mlx.utils import tree_flatten

from . import decoding, lora
from . import sampler as samplers
from .audio import prepare_audio
from .guidance import guide
from .long_form import Piece
from .loops import Loop
from .model_io import DEFAULT_REPO, load, quantize_dit
from .settings import Settings
from .window import Window


class Conditioning(NamedTuple):
    cross: mx.array  # (B, tokens, cond_dim): text, then the seconds tokens
    global_cond: mx.array  # (B, global_cond_dim): the seconds embeddings side by side
    negative_cross: mx.array = None  # the negative prompt's tokens, if any


class StableAudio:
    """Text to audio with Stable Audio Open: T5, the DiT with a k-diffusion sampler, the
    VAE."""

    def __init__(self, components):
        self.config = components.config
        self.tokenizer = components.tokenizer
        self.t5 = components.t5
        self.conditioner = components.conditioner
        self.dit = components.dit
        self.vae = components.vae
        self.adapters = []  # what load_lora applied, in order

    # The compiled step is kept from generation to generation. Its traces hold the
    # DiT's weights, so it goes with the DiT: replacing or deleting `dit` drops it.
    @property
    def dit(self):
        return self._dit

    @dit.setter
    def dit(self, dit):
        self._dit, self._compiled = dit, None

    @dit.deleter
    def dit(self):
        del self._dit
        self._compiled = None

    def _step(self, compile: bool):
        """The sampler's model evaluation, compiled once for the DiT's present weights
        (merging an adapter, casting or quantizing makes new ones, which retrace)."""
        if not compile:
            return partial(_evaluate, self.dit)
        weights = [w for _, w in tree_flatten(self.dit.parameters())]
        cached = self._compiled
        # the cache holds the weights themselves: an id() could be reused once freed
        if (
            cached is None
            or len(cached[0]) != len(weights)
            or any(a is not b for a, b in zip(cached[0], weights))
        ):
            # no reference to self: the pipeline and the DiT form no cycle
            self._compiled = (weights, mx.compile(partial(_evaluate, self.dit)))
        return self._compiled[1]

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str = DEFAULT_REPO,
        dtype=None,
        vae_dtype=mx.float32,
        quantize: int = None,
        loras=(),
    ):
        """A converted folder, a released-layout folder, or a Hub repo id. `dtype` is
        for T5 and the DiT (None: as stored); `quantize` (4 or 8) quantizes a float
        DiT's blocks. `loras`: adapter files, each a path or a tuple of load_lora's
        arguments (path, strength, interval, layer_filter), applied in order; with
        `quantize`, before the DiT is quantized, so that the always-on ones are merged
        into its float weights."""
        q = {"group_size": 64, "bits": quantize} if quantize else None
        components = load(path_or_repo, dtype, vae_dtype, quantize=None if loras else q)
        pipe = cls(components)
        if loras and q and pipe.config.quantization:
            bits = pipe.config.quantization["bits"]
            raise ValueError(f"{path_or_repo} is already quantized ({bits} bits).")
        for entry in loras:
            pipe.load_lora(*((entry,) if isinstance(entry, (str, Path)) else entry))
        if loras and q:
            quantize_dit(pipe.dit, **q)
            pipe.config.quantization = q
            mx.eval(pipe.dit.parameters())
        return pipe

    def load_lora(
        self,
        path,
        strength: float = 1.0,
        interval: tuple = None,
        layer_filter: str = "",
    ):
        """Apply a LoRA or DoRA adapter file of stable-audio-tools 0.0.20 at `strength`,
        on top of those applied before (as 0.0.20 stacks them). With `interval` = (MIN,
        MAX) it is active only in the model evaluations whose noise level
        (DiT.noise_level, as for cfg_interval, in [0, 1]) is within it; `layer_filter`
        (comma-separated patterns, e.g. "transformer.layers.[0-11].", "to_global_embed")
        leaves the DiT layers whose stable-audio-tools names contain one alone. An
        adapter without an interval is merged into floating-point weights (no cost per
        step; load the model again to be rid of it); over a quantized DiT, or gated, it
        runs beside its layers."""
        lora.check_lora(path, strength, interval, layer_filter)
        adapter = lora.read_adapter(path, self.dit, self.conditioner)
        always = interval is None or tuple(interval) == (
            0,
            1,
        )  # all levels are in [0, 1]
        gate = None if always else tuple(interval)
        lora.apply_adapter(
            self.dit, self.conditioner, adapter, strength, gate, layer_filter
        )
        self.adapters.append(adapter.described(strength, interval, layer_filter))

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def window_seconds(self) -> float:
        return self.config.sample_size / self.config.sample_rate

    def latent_shape(self, batch_size: int = 1) -> tuple:
        """(B, T, C) of the latents of the model's window."""
        ratio = self.config.vae.downsampling_ratio
        return (
            batch_size,
            self.config.sample_size // ratio,
            self.config.dit.io_channels,
        )

    def settings(self, settings: Settings = None, **fields) -> Settings:
        """`settings` (default: Settings()) with `fields` replaced, checked for this
        model and resolved (every default filled in): an ArgumentError before any
        work."""
        settings = replace(settings, **fields) if settings else Settings(**fields)
        return settings.check(self.config)

    def condition(
        self,
        prompt: str,
        negative_prompt: str = None,
        seconds_start: float = 0.0,
        seconds_total: float = None,
        batch_size: int = 1,
    ) -> Conditioning:
        """Encode the prompt and the timing; afterwards T5 may be deleted
        (`del pipe.t5`)."""
        seconds_total = self.window_seconds if seconds_total is None else seconds_total
        seconds = dict(
            seconds_start=[seconds_start] * batch_size,
            seconds_total=[seconds_total] * batch_size,
        )
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
        *,
        settings: Settings = None,
        noise: mx.array = None,
        noise_sampler=None,
        init_latents: mx.array = None,
        inpaint: tuple = None,
        **fields,
    ):
        """Yield the latents (B, T, C) after each sampler step, on the model's full
        window, sampled as `settings` (with `fields` replaced; None: the model's
        defaults) say.

        `noise` (the initial N(0, 1) latents) and `noise_sampler(sigma, sigma_next)`
        (each stochastic step's N(0, 1) noise) default to draws from the seed. Guidance
        runs at the noise levels (DiT.noise_level) within cfg_interval; at the others
        the model runs once, unguided. `init_latents` (audio to audio) start sampling
        from those latents noised to sigma_max, as stable-audio-tools does. `inpaint` =
        (source latents, mask (T,), True where to regenerate): after every step the
        latents outside the mask are replaced by the source noised to the step's level,
        so they end exactly equal."""
        s = replace(settings or Settings(), **fields).resolved(self.config)
        objective = self.config.dit.objective
        shape = self.latent_shape(conditioning.cross.shape[0])
        seeded = samplers.seeded_noise(shape, s.seed, s.steps)
        noise = seeded[0] if noise is None else noise
        noise_sampler = noise_sampler or seeded[1]
        schedule = (s.steps, s.sigma_min, s.sigma_max, s.flow_schedule or "0.0.20")
        space, sigmas = samplers.schedule(objective, s.sampler, *schedule)
        plan = samplers.plan(objective, s.sampler, sigmas)
        used = samplers.used_terms(plan)
        guidance = (s.cfg_rescale, s.apg_scale, s.cfg_norm_threshold)
        low, high = s.cfg_interval

        def keep_source(x, sigma):
            if inpaint is None:
                return x
            source, regenerate = inpaint
            noised = samplers.noised(space, source, noise, sigma)
            return mx.where(regenerate[:, None], x, noised)

        # traced once per set of weights, and once more where a CFG interval leaves
        # some evaluations unguided
        evaluate = self._step(s.compile)
        dit_conditioning = self.dit.prepare_conditioning(*conditioning)  # every step's
        start = mx.zeros(shape) if init_latents is None else init_latents
        x = keep_source(samplers.noised(space, start, noise, sigmas[0]), sigmas[0])
        zeros = mx.zeros_like(x)
        state = (x, zeros, zeros, zeros)
        for (sigma, sigma_next), evaluations in zip(zip(sigmas, sigmas[1:]), plan):
            for k, t, draws_noise in evaluations:
                # draw only where the reference draws: a noise_sampler sees the same
                # calls
                step_noise = noise_sampler(sigma, sigma_next) if draws_noise else zeros
                w = s.cfg_scale if low <= self.dit.noise_level(t) <= high else 1.0
                k = mx.array(k)
                state = evaluate(
                    state, step_noise, k, used, dit_conditioning, w, *guidance
                )
            state = (keep_source(state[0], sigma_next), *state[1:])
            yield state[0]

    def encode(self, audio, sample_rate: int, noise: mx.array = None) -> mx.array:
        """Latents (1, T, C) of `audio` (see audio.prepare_audio): the posterior mean,
        or with `noise` (N(0, 1), shaped like the latents) a sample of the posterior."""
        size, channels = self.config.sample_size, self.config.vae.audio_channels
        audio = prepare_audio(audio, sample_rate, self.sample_rate, size, channels)
        audio = mx.array(audio.T[None]).astype(self.vae.encoder.layers[0].weight.dtype)
        return self.vae.encode(audio, noise).astype(mx.float32)

    def decode(self, latents: mx.array, chunk: int = None) -> mx.array:
        """Audio (B, channels, samples) from latents (B, T, C), decoded within a memory
        budget, a chunk at a time (see decoding.decode): equal to one-shot decoding."""
        return decoding.decode(self.vae, latents, chunk)

    def generate(
        self,
        prompt: str = None,
        *,
        settings: Settings = None,
        progress=None,
        phase=None,
        noise: mx.array = None,
        noise_sampler=None,
        **fields,
    ) -> mx.array:
        """Audio (batch_size, channels, samples) at `sample_rate`, cut to seconds_total,
        as `settings` (a Settings, with `fields` and the `prompt` replaced) say: one
        window (text to audio, a variation, an inpainting), a piece beyond the window or
        a continuation (long_form), or a seamless loop (loops).

        `progress(done, total)` is called after each sampler step (of every window or
        pass), `phase(name)` as each phase ends ("audio encoding" where audio is given,
        "text encoding", "sampling", "decoding"); an exception either raises stops the
        generation there (an interface's cancel). `noise` and `noise_sampler` are
        generate_latents', for one window."""
        if prompt is not None:
            fields["prompt"] = prompt
        s = self.settings(settings, **fields)
        phase = phase or (lambda name: None)
        if s.is_piece(self.config) or s.loop:
            if noise is not None or noise_sampler is not None:
                raise ValueError(
                    "noise and noise_sampler are for one window; a longer piece or a "
                    "loop draws each pass's from the seed."
                )
            mode = (Loop if s.loop else Piece)(self, s)
        else:
            mode = Window(self, s, noise, noise_sampler)
        return self._run(mode, progress, phase)

    def _run(self, mode, progress, phase) -> mx.array:
        encoded = mode.encode()
        if encoded:
            check_finite("audio encoding", *encoded)
            phase("audio encoding")
        check_finite("text encoding", *[c for cond in mode.condition() for c in cond])
        phase("text encoding")
        for done, x in enumerate(mode.sample(), 1):
            mx.eval(x)
            if progress is not None:
                progress(done, mode.steps)
        check_finite("sampling", mode.latents)
        phase("sampling")
        audio = mode.decode()
        check_finite("decoding", audio)
        phase("decoding")
        return audio


def _evaluate(dit, state, noise, k, used, dit_conditioning, cfg_scale, *guidance):
    """One guided model evaluation and sampler update (see sampler.evaluate)."""

    def model(x, t):
        return guide(dit, x, t, dit_conditioning, cfg_scale, *guidance)

    return samplers.evaluate(model, state, noise, k, used)


def limit_memory(headroom: float = 0.5) -> int:
    """Bound MLX's memory to what is in use now plus `headroom` GB; returns the old
    limit.

    MLX runs ahead of the GPU, and the buffers of freed intermediates stay allocated
    until the GPU has passed them; at its limit MLX waits for pending work instead. Call
    this once the weights that generation needs are loaded (and T5 freed)."""
    return mx.set_memory_limit(mx.get_active_memory() + int(headroom * 1e9))


def check_finite(stage: str, *arrays):
    """Raise FloatingPointError, naming the stage, if any of `arrays` (None: skipped)
    holds NaN or Inf."""
    if not all(mx.all(mx.isfinite(x)).item() for x in arrays if x is not None):
        raise FloatingPointError(
            f"{stage.capitalize()} produced NaN or Inf values; nothing was written. "
            "float16 can overflow: try --dtype float32 or bfloat16 (or --vae-dtype "
            "float32)."
        )

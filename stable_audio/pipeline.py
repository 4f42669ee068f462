"""The text-to-audio pipeline: conditioning, sampling with guidance, decoding, and the checks
of its arguments."""

import math
import secrets
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from . import long_form, loops, lora
from . import sampler as samplers
from .audio import prepare_audio
from .model_io import DEFAULT_REPO, Config, load, quantize_dit


class Conditioning(NamedTuple):
    cross: mx.array  # (B, tokens, cond_dim): text, then the seconds tokens
    global_cond: mx.array  # (B, global_cond_dim): the seconds embeddings side by side
    negative_cross: mx.array = None  # the negative prompt's tokens, if any


# What each objective's released model is run with: SAO 1.0 (v; its model card's recipe) and
# SAO Small (rectified flow, post-trained for 8 ping-pong steps without guidance)
DEFAULTS = {
    "v": dict(steps=100, cfg_scale=7.0, sampler="dpmpp-3m-sde", sigma_min=0.3, sigma_max=500.0),
    "rf_denoiser": dict(steps=8, cfg_scale=1.0, sampler="pingpong", sigma_min=None, sigma_max=1.0),
}
# Samplers that count time (v-DDIM, "euler" on a v model, every flow sampler) start at t = 1
TIME_DEFAULTS = dict(sigma_min=None, sigma_max=1.0)
# Guidance as stable-audio-tools 0.0.20 takes it; these defaults are plain CFG
GUIDANCE = dict(cfg_rescale=0.0, apg_scale=0.0, cfg_norm_threshold=0.0, cfg_interval=(0.0, 1.0))


MAX_STEPS, MAX_BATCH = 10_000, 64


class ArgumentError(ValueError):
    """A one-line ValueError that names the argument at fault (None: no single one), so that
    an interface can show the message beside that argument's field."""

    def __init__(self, message: str, argument: str = None):
        super().__init__(message)
        self.argument = argument
MAX_SIGMA = 1e6  # beyond it, unit-scale latents vanish below float32 precision in the noise


def settings(config: Config, **given) -> dict:
    """`given`, each None replaced by the model's default (for its sampler)."""
    objective = config.dit.objective
    defaults = DEFAULTS[objective]
    sampler = given.get("sampler") or defaults["sampler"]
    if sampler in samplers.samplers_for(objective) and not samplers.uses_sigma_min(objective, sampler):
        defaults = {**defaults, **TIME_DEFAULTS}
    return {k: defaults[k] if v is None else v for k, v in given.items()}


def check_arguments(
    config: Config,
    seconds_start: float = 0.0,
    seconds_total: float = None,
    steps: int = None,
    cfg_scale: float = None,
    sampler: str = None,
    sigma_min: float = None,
    sigma_max: float = None,
    batch_size: int = 1,
    inpaint_ranges: tuple = (),
    seed: int = None,
    cfg_rescale: float = 0.0,
    apg_scale: float = 0.0,
    cfg_norm_threshold: float = 0.0,
    cfg_interval: tuple = (0.0, 1.0),
    flow_schedule: str = None,
):
    """Refuse, with a one-line ArgumentError (a ValueError), what the model or the samplers cannot do. None
    stands for the model's default; with init audio, sigma_max is its noise level. Steps
    and batch size are bounded too, so that absurd values fail here, not out of memory."""
    s = settings(config, steps=steps, cfg_scale=cfg_scale, sampler=sampler, sigma_min=sigma_min, sigma_max=sigma_max)
    objective = config.dit.objective
    names = samplers.samplers_for(objective)
    if s["sampler"] in samplers.UNSUPPORTED:
        raise ArgumentError(f"The {s['sampler']} sampler is not offered (its steps are adaptive); choose one of {', '.join(names)}.", "sampler")
    if s["sampler"] not in names:
        raise ArgumentError(f"Unknown sampler {s['sampler']!r} for this model; choose one of {', '.join(names)}.", "sampler")
    counts_noise = samplers.uses_sigma_min(objective, s["sampler"])
    window = config.sample_size / config.sample_rate
    total = window if seconds_total is None else seconds_total
    start_max = config.conditioner.numbers.get("seconds_start", (0, 0))[1]  # 0: not conditioned on it
    longest = max(config.conditioner.numbers.get("seconds_total", (0, window))[1], window)
    numbers = dict(
        seconds_start=[seconds_start], seconds_total=[total], cfg_scale=[s["cfg_scale"]], sigma_max=[s["sigma_max"]],
        sigma_min=[] if s["sigma_min"] is None else [s["sigma_min"]], cfg_rescale=[cfg_rescale], apg_scale=[apg_scale],
        cfg_norm_threshold=[cfg_norm_threshold], cfg_interval=list(cfg_interval), inpaint_ranges=[t for r in inpaint_ranges for t in r],
    )
    for argument, values in numbers.items():
        if not all(math.isfinite(v) for v in values):
            raise ArgumentError("Numbers must be finite.", argument)
    low, high = cfg_interval
    problems = [  # (failed, the argument at fault, message)
        (not (0 < total <= longest + 1e-9 and total * config.sample_rate >= config.vae.downsampling_ratio), "seconds_total", f"seconds_total must be in [{config.vae.downsampling_ratio / config.sample_rate:.3g}, {longest:g}] (one latent to the range of the model's seconds; beyond its window, {window:.2f} s, a piece is made window by window)"),
        (total > window + 1e-9 and seconds_start != 0, "seconds_start", "seconds_start applies within one window; a longer piece sets each window's itself"),
        (not 0 <= seconds_start <= start_max, "seconds_start", f"seconds_start must be in [0, {start_max:g}] for this model"),
        (not 1 <= s["steps"] <= MAX_STEPS, "steps", f"steps must be in [1, {MAX_STEPS}]"),
        (not counts_noise and s["sigma_min"] is not None, "sigma_min", f"sigma_min does not apply to the {s['sampler']} sampler (its schedule runs in time down to 0)"),
        (not counts_noise and not 0 < s["sigma_max"] <= 1, "sigma_max", f"the noise level (sigma_max, init noise level) must be in (0, 1] for the {s['sampler']} sampler"),
        (counts_noise and not 0 < s["sigma_min"] < s["sigma_max"] <= MAX_SIGMA, "sigma_max", f"the noise levels must satisfy 0 < sigma_min < sigma_max <= {MAX_SIGMA:g} (the init noise level is sigma_max)"),
        (not 0 <= apg_scale <= 1, "apg_scale", "apg_scale must be in [0, 1]"),
        (cfg_norm_threshold < 0, "cfg_norm_threshold", "cfg_norm_threshold must be >= 0 (0: no threshold)"),
        (not 0 <= cfg_rescale <= 1, "cfg_rescale", "cfg_rescale must be in [0, 1]"),
        (not 0 <= low <= high <= 1, "cfg_interval", "the CFG interval must satisfy 0 <= MIN <= MAX <= 1 (noise levels: sin(pi t / 2) for v models, t for flow)"),
        (flow_schedule is not None and objective == "v", "flow_schedule", "the flow schedule applies to rectified-flow models only"),
        (flow_schedule not in (None, *samplers.LOGSNR_SCHEDULES), "flow_schedule", f"unknown flow schedule {flow_schedule!r}; choose one of {', '.join(samplers.LOGSNR_SCHEDULES)}"),
        (not 1 <= batch_size <= MAX_BATCH, "batch_size", f"the number of audios must be in [1, {MAX_BATCH}]"),
        (seed is not None and not 0 <= seed < 2**64, "seed", "the seed must be in [0, 2**64)"),
        (any(not 0 <= a < b <= window + 1e-9 for a, b in inpaint_ranges), "inpaint_ranges", f"inpaint ranges must satisfy 0 <= start < end <= {window:.2f}"),
    ]
    for failed, argument, message in problems:
        if failed:
            raise ArgumentError(message + ".", argument)


def check_lora(path, strength: float = 1.0, interval: tuple = None, layer_filter: str = ""):
    """Refuse, with a one-line ValueError, an adapter file that is not there or a setting
    that cannot apply (the file itself is checked when read, against the model)."""
    if not Path(path).is_file():
        raise ValueError(f"The adapter file {path} does not exist." if not Path(path).exists() else f"The adapter {path} is not a file.")
    if not (type(strength) in (int, float) and math.isfinite(strength)):
        raise ValueError(f"The LoRA strength must be a finite number, not {strength!r}.")
    if interval is not None and not (len(interval) == 2 and all(math.isfinite(v) for v in interval) and 0 <= interval[0] <= interval[1] <= 1):
        raise ValueError("The LoRA interval must satisfy 0 <= MIN <= MAX <= 1 (noise levels: sin(pi t / 2) for v models, t for flow).")
    if not isinstance(layer_filter, str):
        raise ValueError("The LoRA layer filter must be a string of comma-separated patterns.")


# The most memory decoding takes beyond the decoder's weights, by choice: 47 s decode in
# 3 chunks in float32 (2 in float16). One shot in float32 needs 8.6 GB, and ran out of
# memory with true float32 convolutions on an H200 (cuDNN's workspace); the gain is small
# (0.063 -> 0.059 s at 2 -> 1 chunks, float32, H200).
DECODE_BUDGET = 4e9


class StableAudio:
    """Text to audio with Stable Audio Open: T5, the DiT with a k-diffusion sampler, the VAE."""

    def __init__(self, components):
        self.config = components.config
        self.tokenizer = components.tokenizer
        self.t5 = components.t5
        self.conditioner = components.conditioner
        self.dit = components.dit
        self.vae = components.vae
        self.adapters = []  # what load_lora applied, in order

    @classmethod
    def from_pretrained(
        cls, path_or_repo: str = DEFAULT_REPO, dtype=None, vae_dtype=mx.float32, quantize: int = None, loras=()
    ):
        """A converted folder, a released-layout folder, or a Hub repo id. `dtype` is for T5
        and the DiT (None: as stored); `quantize` (4 or 8) quantizes a float DiT's blocks.
        `loras`: adapter files, each a path or a tuple of load_lora's arguments (path,
        strength, interval, layer_filter), applied in order; with `quantize`, before the
        DiT is quantized, so that the always-on ones are merged into its float weights."""
        q = {"group_size": 64, "bits": quantize} if quantize else None
        pipe = cls(load(path_or_repo, dtype=dtype, vae_dtype=vae_dtype, quantize=None if loras else q))
        if loras and q and pipe.config.quantization:
            raise ValueError(f"{path_or_repo} is already quantized ({pipe.config.quantization['bits']} bits).")
        for entry in loras:
            pipe.load_lora(*((entry,) if isinstance(entry, (str, Path)) else entry))
        if loras and q:
            quantize_dit(pipe.dit, **q)
            pipe.config.quantization = q
            mx.eval(pipe.dit.parameters())
        return pipe

    def load_lora(self, path, strength: float = 1.0, interval: tuple = None, layer_filter: str = ""):
        """Apply a LoRA or DoRA adapter file of stable-audio-tools 0.0.20 at `strength`, on
        top of those applied before (as 0.0.20 stacks them). With `interval` = (MIN, MAX)
        it is active only in the model evaluations whose noise level (DiT.noise_level, as
        for cfg_interval, in [0, 1]) is within it; `layer_filter` (comma-separated patterns, e.g.
        "transformer.layers.[0-11].", "to_global_embed") leaves the DiT layers whose
        stable-audio-tools names contain one alone. An adapter without an interval is
        merged into floating-point weights (no cost per step; load the model again to be
        rid of it); over a quantized DiT, or gated, it runs beside its layers."""
        check_lora(path, strength, interval, layer_filter)
        adapter = lora.read_adapter(path, self.dit, self.conditioner)
        always = interval is None or tuple(interval) == (0, 1)  # every noise level is in [0, 1]
        lora.apply_adapter(self.dit, self.conditioner, adapter, strength, None if always else tuple(interval), layer_filter)
        self.adapters.append(
            {"file": Path(path).name, "adapter_type": adapter.adapter_type, "rank": adapter.rank,
             "alpha": adapter.alpha, "strength": strength, "interval": interval, "layer_filter": layer_filter}
        )

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

    def latent_shape(self, batch_size: int = 1) -> tuple:
        """(B, T, C) of the latents of the model's window."""
        ratio = self.config.vae.downsampling_ratio
        return (batch_size, self.config.sample_size // ratio, self.config.dit.io_channels)

    def generate_latents(
        self,
        conditioning: Conditioning,
        steps: int = None,
        cfg_scale: float = None,
        sampler: str = None,
        sigma_min: float = None,
        sigma_max: float = None,
        seed: int = None,
        cfg_rescale: float = 0.0,
        noise: mx.array = None,
        noise_sampler=None,
        compile: bool = False,
        init_latents: mx.array = None,
        inpaint: tuple = None,
        apg_scale: float = 0.0,
        cfg_norm_threshold: float = 0.0,
        cfg_interval: tuple = (0.0, 1.0),
        flow_schedule: str = None,
    ):
        """Yield the latents (B, T, C) after each sampler step, on the model's full window.

        None stands for the model's default (DEFAULTS). `noise` (the initial N(0, 1)
        latents) and `noise_sampler(sigma, sigma_next)` (each stochastic step's N(0, 1)
        noise) default to draws from `seed`. With `compile`, each model evaluation (DiT,
        guidance and sampler update) runs as one compiled function.

        Guidance is stable-audio-tools 0.0.20's (DiT.guide): `apg_scale`,
        `cfg_norm_threshold` and `cfg_rescale` as there, and `cfg_interval` = (MIN, MAX),
        the noise levels (DiT.noise_level) at which guidance runs; at the others the model
        runs once, unguided. `flow_schedule` names a flow model's schedule ("0.0.20", the
        default, or "0.0.19").

        `init_latents` (audio to audio) start sampling from those latents noised to
        `sigma_max`, as stable-audio-tools does. `inpaint` = (source latents, mask (T,),
        True where to regenerate): after every step the latents outside the mask are
        replaced by the source noised to the step's level, so they end exactly equal.
        """
        s = settings(self.config, steps=steps, cfg_scale=cfg_scale, sampler=sampler, sigma_min=sigma_min, sigma_max=sigma_max)
        objective = self.config.dit.objective
        shape = self.latent_shape(conditioning.cross.shape[0])
        seed = secrets.randbits(32) if seed is None else seed
        init_key, step_key = mx.random.split(mx.random.key(seed))
        if noise is None:
            noise = mx.random.normal(shape, key=init_key)
        if noise_sampler is None:
            step_keys = iter(mx.random.split(step_key, s["steps"]))
            noise_sampler = lambda sigma, sigma_next: mx.random.normal(shape, key=next(step_keys))

        space, sigmas = samplers.schedule(
            objective, s["sampler"], s["steps"], s["sigma_min"], s["sigma_max"], flow_schedule or "0.0.20"
        )
        plan = samplers.plan(objective, s["sampler"], sigmas)
        used = samplers.used_terms(plan)
        guidance = (cfg_rescale, apg_scale, cfg_norm_threshold)
        low, high = cfg_interval

        def keep_source(x, sigma):
            if inpaint is None:
                return x
            source, regenerate = inpaint
            return mx.where(regenerate[:, None], x, samplers.noised(space, source, noise, sigma))

        # compiled per generation: a cached compiled function would keep the DiT's
        # weights alive after `del pipe.dit`. It is traced once, or twice where a CFG
        # interval leaves some evaluations unguided.
        evaluate = mx.compile(self._evaluate) if compile else self._evaluate
        dit_conditioning = self.dit.prepare_conditioning(*conditioning)  # the same at every step
        start = mx.zeros(shape) if init_latents is None else init_latents
        x = keep_source(samplers.noised(space, start, noise, sigmas[0]), sigmas[0])
        zeros = mx.zeros_like(x)
        state = (x, zeros, zeros, zeros)
        for (sigma, sigma_next), evaluations in zip(zip(sigmas, sigmas[1:]), plan):
            for k, t, draws_noise in evaluations:
                # draw only where the reference draws, so that a noise_sampler sees the same calls
                step_noise = noise_sampler(sigma, sigma_next) if draws_noise else zeros
                w = s["cfg_scale"] if low <= self.dit.noise_level(t) <= high else 1.0
                state = evaluate(state, step_noise, mx.array(k), used, dit_conditioning, w, *guidance)
            state = (keep_source(state[0], sigma_next), *state[1:])
            yield state[0]

    def _evaluate(self, state, noise, k, used, dit_conditioning, cfg_scale, cfg_rescale, apg_scale, cfg_norm_threshold):
        def model(x, t):
            return self.dit.guide(x, t, dit_conditioning, cfg_scale, cfg_rescale, apg_scale, cfg_norm_threshold)

        return samplers.evaluate(model, state, noise, k, used)

    def encode(self, audio, sample_rate: int, noise: mx.array = None) -> mx.array:
        """Latents (1, T, C) of `audio` (see audio.prepare_audio): the posterior mean, or with
        `noise` (N(0, 1), shaped like the latents) a sample of the posterior."""
        size, channels = self.config.sample_size, self.config.vae.audio_channels
        prepared = mx.array(prepare_audio(audio, sample_rate, self.sample_rate, size, channels).T[None])
        latents = self.vae.encode(prepared.astype(self.vae.encoder.layers[0].weight.dtype), noise)
        return latents.astype(mx.float32)

    def init_latents(self, audio, sample_rate: int, seed: int) -> mx.array:
        """Init audio's latents as stable-audio-tools makes them: a sample of the posterior
        (its noise drawn from `seed`)."""
        key = mx.random.split(mx.random.key(seed), 3)[2]  # unlike generate_latents' two
        return self.encode(audio, sample_rate, mx.random.normal(self.latent_shape(1), key=key))

    def inpaint_source(self, audio, sample_rate: int, ranges) -> tuple:
        """generate_latents' `inpaint`: the posterior mean of `audio` (its most faithful
        latents) and the mask of the latents that overlap the (start, end) `ranges` in
        seconds, which are regenerated."""
        T, ratio = self.latent_shape()[1], self.config.vae.downsampling_ratio
        regenerate = np.zeros(T, dtype=bool)
        for start, end in ranges:
            lo = math.floor(start * self.sample_rate / ratio)
            hi = math.ceil(end * self.sample_rate / ratio)
            regenerate[lo:hi] = True
        return self.encode(audio, sample_rate), mx.array(regenerate)

    def encode_whole(self, audio, sample_rate: int) -> mx.array:
        """Latents (1, T, C) of all of `audio` (any length; the posterior mean, encoded a few
        latents at a time), T its whole latents: a partial last one is left out."""
        ratio, channels = self.config.vae.downsampling_ratio, self.config.vae.audio_channels
        audio = np.asarray(audio, dtype=np.float32)
        length = math.ceil((audio[None] if audio.ndim == 1 else audio).shape[-1] * self.sample_rate / sample_rate)
        length -= length % ratio
        if length == 0:
            raise ValueError(f"The audio is shorter than one latent ({ratio} samples at {self.sample_rate} Hz).")
        prepared = mx.array(prepare_audio(audio, sample_rate, self.sample_rate, length, channels).T[None])
        mean, _ = self.vae.posterior(prepared.astype(self.vae.encoder.layers[0].weight.dtype), chunk=128)
        return mean.astype(mx.float32)

    def piece_windows(self, seconds_total: float, overlap: float = None, made: int = 0) -> list:
        """long_form.plan_windows for a piece of `seconds_total` with `overlap` seconds
        kept from one window to the next (default: a quarter of the window), after `made`
        latents already there (a continuation)."""
        ratio, window = self.config.vae.downsampling_ratio, self.latent_shape()[1]
        overlap = round(window * ratio / self.sample_rate / 4) if overlap is None else overlap
        kept = round(overlap * self.sample_rate / ratio)
        if not (math.isfinite(overlap) and 0 <= kept < window):
            raise ArgumentError(f"The overlap must be in [0, {self.window_seconds:.2f}) seconds, leaving part of each window to generate.", "overlap")
        total = math.ceil(round(seconds_total * self.sample_rate) / ratio)
        if made >= total:
            raise ArgumentError(f"seconds_total ({seconds_total:g} s) must be longer than the audio it continues ({made * ratio / self.sample_rate:.2f} s).", "seconds_total")
        return long_form.plan_windows(total, window, kept, made)

    def piece_conditioning(self, prompt: str, negative_prompt: str, windows: list, seconds_total: float, batch_size: int = 1) -> list:
        """Each window's Conditioning, its timing as long_form.timing says."""
        samples, ratio = round(seconds_total * self.sample_rate), self.config.vae.downsampling_ratio
        return [
            self.condition(prompt, negative_prompt, batch_size=batch_size, **long_form.timing(start, samples, ratio, self.sample_rate))
            for start, _ in windows
        ]

    def piece_latents(self, windows: list, batch_size: int = 1, made: mx.array = None) -> mx.array:
        """The latents generate_piece_latents fills: zeros over every window, with `made`
        (a continued file's latents) at the start."""
        piece = mx.zeros((batch_size, windows[-1][0] + self.latent_shape()[1], self.config.dit.io_channels))
        if made is not None:
            piece[:, : made.shape[1]] = made
        return piece

    def loop_latents(self, samples: int, batch_size: int = 1) -> mx.array:
        """The latents generate_loop_latents fills for a loop of `samples` samples: the
        nearest whole number of latents (decode_loop resamples to the exact length)."""
        length = max(round(samples / self.config.vae.downsampling_ratio), 1)
        return mx.zeros((batch_size, length, self.config.dit.io_channels))

    def generate_piece_latents(self, conditionings: list, windows: list, piece: mx.array, seed: int, **sampling):
        """Fill `piece` (B, T, C; its first latents those of a file being continued, if
        any) window by window (see long_form): window i is sampled with seed + i, keeping
        its first `keep` latents as the inpainting source. Yields each window's latents
        after every sampler step; `piece` holds the result at the end."""
        window = self.latent_shape()[1]
        for i, ((start, keep), conditioning) in enumerate(zip(windows, conditionings)):
            inpaint = None
            if keep:
                inpaint = (piece[:, start : start + window], mx.arange(window) >= keep)
            for x in self.generate_latents(conditioning, seed=(seed + i) % 2**64, inpaint=inpaint, **sampling):
                yield x
            piece[:, start + keep : start + window] = x[:, keep:]

    def generate_loop_latents(self, conditioning, clip: mx.array, seed: int, **sampling):
        """Fill `clip` (B, L, C), L at most the window's latents, with a loop (see loops):
        a window sampled with `seed`, then, turned half round, its seam regenerated with
        seed + 1. Yields the latents after every sampler step of both passes."""
        length, window = clip.shape[1], self.latent_shape()[1]
        for x in self.generate_latents(conditioning, seed=seed, **sampling):
            yield x
        half = length // 2
        turned = mx.concatenate([x[:, half:length], x[:, :half], x[:, length:]], axis=1)
        seam = (turned, mx.array(loops.seam_mask(length, window)))
        for y in self.generate_latents(conditioning, seed=(seed + 1) % 2**64, inpaint=seam, **sampling):
            yield y
        clip[:] = mx.concatenate([y[:, length - half : length], y[:, : length - half]], axis=1)

    def decode_loop(self, clip: mx.array, samples: int) -> np.ndarray:
        """Audio (B, channels, `samples`) of a loop's latents (B, L, C): decoded circularly,
        then resampled to exactly `samples` (see loops)."""
        length, ratio = clip.shape[1], self.config.vae.downsampling_ratio
        context = self.config.vae.decoder_context
        around = clip[:, mx.array(loops.circular_indices(length, context))]
        audio = np.array(self.decode(around)[..., context * ratio : (context + length) * ratio])
        return np.stack([loops.stretch(a, samples) for a in audio])

    def decode_chunk(self, length: int) -> int:
        """How many latents decode() decodes at once: all `length` if they fit in half the
        memory still free (at most DECODE_BUDGET bytes), else as few equal chunks as fit;
        chunks of about 128 latents when little is free (as under --low-memory)."""
        vae = self.config.vae
        dtype = self.vae.decoder.layers[0].weight.dtype
        # the decoder's peak grows by ~8 full-rate activations a latent: measured 8.1 MB
        # (float32) and 3.5 MB (float16) for SAO 1.0 on an H200
        per_latent = 9 * vae.channels * vae.downsampling_ratio * dtype.size
        info = mx.device_info()
        memory = min(mx.get_memory_limit(), info.get("max_recommended_working_set_size") or info.get("memory_size") or math.inf)
        budget = min((memory - mx.get_active_memory()) / 2, DECODE_BUDGET)
        fits = max(int(budget // per_latent), 128)
        chunks = -(-length // fits)
        return -(-length // chunks)

    def decode(self, latents: mx.array, chunk: int = None) -> mx.array:
        """Audio (B, channels, samples) from latents (B, T, C), decoded one batch item and
        `chunk` latents (default: decode_chunk(T)) at a time. Each chunk is decoded with as
        many extra latents on each side as the decoder's receptive field reaches (11 for
        SAO 1.0), then those are cut off again: the result equals one-shot decoding, and
        memory does not grow with T."""
        ratio, overlap = self.config.vae.downsampling_ratio, self.config.vae.decoder_context
        chunk = chunk or self.decode_chunk(latents.shape[1])
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

    def check_generate(
        self, seconds_total: float = None, init: bool = False, init_noise_level: float = 1.0, inpaint: bool = False,
        inpaint_ranges: tuple = (), continued: bool = False, overlap: float = None, loop: bool = False, **arguments
    ):
        """generate()'s checks, without generating: an ArgumentError for what it would refuse
        before any work. `init`, `inpaint` and `continued` say which audio would be given;
        `arguments` are check_arguments' (sigma_max, seed, steps, ...)."""
        seconds_total = self.window_seconds if seconds_total is None else seconds_total
        if init and inpaint:
            raise ArgumentError("Give init audio or inpaint audio, not both.")
        piece = continued or seconds_total > self.window_seconds + 1e-9
        if piece and (init or inpaint):
            raise ArgumentError("Init and inpaint audio work within one window: a longer piece or a continuation takes neither.", "seconds_total")
        if loop and (piece or init or inpaint):
            raise ArgumentError(f"A loop is made within one window ({self.window_seconds:.2f} s), from nothing but the prompt.", "loop")
        if inpaint and not inpaint_ranges:
            raise ArgumentError("Inpainting needs at least one range to regenerate.", "inpaint_ranges")
        if init:
            arguments["sigma_max"] = init_noise_level
        check_arguments(self.config, seconds_total=seconds_total, inpaint_ranges=inpaint_ranges, **arguments)
        if piece and not continued:  # a continuation's own length is known once it is encoded
            self.piece_windows(seconds_total, overlap)

    def generate(
        self,
        prompt: str,
        negative_prompt: str = None,
        seconds_start: float = 0.0,
        seconds_total: float = None,
        steps: int = None,
        cfg_scale: float = None,
        sampler: str = None,
        sigma_min: float = None,
        sigma_max: float = None,
        seed: int = None,
        batch_size: int = 1,
        cfg_rescale: float = 0.0,
        noise: mx.array = None,
        noise_sampler=None,
        compile: bool = False,
        init_audio: tuple = None,
        init_noise_level: float = 1.0,
        inpaint_audio: tuple = None,
        inpaint_ranges: tuple = (),
        apg_scale: float = 0.0,
        cfg_norm_threshold: float = 0.0,
        cfg_interval: tuple = (0.0, 1.0),
        flow_schedule: str = None,
        continue_audio: tuple = None,
        overlap: float = None,
        loop: bool = False,
        progress=None,
    ) -> mx.array:
        """Audio (batch_size, channels, samples) at `sample_rate`, cut to `seconds_total`.

        A `seconds_total` beyond the model's window (up to the range of its seconds
        conditions: 512 s for SAO 1.0) is made window by window, each keeping `overlap`
        seconds of the one before (default: a quarter of the window; see long_form).
        `continue_audio` = (sample_rate, samples) extends that audio to `seconds_total`
        the same way, its end kept by the first window. `loop` makes a clip of exactly
        `seconds_total` (within the window) whose end flows into its start (see loops).

        None stands for the model's default (DEFAULTS); guidance and `flow_schedule` are
        as in generate_latents. `init_audio` = (sample_rate,
        samples (channels, n) or (n,)) makes a variation of that audio: sampling starts
        from its latents noised to `init_noise_level` (which replaces sigma_max).
        `inpaint_audio` = (sample_rate, samples) regenerates the (start, end) seconds of
        `inpaint_ranges` and keeps the rest.

        `progress(done, total)` is called after each sampler step (of every window or
        pass); an exception it raises stops the generation there (an interface's cancel)."""
        seconds_total = self.window_seconds if seconds_total is None else seconds_total
        piece = continue_audio is not None or seconds_total > self.window_seconds + 1e-9
        self.check_generate(
            seconds_start=seconds_start, seconds_total=seconds_total, steps=steps, cfg_scale=cfg_scale, sampler=sampler,
            sigma_min=sigma_min, sigma_max=sigma_max, seed=seed, batch_size=batch_size, cfg_rescale=cfg_rescale,
            init=init_audio is not None, init_noise_level=init_noise_level, inpaint=inpaint_audio is not None,
            inpaint_ranges=inpaint_ranges, apg_scale=apg_scale, cfg_norm_threshold=cfg_norm_threshold,
            cfg_interval=cfg_interval, flow_schedule=flow_schedule, continued=continue_audio is not None,
            overlap=overlap, loop=loop,
        )
        if init_audio is not None:
            sigma_max = init_noise_level
        seed = secrets.randbits(32) if seed is None else seed
        sampling = dict(
            steps=steps, cfg_scale=cfg_scale, sampler=sampler, sigma_min=sigma_min, sigma_max=sigma_max, cfg_rescale=cfg_rescale,
            compile=compile, apg_scale=apg_scale, cfg_norm_threshold=cfg_norm_threshold, cfg_interval=cfg_interval, flow_schedule=flow_schedule,
        )
        steps_per_pass = settings(self.config, steps=steps)["steps"]

        def run(latents, total):
            for done, x in enumerate(latents, 1):
                mx.eval(x)
                if progress is not None:
                    progress(done, total)
            return x

        if piece:
            if noise is not None or noise_sampler is not None:
                raise ValueError("noise and noise_sampler are for one window; a longer piece draws each window's from the seed.")
            made = None if continue_audio is None else self.encode_whole(continue_audio[1], continue_audio[0])
            windows = self.piece_windows(seconds_total, overlap, 0 if made is None else made.shape[1])
            conditionings = self.piece_conditioning(prompt, negative_prompt, windows, seconds_total, batch_size)
            latents = self.piece_latents(windows, batch_size, made)
            run(self.generate_piece_latents(conditionings, windows, latents, seed, **sampling), steps_per_pass * len(windows))
            check_finite("sampling", latents)
            audio = self.decode(latents)
            check_finite("decoding", audio)
            return audio[..., : round(seconds_total * self.sample_rate)]
        if loop:
            if noise is not None or noise_sampler is not None:
                raise ValueError("noise and noise_sampler are for one pass; a loop draws its two passes' from the seed.")
            samples = round(seconds_total * self.sample_rate)
            clip = self.loop_latents(samples, batch_size)
            conditioning = self.condition(prompt, negative_prompt, seconds_start, samples / self.sample_rate, batch_size)
            run(self.generate_loop_latents(conditioning, clip, seed, **sampling), steps_per_pass * 2)
            check_finite("sampling", clip)
            return mx.array(self.decode_loop(clip, samples))
        init_latents = inpaint = None
        if init_audio is not None:
            rate, samples = init_audio
            init_latents = self.init_latents(samples, rate, seed)
        if inpaint_audio is not None:
            rate, samples = inpaint_audio
            inpaint = self.inpaint_source(samples, rate, inpaint_ranges)
        check_finite("audio encoding", init_latents, None if inpaint is None else inpaint[0])
        conditioning = self.condition(prompt, negative_prompt, seconds_start, seconds_total, batch_size)
        check_finite("text encoding", *conditioning)
        latents = run(self.generate_latents(
            conditioning, seed=seed, noise=noise, noise_sampler=noise_sampler, init_latents=init_latents, inpaint=inpaint, **sampling
        ), steps_per_pass)
        check_finite("sampling", latents)
        audio = self.decode(latents)
        check_finite("decoding", audio)
        return audio[..., : round(seconds_total * self.sample_rate)]


def limit_memory(headroom: float = 0.5) -> int:
    """Bound MLX's memory to what is in use now plus `headroom` GB; returns the old limit.

    MLX runs ahead of the GPU, and the buffers of freed intermediates stay allocated
    until the GPU has passed them; at its limit MLX waits for pending work instead. Call
    this once the weights that generation needs are loaded (and T5 freed)."""
    return mx.set_memory_limit(mx.get_active_memory() + int(headroom * 1e9))


def check_finite(stage: str, *arrays):
    """Raise FloatingPointError, naming the stage, if any of `arrays` (None: skipped) holds
    NaN or Inf."""
    if not all(mx.all(mx.isfinite(x)).item() for x in arrays if x is not None):
        raise FloatingPointError(
            f"{stage.capitalize()} produced NaN or Inf values; nothing was written. float16 "
            "can overflow: try --dtype float32 or bfloat16 (or --vae-dtype float32)."
        )

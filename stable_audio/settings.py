"""The settings of one generation: what it takes, each model's defaults, and the one
check that the Python API, txt2audio.py and app.py all run before any work."""

import math
import os
import secrets
from dataclasses import dataclass, fields, replace

import numpy as np

from . import sampler as samplers
from .audio import read_audio
from .loops import loop_samples
from .t5 import check_prompt

# What each objective's released model is run with: SAO 1.0 (v; its model card's
# recipe) and SAO Small (rectified flow, post-trained for 8 ping-pong steps, unguided)
DEFAULTS = {
    "v": dict(
        steps=100, cfg_scale=7.0, sampler="dpmpp-3m-sde", sigma_min=0.3, sigma_max=500.0
    ),
    "rf_denoiser": dict(
        steps=8, cfg_scale=1.0, sampler="pingpong", sigma_min=None, sigma_max=1.0
    ),
}
# Samplers that count time (v-DDIM, "euler" on a v model, every flow sampler) start at 1
TIME_DEFAULTS = dict(sigma_min=None, sigma_max=1.0)
MAX_STEPS, MAX_BATCH = 10_000, 64
MAX_SIGMA = 1e6  # beyond it, unit-scale latents vanish below float32 precision
INTERVAL_UNITS = "noise levels: sin(pi t / 2) for v models, t for flow"


class ArgumentError(ValueError):
    """A one-line ValueError that names the setting at fault (None: no single one), so
    that an interface can show the message beside that setting's field."""

    def __init__(self, message: str, argument: str = None):
        super().__init__(message)
        self.argument = argument


@dataclass
class Settings:
    """One generation. None stands for the model's default (DEFAULTS). Audio is given as
    (sample_rate, samples (channels, n) or (n,)), or as a file's path, which check()
    reads (only the part that is used)."""

    prompt: str = ""
    negative_prompt: str = None
    # length and mode
    seconds_start: float = 0.0
    seconds_total: float = None  # beyond the window: a piece, made window by window
    overlap: float = None  # seconds each window of a piece keeps (default: a quarter)
    continue_audio: tuple = None  # extended to seconds_total
    init_audio: tuple = None  # varied: sampling starts from it, noised
    init_noise_level: float = 1.0  # replaces sigma_max
    inpaint_audio: tuple = None  # kept, but for inpaint_ranges
    inpaint_ranges: tuple = ()  # (start, end) seconds to regenerate
    loop: bool = False  # a seamless loop of seconds_total, or of bars at bpm
    bpm: float = None
    bars: int = None
    beats_per_bar: int = 4
    # sampler and schedule
    steps: int = None
    sampler: str = None
    sigma_min: float = None
    sigma_max: float = None
    flow_schedule: str = None  # a flow model's: "0.0.20" (None) or "0.0.19"
    # guidance (stable-audio-tools 0.0.20's; the defaults are plain CFG)
    cfg_scale: float = None
    cfg_rescale: float = 0.0
    apg_scale: float = 0.0
    cfg_norm_threshold: float = 0.0
    cfg_interval: tuple = (0.0, 1.0)  # guide only at noise levels in [MIN, MAX]
    # seed and batch
    seed: int = None  # None: a random one
    batch_size: int = 1
    compile: bool = False  # each model evaluation as one compiled function

    def window_seconds(self, config) -> float:
        return config.sample_size / config.sample_rate

    def is_piece(self, config) -> bool:
        """Whether it is made window by window: a continuation, or longer than a
        window."""
        total = self.seconds_total or 0
        return (
            self.continue_audio is not None
            or total > self.window_seconds(config) + 1e-9
        )

    def resolved(self, config) -> "Settings":
        """These settings with every default filled in for `config`'s model (a random
        seed too), the loop's bars turned into seconds; idempotent."""
        defaults = dict(DEFAULTS[config.dit.objective])
        if not uses_sigma_min(config, self.sampler or defaults["sampler"]):
            defaults.update(TIME_DEFAULTS)
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.init_audio is not None:
            filled["sigma_max"] = self.init_noise_level
        if self.bpm is not None and self.bars is not None:
            rate = config.sample_rate
            try:
                samples = loop_samples(self.bpm, self.bars, self.beats_per_bar, rate)
            except ValueError as e:
                raise ArgumentError(str(e), "bpm") from None
            filled.update(seconds_total=samples / rate, bpm=None, bars=None)
        elif self.seconds_total is None:
            filled["seconds_total"] = self.window_seconds(config)
        if self.overlap is None:  # a quarter of the window, in whole seconds
            filled["overlap"] = round(self.window_seconds(config) / 4)
        if self.seed is None:
            filled["seed"] = secrets.randbits(32)
        return replace(self, **filled)

    def check(self, config) -> "Settings":
        """The settings resolved for `config`'s model, or an ArgumentError (a one-line
        ValueError naming the field) for what it cannot do: before any work. Steps and
        batch size are bounded too, so that absurd values fail here, not out of memory.
        """
        self._check_mode()
        s = self.resolved(config)
        try:
            s._check_sampler_name(config)
            s._check_finite()
            s._check_length(config)
            s = s._read_audio(config)
            s._check_continuation(config)
            s._check_sampling(config)
            s._check_guidance()
            s._check_memory(config)
        except ArgumentError as e:  # the page's and the CLI's noise level, when given
            if e.argument == "sigma_max" and s.init_audio is not None:
                e.argument = "init_noise_level"
            raise
        return s

    def _check_mode(self):
        for name in ("prompt", "negative_prompt"):
            try:
                check_prompt(getattr(self, name) or "")
            except ValueError as e:
                raise ArgumentError(str(e), name) from None
        bpm = self.bpm is not None
        if bpm != (self.bars is not None) or (bpm and not self.loop):
            missing = bpm and self.bars is None
            message = "BPM and bars go together, with a seamless loop."
            raise ArgumentError(message, "bars" if missing else "bpm")
        require(
            not bpm or self.seconds_total is None,
            "seconds_total",
            "Give seconds or BPM and bars, not both",
        )
        if self.init_audio is not None and self.inpaint_audio is not None:
            raise ArgumentError("Give init audio or inpaint audio, not both.")
        require(
            self.inpaint_audio is None or self.inpaint_ranges,
            "inpaint_ranges",
            "Inpainting needs at least one range to regenerate",
        )

    def _check_sampler_name(self, config):
        names = samplers.samplers_for(config.dit.objective)
        choose = f"choose one of {', '.join(names)}"
        require(
            self.sampler not in samplers.UNSUPPORTED,
            "sampler",
            f"The {self.sampler} sampler is not offered (its steps are adaptive);"
            f" {choose}",
        )
        require(
            self.sampler in names,
            "sampler",
            f"Unknown sampler {self.sampler!r} for this model; {choose}",
        )

    def _check_finite(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "inpaint_ranges":
                value = [t for r in value for t in r]
            if field.name not in ("cfg_interval", "inpaint_ranges"):
                value = [value]
            finite = all(math.isfinite(v) for v in value if _is_number(v))
            require(finite, field.name, f"{field.name} must be a finite number")

    def _read_audio(self, config) -> "Settings":
        """The audio given as file paths, read: a window of init or inpaint audio, and
        no more of a file to continue than seconds_total (which it must be shorter
        than)."""
        read = {}
        for name in ("continue_audio", "init_audio", "inpaint_audio"):
            path = getattr(self, name)
            if isinstance(path, (str, os.PathLike)):
                continued = name == "continue_audio"
                seconds = (
                    self.seconds_total if continued else self.window_seconds(config)
                )
                try:
                    read[name] = read_audio(path, seconds)
                except ValueError as e:
                    raise ArgumentError(str(e), name) from None
        return replace(self, **read)

    def _check_length(self, config):
        window, rate = self.window_seconds(config), config.sample_rate
        ratio = config.vae.downsampling_ratio
        numbers = config.conditioner.numbers
        start_max = numbers.get("seconds_start", (0, 0))[1]  # 0: not conditioned on it
        longest = max(numbers.get("seconds_total", (0, window))[1], window)
        total, piece = self.seconds_total, self.is_piece(config)
        audio = self.init_audio is not None or self.inpaint_audio is not None
        require(
            not (piece and audio),
            "seconds_total",
            "Init and inpaint audio work within one window: a longer piece or a "
            "continuation takes neither",
        )
        require(
            not (self.loop and (piece or audio)),
            "loop",
            f"A loop is made within one window ({window:.2f} s), from nothing but "
            "the prompt",
        )
        require(
            0 < total <= longest + 1e-9 and total * rate >= ratio,
            "seconds_total",
            f"seconds_total must be in [{ratio / rate:.3g}, {longest:g}] (one latent "
            "to the range of the model's seconds; beyond its window, "
            f"{window:.2f} s, a piece is made window by window)",
        )
        require(
            total <= window + 1e-9 or self.seconds_start == 0,
            "seconds_start",
            "seconds_start applies within one window; a longer piece sets each "
            "window's itself",
        )
        require(
            0 <= self.seconds_start <= start_max,
            "seconds_start",
            f"seconds_start must be in [0, {start_max:g}] for this model",
        )
        kept = round(self.overlap * rate / ratio)
        require(
            not piece or 0 <= kept < config.sample_size // ratio,
            "overlap",
            f"The overlap must be in [0, {window:.2f}) seconds, leaving part of "
            "each window to generate",
        )
        require(
            all(0 <= a < b <= window + 1e-9 for a, b in self.inpaint_ranges),
            "inpaint_ranges",
            f"inpaint ranges must satisfy 0 <= start < end <= {window:.2f}",
        )

    def _check_continuation(self, config):
        if self.continue_audio is None:
            return
        rate, ratio = config.sample_rate, config.vae.downsampling_ratio
        made = continued_latents(config, *self.continue_audio)
        require(
            made < math.ceil(round(self.seconds_total * rate) / ratio),
            "seconds_total",
            f"seconds_total ({self.seconds_total:g} s) must be longer than the audio "
            f"it continues ({made * ratio / rate:.2f} s)",
        )

    def _check_sampling(self, config):
        counts_noise = uses_sigma_min(config, self.sampler)
        sigma_min, sigma_max = self.sigma_min, self.sigma_max
        require(
            1 <= self.steps <= MAX_STEPS, "steps", f"steps must be in [1, {MAX_STEPS}]"
        )
        require(
            counts_noise or sigma_min is None,
            "sigma_min",
            f"sigma_min does not apply to the {self.sampler} sampler (its schedule "
            "runs in time down to 0)",
        )
        require(
            counts_noise or 0 < sigma_max <= 1,
            "sigma_max",
            "the noise level (sigma_max, init noise level) must be in (0, 1] for "
            f"the {self.sampler} sampler",
        )
        require(
            not counts_noise or 0 < sigma_min < sigma_max <= MAX_SIGMA,
            "sigma_max",
            "the noise levels must satisfy 0 < sigma_min < sigma_max <= "
            f"{MAX_SIGMA:g} (the init noise level is sigma_max)",
        )
        schedules = samplers.LOGSNR_SCHEDULES
        require(
            self.flow_schedule is None or config.dit.objective != "v",
            "flow_schedule",
            "the flow schedule applies to rectified-flow models only",
        )
        require(
            self.flow_schedule in (None, *schedules),
            "flow_schedule",
            f"unknown flow schedule {self.flow_schedule!r}; choose one of "
            f"{', '.join(schedules)}",
        )
        require(
            1 <= self.batch_size <= MAX_BATCH,
            "batch_size",
            f"the number of audios must be in [1, {MAX_BATCH}]",
        )
        require(0 <= self.seed < 2**64, "seed", "the seed must be in [0, 2**64)")

    def _check_memory(self, config):
        """Refuse, with the figure, audio that could not fit in this machine's memory
        (a lower bound: the decoded float32 audio and its copy to numpy); past it, MLX
        on Linux crashes rather than failing."""
        samples = round(self.seconds_total * config.sample_rate)
        need = 2 * 4 * self.batch_size * config.vae.audio_channels * samples
        have = physical_memory()
        require(
            not have or need <= have,
            "batch_size",
            f"{self.batch_size} audios of {self.seconds_total:g} s need at least"
            f" {need / 1e9:.1f} GB; this machine has {have / 1e9:.1f} GB",
        )

    def _check_guidance(self):
        low, high = self.cfg_interval
        require(0 <= self.apg_scale <= 1, "apg_scale", "apg_scale must be in [0, 1]")
        require(
            self.cfg_norm_threshold >= 0,
            "cfg_norm_threshold",
            "cfg_norm_threshold must be >= 0 (0: no threshold)",
        )
        require(
            0 <= self.cfg_rescale <= 1, "cfg_rescale", "cfg_rescale must be in [0, 1]"
        )
        require(
            0 <= low <= high <= 1,
            "cfg_interval",
            f"the CFG interval must satisfy 0 <= MIN <= MAX <= 1 ({INTERVAL_UNITS})",
        )


def physical_memory() -> int:
    """Bytes of memory this machine has (0 where it cannot be told)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def require(ok: bool, argument: str, message: str):
    """An ArgumentError naming `argument`, with `message`, unless `ok`."""
    if not ok:
        raise ArgumentError(message + ".", argument)


def continued_latents(config, sample_rate: int, audio) -> int:
    """The latents that audio being continued fills: its length at the model's rate, in
    whole latents."""
    n = np.shape(audio)[-1]
    return (
        math.ceil(n * config.sample_rate / sample_rate) // config.vae.downsampling_ratio
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def uses_sigma_min(config, sampler: str) -> bool:
    """Whether `sampler` (a known one) counts noise down to a sigma_min."""
    objective = config.dit.objective
    known = sampler in samplers.samplers_for(objective)
    return known and samplers.uses_sigma_min(objective, sampler)

import math
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn

# stable-audio-tools' defaults for what a model_config.json leaves out
OOBLECK_DEFAULTS = dict(
    in_channels=2,
    out_channels=2,
    channels=128,
    latent_dim=32,
    c_mults=[1, 2, 4, 8],
    strides=[2, 4, 8, 8],
    use_snake=False,
    antialias_activation=False,
    use_nearest_upsample=False,
    final_tanh=True,
)


@dataclass
class VAEConfig:
    audio_channels: int = 2
    channels: int = 128
    c_mults: tuple = (1, 2, 4, 8, 16)
    strides: tuple = (2, 4, 4, 8, 8)
    encoder_latent_dim: int = 128
    latent_dim: int = 64
    final_tanh: bool = True

    @classmethod
    def from_model_config(cls, model: dict):
        pretransform = model.get("pretransform") or {}
        if pretransform.get("type") != "autoencoder":
            raise ValueError(
                f"Unsupported pretransform type {pretransform.get('type')!r} in "
                "model_config.json (supported: autoencoder)."
            )
        config = pretransform.get("config", {})
        if config.get("bottleneck", {}).get("type") != "vae":
            raise ValueError(
                "Unsupported autoencoder bottleneck in model_config.json (supported:"
                " vae)."
            )
        if config.get("scale", 1.0) != 1.0:
            raise ValueError(
                "Unsupported pretransform scale in model_config.json (supported: 1.0)."
            )
        parts = []
        for part in (config.get("encoder", {}), config.get("decoder", {})):
            if part.get("type") != "oobleck":
                raise ValueError(
                    f"Unsupported autoencoder {part.get('type')!r} in model_config.json"
                    " (supported: oobleck)."
                )
            c = {**OOBLECK_DEFAULTS, **part.get("config", {})}
            for key in ("c_mults", "strides"):
                if not (
                    isinstance(c[key], list)
                    and c[key]
                    and all(type(v) is int and v > 0 for v in c[key])
                ):
                    raise ValueError(
                        f"Unsupported Oobleck {key}={c[key]!r} in model_config.json"
                        " (expected a list of positive ints)."
                    )
            if len(c["c_mults"]) != len(c["strides"]):
                raise ValueError(
                    "Unsupported Oobleck config in model_config.json: c_mults and"
                    " strides differ in length."
                )
            for key, value in {
                "use_snake": True,
                "antialias_activation": False,
                "use_nearest_upsample": False,
            }.items():
                if c[key] != value:
                    raise ValueError(
                        f"Unsupported Oobleck {key}={c[key]!r} in model_config.json."
                    )
            parts.append(c)
        e, d = parts
        same = ("channels", "c_mults", "strides")
        if any(e[k] != d[k] for k in same) or e["in_channels"] != d["out_channels"]:
            raise ValueError(
                "Unsupported autoencoder: encoder and decoder shapes differ."
            )
        if e["latent_dim"] != 2 * d["latent_dim"]:
            raise ValueError(
                "Unsupported autoencoder: the encoder must output mean and scale."
            )
        return cls(
            audio_channels=d["out_channels"],
            channels=d["channels"],
            c_mults=tuple(d["c_mults"]),
            strides=tuple(d["strides"]),
            encoder_latent_dim=e["latent_dim"],
            latent_dim=d["latent_dim"],
            final_tanh=d["final_tanh"],
        )

    @property
    def downsampling_ratio(self):
        return math.prod(self.strides)

    @property
    def encoder_context(self) -> int:
        """How many latents on each side of a latent the audio that affects it reaches
        (the encoder's receptive field, rounded up)."""
        field, rate = 3, 1  # the first conv, k=7
        for s in self.strides:
            field += 3 * (1 + 3 + 9) * rate  # residual units: k=7, dilations 1, 3, 9
            field += 2 * s * rate  # the strided conv, k=2s
            rate *= s
        return (
            math.ceil(field / rate) + 2
        )  # the last conv, k=3, and the latent's own width

    @property
    def decoder_context(self) -> int:
        """How many latents on each side can affect a decoded sample (the receptive
        field)."""
        field, rate = 3, 1  # the first conv, k=7
        for s in reversed(self.strides):
            field += 2 / rate  # the transposed conv, k=2s, reaches 2 inputs
            rate *= s
            field += 3 * (1 + 3 + 9) / rate  # residual units: k=7, dilations 1, 3, 9
        return math.ceil(field + 3 / rate)  # the last conv, k=7


@partial(mx.compile, shapeless=True)
def snake(x: mx.array, alpha: mx.array, beta: mx.array) -> mx.array:
    # one fused kernel: at the decoder's last blocks x is a gigabyte
    return x + mx.reciprocal(mx.exp(beta) + 1e-9) * mx.sin(mx.exp(alpha) * x) ** 2


class Snake(nn.Module):
    """SnakeBeta with log-scale parameters: x + sin^2(e^alpha x) / e^beta."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = mx.zeros((channels,))
        self.beta = mx.zeros((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        return snake(x, self.alpha, self.beta)


class ResidualUnit(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.layers = [
            Snake(channels),
            nn.Conv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation),
            Snake(channels),
            nn.Conv1d(channels, channels, 1),
        ]

    def __call__(self, x: mx.array) -> mx.array:
        y = x
        for layer in self.layers:
            y = layer(y)
        return x + y


class Upsample(nn.ConvTranspose1d):
    """ConvTranspose1d with kernel 2 * stride, as Oobleck's decoder has them, computed
    in polyphase form: each of the `stride` output phases is a 2-tap convolution of the
    input, so all of them are one ordinary conv1d with stride x out channels,
    interleaved by a reshape. The transposed convolution proper multiplies a
    zero-stuffed input (Metal does it so), stride times the work. Same weights and bias,
    same result."""

    def __call__(self, x: mx.array) -> mx.array:
        c_out, k, c_in = self.weight.shape
        s, p = self.stride, self.padding
        # phase r: taps r (input j) and r + s (input j - 1) of the original kernel
        w = (
            self.weight.reshape(c_out, 2, s, c_in)[:, ::-1]
            .transpose(2, 0, 1, 3)
            .reshape(s * c_out, 2, c_in)
        )
        y = mx.conv1d(
            x, w, padding=1
        )  # (B, L + 1, s * c_out): output (L + 1) s, before cropping
        B, n, _ = y.shape
        y = y.reshape(B, n * s, c_out)[:, p : n * s - p]
        return y + self.bias if "bias" in self else y


# The module trees mirror stable-audio-tools, so checkpoint names map one to one
def encoder(config: VAEConfig) -> nn.Sequential:
    widths = [config.channels * m for m in (1,) + config.c_mults]
    blocks = [
        nn.Sequential(
            ResidualUnit(c_in, 1),
            ResidualUnit(c_in, 3),
            ResidualUnit(c_in, 9),
            Snake(c_in),
            nn.Conv1d(c_in, c_out, 2 * s, stride=s, padding=math.ceil(s / 2)),
        )
        for c_in, c_out, s in zip(widths, widths[1:], config.strides)
    ]
    return nn.Sequential(
        nn.Conv1d(config.audio_channels, widths[0], 7, padding=3),
        *blocks,
        Snake(widths[-1]),
        nn.Conv1d(widths[-1], config.encoder_latent_dim, 3, padding=1),
    )


def decoder(config: VAEConfig) -> nn.Sequential:
    widths = [config.channels * m for m in (1,) + config.c_mults]
    blocks = [
        nn.Sequential(
            Snake(c_in),
            Upsample(c_in, c_out, 2 * s, stride=s, padding=math.ceil(s / 2)),
            ResidualUnit(c_out, 1),
            ResidualUnit(c_out, 3),
            ResidualUnit(c_out, 9),
        )
        for c_in, c_out, s in reversed(list(zip(widths[1:], widths, config.strides)))
    ]
    return nn.Sequential(
        nn.Conv1d(config.latent_dim, widths[-1], 7, padding=3),
        *blocks,
        Snake(widths[0]),
        nn.Conv1d(widths[0], config.audio_channels, 7, padding=3, bias=False),
        *([nn.Tanh()] if config.final_tanh else []),
    )


class VAE(nn.Module):
    """The Oobleck autoencoder with its VAE bottleneck, channels-last: audio
    (B, N, C)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = encoder(config)
        self.decoder = decoder(config)

    def posterior(self, audio: mx.array, chunk: int = None) -> tuple:
        """The mean and the standard deviation of the latents' posterior, each (B, N /
        ratio, latent_dim). With `chunk`, `chunk` latents are encoded at a time, each
        with the audio of as many latents on each side as the encoder's receptive field
        reaches: the result equals one-shot encoding, and memory does not grow with
        N."""
        if chunk is None:
            mean, scale = mx.split(self.encoder(audio), 2, axis=-1)
            return mean, nn.softplus(scale) + 1e-4
        ratio, margin = self.config.downsampling_ratio, self.config.encoder_context
        length = audio.shape[1] // ratio
        means, stds = [], []
        for start in range(0, length, chunk):
            lo, hi = max(start - margin, 0), min(start + chunk + margin, length)
            mean, std = self.posterior(audio[:, lo * ratio : hi * ratio])
            keep = slice(start - lo, min(start + chunk, length) - lo)
            mx.eval(mean[:, keep], std[:, keep])
            means.append(mean[:, keep])
            stds.append(std[:, keep])
        return mx.concatenate(means, axis=1), mx.concatenate(stds, axis=1)

    def encode(self, audio: mx.array, noise: mx.array = None) -> mx.array:
        """Latents (B, N / ratio, latent_dim): the posterior mean, or with `noise`
        (N(0, 1) of the latents' shape) a sample of the posterior."""
        if noise is None:
            return mx.split(self.encoder(audio), 2, axis=-1)[0]
        mean, std = self.posterior(audio)
        return mean + std * noise.astype(mean.dtype)

    def decode(self, latents: mx.array) -> mx.array:
        return self.decoder(latents)

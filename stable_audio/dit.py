import math
from dataclasses import dataclass, fields
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .conditioners import unsupported


def check_values(section: str, config):
    """Refuse config values of the wrong type or sign: every int and float of our
    configs is a positive size, rate or epsilon."""
    for field in fields(config):
        value = getattr(config, field.name)
        if field.type is bool:
            ok = isinstance(value, bool)
        elif field.type is int:
            ok = type(value) is int and value > 0
        elif field.type is float:
            ok = type(value) in (int, float) and 0 < value < math.inf
        else:
            continue
        if not ok:
            raise ValueError(
                f"Unsupported {section} {field.name} {value!r} (expected a positive"
                f" {field.type.__name__})."
            )


@dataclass
class DiTConfig:
    # stable-audio-tools' defaults for what a model_config.json leaves out
    io_channels: int = 32
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 8
    cond_token_dim: int = 0
    global_cond_dim: int = 0
    project_cond_tokens: bool = True
    project_global_cond: bool = True
    qk_norm: str = "none"  # "ln": LayerNorm on each head's queries and keys (SAO Small)
    objective: str = "v"  # or "rf_denoiser": rectified flow (SAO Small)

    # Values other than these stable-audio-tools defaults are not implemented
    _FIXED = {
        "transformer_type": "continuous_transformer",
        "patch_size": 1,
        "global_cond_type": "prepend",
        "timestep_cond_type": "global",
        "input_concat_dim": 0,
        "prepend_cond_dim": 0,
    }

    @classmethod
    def from_model_config(cls, model: dict):
        diffusion = model.get("diffusion") or {}
        if diffusion.get("type") != "dit":
            unsupported("diffusion type", diffusion.get("type"), "dit")
        objective = diffusion.get("diffusion_objective", "v")
        if objective not in ("v", "rf_denoiser"):
            unsupported("diffusion_objective", objective, "v, rf_denoiser")
        config = dict(diffusion.get("config", {}))
        attn_kwargs = dict(config.pop("attn_kwargs", None) or {})
        qk_norm = attn_kwargs.pop("qk_norm", "none")
        if qk_norm not in ("none", "ln") or attn_kwargs:
            unsupported(
                "DiT attn_kwargs",
                diffusion["config"]["attn_kwargs"],
                "qk_norm none or ln",
            )
        for key, default in cls._FIXED.items():
            if config.pop(key, default) != default:
                unsupported(f"DiT {key}", diffusion["config"][key], default)
        names = set(cls.__dataclass_fields__) - {
            "qk_norm",
            "objective",
        }  # set from elsewhere
        unknown = sorted(set(config) - names)
        if unknown:
            unsupported("DiT option", unknown[0], ", ".join(sorted(names)))
        c = cls(**config, qk_norm=qk_norm, objective=objective)
        check_values("DiT", c)
        for key in ("cond_token_dim", "global_cond_dim"):
            if getattr(c, key) <= 0:
                unsupported(f"DiT {key}", getattr(c, key), "> 0")
        head_dim, rest = divmod(c.embed_dim, c.num_heads)
        context_dim = c.embed_dim if c.project_cond_tokens else c.cond_token_dim
        if (
            rest
            or head_dim < 32
            or context_dim % head_dim
            or c.num_heads % (context_dim // head_dim)
        ):
            raise ValueError(
                f"Unsupported DiT shape: {c.num_heads} heads of width {c.embed_dim}"
                f" with a {context_dim}-wide context (heads must be >= 32 wide and"
                " divide evenly)."
            )
        return c


def _sequential(layers, x, level=None):
    for layer in layers:
        x = adapted(layer, x, level)
    return x


def adapted(layer, x: mx.array, level: mx.array = None) -> mx.array:
    """`layer(x)`; a layer wrapped by adapters that the noise level gates
    (lora.LoRALinear) is also given the level of the model evaluation, `level`."""
    if level is not None and getattr(layer, "takes_level", False):
        return layer(x, level)
    return layer(x)


class FourierFeatures(nn.Module):
    def __init__(self, out_features: int):
        super().__init__()
        self.weight = mx.zeros((out_features // 2, 1))

    def __call__(self, t: mx.array) -> mx.array:
        f = (
            2
            * math.pi
            * t.astype(mx.float32)[:, None]
            @ self.weight.astype(mx.float32).T
        )
        return mx.concatenate([mx.cos(f), mx.sin(f)], axis=-1)


class Attention(nn.Module):
    """Self-attention with partial RoPE, or cross-attention with grouped kv heads."""

    def __init__(
        self, dim: int, num_heads: int, context_dim: int = None, qk_norm: bool = False
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.rope_dims = max(self.head_dim // 2, 32)
        if qk_norm:
            self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        if context_dim is None:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        else:
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * context_dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def _heads(self, x):
        B, L, _ = x.shape
        return x.reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3)

    def keys_values(self, context: mx.array, level: mx.array = None):
        """Cross-attention keys and values, (B, kv heads, tokens, head_dim) each. Query
        head j uses kv head j // (heads / kv heads), which is how
        scaled_dot_product_attention groups them."""
        kv = adapted(self.to_kv, context, level)
        k, v = map(self._heads, mx.split(kv, 2, axis=-1))
        return (self.k_norm(k) if "k_norm" in self else k), v

    def __call__(
        self, x: mx.array, keys_values: tuple = None, level: mx.array = None
    ) -> mx.array:
        """Self-attention, or cross-attention on precomputed `keys_values`; `level` is
        the noise level, for gated adapters."""
        B, L, _ = x.shape
        # after the qk norms, as in the reference: rotate-half RoPE on the leading dims;
        # position 0 is the prepended token
        rope = partial(
            mx.fast.rope,
            dims=self.rope_dims,
            traditional=False,
            base=1e4,
            scale=1.0,
            offset=0,
        )
        if keys_values is not None:
            q, (k, v) = self._heads(adapted(self.to_q, x, level)), keys_values
            q = self.q_norm(q) if "q_norm" in self else q
        elif "q_norm" in self:
            q, k, v = mx.split(self._heads(adapted(self.to_qkv, x, level)), 3, axis=1)
            q, k = rope(self.q_norm(q)), rope(self.k_norm(k))
        else:
            # the queries' and keys' heads rotated in one call (one copy out of the
            # fused projection instead of one per tensor)
            qkv = self._heads(adapted(self.to_qkv, x, level))
            q, k = mx.split(rope(qkv[:, : 2 * self.num_heads]), 2, axis=1)
            v = qkv[:, 2 * self.num_heads :]
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return adapted(self.to_out, out.transpose(0, 2, 1, 3).reshape(B, L, -1), level)


class FeedForward(nn.Module):
    """SwiGLU: the first half of `proj` is the value, the second half the gate."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def __call__(self, x: mx.array, level: mx.array = None) -> mx.array:
        value, gate = mx.split(adapted(self.proj, x, level), 2, axis=-1)
        return adapted(self.out, value * nn.silu(gate), level)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, context_dim: int, qk_norm: bool):
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, qk_norm=qk_norm)
        self.cross_attend_norm = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads, context_dim, qk_norm)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def __call__(
        self, x: mx.array, keys_values: tuple, level: mx.array = None
    ) -> mx.array:
        """Rows of `x` beyond the keys' batch have an all-zero context (the
        unconditional half of guidance): their cross-attention output is exactly zero,
        so it is skipped. `level` is the noise level, for gated adapters."""
        # the residual stream stays float32; each branch, its norm included, runs in the
        # weights' dtype (the cast fuses into the residual add; a float16 norm's error
        # is a float32 one's, and it is one kernel instead of two)
        dtype = keys_values[0].dtype
        x = x + self.self_attn(self.pre_norm(x.astype(dtype)), level=level)
        n = keys_values[0].shape[0]
        y = self.cross_attend_norm(x[:n].astype(dtype))
        y = self.cross_attn(y, keys_values, level)
        x = x + y if n == x.shape[0] else mx.concatenate([x[:n] + y, x[n:]])
        return x + self.ff(self.ff_norm(x.astype(dtype)), level)


def checkpointed(block: nn.Module):
    """`block` with gradient checkpointing: only its inputs are kept for the backward
    pass, which recomputes its activations. Unlike nn.utils.checkpoint, the
    recomputation waits for the gradient arriving from the block above, so one block's
    activations are alive at a time; otherwise the scheduler is free to recompute
    several blocks early."""

    def run(params, h, keys_values):
        block.update(params)
        return block(h, keys_values)

    forward = mx.custom_function(run)

    @forward.vjp
    def backward(primals, cotangent, output):
        params, h, (k, v) = primals
        names, values = zip(*tree_flatten(params)) if params else ((), ())
        rerun = lambda h, k, v, *values: run(
            tree_unflatten(list(zip(names, values))), h, (k, v)
        )
        grads = mx.vjp(rerun, [mx.depends(h, cotangent), k, v, *values], [cotangent])[1]
        return (
            tree_unflatten(list(zip(names, grads[3:]))),
            grads[0],
            (grads[1], grads[2]),
        )

    return lambda h, keys_values: forward(block.trainable_parameters(), h, keys_values)


class DiT(nn.Module):
    """The diffusion transformer of Stable Audio Open, channels-last:
    (B, T, io_channels)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.objective = config.objective
        dim, io = config.embed_dim, config.io_channels
        context_dim = dim if config.project_cond_tokens else config.cond_token_dim
        global_dim = dim if config.project_global_cond else config.global_cond_dim
        self.timestep_features = FourierFeatures(256)
        self.to_timestep_embed = [nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim)]
        self.to_cond_embed = [
            nn.Linear(config.cond_token_dim, context_dim, bias=False),
            nn.SiLU(),
            nn.Linear(context_dim, context_dim, bias=False),
        ]
        self.to_global_embed = [
            nn.Linear(config.global_cond_dim, global_dim, bias=False),
            nn.SiLU(),
            nn.Linear(global_dim, global_dim, bias=False),
        ]
        self.preprocess_conv = nn.Conv1d(io, io, 1, bias=False)
        self.project_in = nn.Linear(io, dim, bias=False)
        self.layers = [
            TransformerBlock(dim, config.num_heads, context_dim, config.qk_norm == "ln")
            for _ in range(config.depth)
        ]
        self.project_out = nn.Linear(dim, io, bias=False)
        self.postprocess_conv = nn.Conv1d(io, io, 1, bias=False)
        self.gated_adapters = (
            False  # set by lora.apply_adapter: some follow the noise level
        )
        # fine-tuning: recompute each block's activations in the backward pass
        self.checkpoint_blocks = False

    def prepare_conditioning(
        self, cross: mx.array, global_cond: mx.array, negative_cross: mx.array = None
    ) -> dict:
        """What every sampler step of a generation reuses, computed once: each block's
        cross-attention keys and values (for the prompt, then the negative prompt's if
        any, along the batch) and the projected global vector."""
        dtype = self.dtype
        tokens = (
            cross if negative_cross is None else mx.concatenate([cross, negative_cross])
        )
        conditioning = {
            "tokens": tokens.astype(dtype),
            "global_cond": global_cond.astype(dtype),
        }
        # adapters gated by the noise level change these projections from call to call
        if self.gated_adapters:
            return conditioning
        return self._project_conditioning(conditioning)

    def _project_conditioning(self, conditioning: dict, level=None) -> dict:
        context = _sequential(self.to_cond_embed, conditioning["tokens"], level)
        return {
            "keys_values": [
                layer.cross_attn.keys_values(context, level) for layer in self.layers
            ],
            "global": _sequential(
                self.to_global_embed, conditioning["global_cond"], level
            ),
        }

    def prompt_only(self, conditioning: dict, batch_size: int) -> dict:
        """`conditioning` without a negative prompt's rows: for evaluations unguided."""
        if "keys_values" in conditioning:
            kv = [
                (k[:batch_size], v[:batch_size]) for k, v in conditioning["keys_values"]
            ]
            return {**conditioning, "keys_values": kv}
        return {**conditioning, "tokens": conditioning["tokens"][:batch_size]}

    @property
    def dtype(self):
        """The dtype the DiT computes in: its weights' (of the scales, if quantized)."""
        return self.timestep_features.weight.dtype

    def __call__(self, x: mx.array, t: mx.array, conditioning: dict) -> mx.array:
        """The model's prediction (float32) for latents `x` (B, T, C) at diffusion times
        `t` (B,), given prepare_conditioning()'s output.

        Rows of `x` beyond the batch of the conditioning's keys see all-zero
        cross-attention tokens. The weights may be float16, bfloat16 or quantized; the
        residual streams stay in float32, and the norms and matmuls run in the weights'
        dtype."""
        dtype = self.dtype
        # gated adapters are given the evaluation's noise level, passed down explicitly
        level = (
            self.noise_level(t[0].astype(mx.float32)) if self.gated_adapters else None
        )
        if "keys_values" not in conditioning:
            conditioning = self._project_conditioning(conditioning, level)
        x = x.astype(dtype)
        features = self.timestep_features(t).astype(dtype)
        timestep = _sequential(self.to_timestep_embed, features, level)
        global_embed = conditioning["global"]
        global_embed = mx.concatenate(
            [global_embed] * (x.shape[0] // global_embed.shape[0])
        )
        x = x + adapted(self.preprocess_conv, x, level)
        prepend = global_embed + timestep
        h = mx.concatenate(
            [prepend[:, None], adapted(self.project_in, x, level)], axis=1
        )
        h = h.astype(mx.float32)
        for layer, keys_values in zip(self.layers, conditioning["keys_values"]):
            if self.checkpoint_blocks:
                h = checkpointed(layer)(h, keys_values)
            else:
                h = layer(h, keys_values, level)
        y = adapted(self.project_out, h.astype(dtype), level)[:, 1:]
        return (y + adapted(self.postprocess_conv, y, level)).astype(mx.float32)

    def noise_level(self, t):
        """Diffusion time t (a float, or an array) in stable-audio-tools 0.0.20's units
        for guidance and LoRA intervals: the VP noise std sin(pi t / 2) for v models, t
        itself for flow."""
        if self.objective != "v":
            return t
        return (
            mx.sin(t * math.pi / 2)
            if isinstance(t, mx.array)
            else math.sin(t * math.pi / 2)
        )

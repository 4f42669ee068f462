"""The conditioners of Stable Audio Open: the T5 text tokens and the seconds embeddings,
assembled into the DiT's cross-attention tokens and global vector."""

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


def unsupported(what: str, value, supported):
    raise ValueError(
        f"Unsupported {what} {value!r} in model_config.json (supported: {supported})."
    )


@dataclass
class ConditionerConfig:
    cond_dim: int = 768
    text_id: str = "prompt"
    text_max_length: int = 128
    numbers: dict = None  # id -> (min_val, max_val)
    cross_attention_ids: tuple = ()
    global_ids: tuple = ()

    @classmethod
    def from_model_config(cls, model: dict):
        conditioning = model.get("conditioning") or {}
        diffusion = model.get("diffusion") or {}
        if "cond_dim" not in conditioning:
            raise ValueError("model_config.json has no conditioning cond_dim.")
        cond_dim = conditioning["cond_dim"]
        text_id, max_length, numbers = None, None, {}
        for entry in conditioning.get("configs", []):
            kind, c = entry.get("type"), entry.get("config", {})
            if kind == "t5":
                if text_id is not None:
                    unsupported("second t5 conditioner", entry["id"], "one")
                if c.get("project_out", False):
                    unsupported("t5 project_out", True, "false")
                text_id, max_length = entry["id"], c.get("max_length", 128)
            elif kind == "number":
                low, high = c.get("min_val", 0), c.get("max_val", 1)
                if not (
                    type(low) in (int, float)
                    and type(high) in (int, float)
                    and low < high
                ):
                    unsupported(
                        f"{entry['id']} min_val, max_val",
                        (low, high),
                        "numbers, min_val < max_val",
                    )
                numbers[entry["id"]] = (low, high)
            else:
                unsupported("conditioner type", kind, "t5, number")
        if text_id is None:
            raise ValueError("model_config.json has no t5 text conditioner.")
        cross_ids = tuple(diffusion.get("cross_attention_cond_ids", []))
        global_ids = tuple(diffusion.get("global_cond_ids", []))
        for key in ("input_concat_ids", "prepend_cond_ids"):
            if diffusion.get(key):
                unsupported(key, diffusion[key], "none")
        for i in cross_ids + global_ids:
            if i != text_id and i not in numbers:
                raise ValueError(
                    f"model_config.json uses conditioning id {i!r}, which it does not"
                    " define."
                )
        if text_id in global_ids:
            unsupported("global conditioning on", text_id, "number conditioners")
        return cls(cond_dim, text_id, max_length, numbers, cross_ids, global_ids)


class NumberEmbedder(nn.Module):
    """Embeds a number in [min_val, max_val] from learned Fourier features
    [u, sin, cos]."""

    def __init__(self, dim: int, min_val: float, max_val: float, features: int = 256):
        super().__init__()
        self.min_val, self.max_val = min_val, max_val
        self.freqs = mx.zeros((features // 2,))
        self.proj = nn.Linear(features + 1, dim)

    def __call__(self, values: mx.array) -> mx.array:
        u = (mx.clip(values, self.min_val, self.max_val) - self.min_val) / (
            self.max_val - self.min_val
        )
        u = u.astype(mx.float32)[:, None]
        f = u * self.freqs * 2 * math.pi
        return self.proj(mx.concatenate([u, mx.sin(f), mx.cos(f)], axis=-1))


class Conditioner(nn.Module):
    """Turns T5 output and numbers (seconds_start, seconds_total) into the DiT's
    conditioning."""

    def __init__(self, config: ConditionerConfig):
        super().__init__()
        self.config = config
        self.numbers = {
            key: NumberEmbedder(config.cond_dim, lo, hi)
            for key, (lo, hi) in config.numbers.items()
        }

    def __call__(self, text: mx.array, text_mask: mx.array, **numbers):
        """Cross-attention tokens (B, N, cond_dim) and the global vector (B, G).

        `text` is the T5 output (B, L, cond_dim); padded positions are zeroed (the DiT
        still attends to them, as the reference does). `numbers` maps each number
        conditioner id to a (B,) array of values.
        """
        cond = {self.config.text_id: text * text_mask[..., None].astype(text.dtype)}
        for key, embedder in self.numbers.items():
            values = numbers[
                key
            ]  # a list, or an array (inside a compiled training step)
            values = (
                values.astype(mx.float32)
                if isinstance(values, mx.array)
                else mx.array(values, dtype=mx.float32)
            )
            cond[key] = embedder(values)[:, None]
        cross = mx.concatenate(
            [cond[k] for k in self.config.cross_attention_ids], axis=1
        )
        global_cond = mx.concatenate(
            [cond[k][:, 0] for k in self.config.global_ids], axis=-1
        )
        return cross, global_cond

import math
import warnings
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import sentencepiece


@dataclass
class T5Config:
    # transformers' defaults for what a config.json leaves out
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @classmethod
    def from_dict(cls, config: dict):
        if config.get("feed_forward_proj", "relu") != "relu":
            raise ValueError(
                f"Unsupported T5 feed_forward_proj {config['feed_forward_proj']!r}: "
                "only the ReLU feed-forward of t5-base is implemented."
            )
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


def relative_position_buckets(length: int, num_buckets: int, max_distance: int):
    """T5's bidirectional bucketing of key - query offsets, as transformers computes
    it."""
    offset = np.arange(length)[None, :] - np.arange(length)[:, None]
    num_buckets //= 2
    buckets = (offset > 0).astype(np.int32) * num_buckets
    offset = np.abs(offset)
    max_exact = num_buckets // 2
    # float32 like the reference, so the log lands in the same bucket at the edges
    scaled = np.log(np.maximum(offset, 1).astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (scaled * np.float32(num_buckets - max_exact)).astype(np.int32)
    large = np.minimum(large, num_buckets - 1)
    return mx.array(buckets + np.where(offset < max_exact, offset, large))


class Attention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (
            proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
            for proj in (self.q, self.k, self.v)
        )
        # T5 does not scale the scores; the softmax runs in float32 whatever the dtype
        scores = (q @ k.transpose(0, 1, 3, 2)).astype(mx.float32) + bias
        weights = mx.softmax(scores, axis=-1).astype(v.dtype)
        return self.o((weights @ v).transpose(0, 2, 1, 3).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.attention = Attention(config)
        self.ff_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        # the residual stream stays float32, so float16 weights cannot overflow it
        dtype = self.wi.weight.dtype
        x = x + self.attention(self.attention_norm(x).astype(dtype), bias)
        return x + self.wo(nn.relu(self.wi(self.ff_norm(x).astype(dtype))))


class T5Encoder(nn.Module):
    """The encoder half of T5 (t5-base for Stable Audio Open)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        # the relative position bias lives in the first block and is shared by all
        self.relative_attention_bias = nn.Embedding(
            config.relative_attention_num_buckets, config.num_heads
        )
        self.blocks = [Block(config) for _ in range(config.num_layers)]
        self.final_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def __call__(self, tokens: mx.array, mask: mx.array) -> mx.array:
        """Hidden states (B, L, d_model) of `tokens` (B, L); `mask` is 1 on real
        tokens."""
        c = self.config
        buckets = relative_position_buckets(
            tokens.shape[1],
            c.relative_attention_num_buckets,
            c.relative_attention_max_distance,
        )
        bias = self.relative_attention_bias(buckets).transpose(2, 0, 1)
        bias = bias.astype(mx.float32) + mx.where(
            mask[:, None, None, :] > 0, 0.0, -1e30
        )
        x = self.embed(tokens).astype(mx.float32)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x).astype(self.embed.weight.dtype)


def check_prompt(prompt: str):
    """Refuse text that SentencePiece cannot take: lone surrogates, which stand for
    bytes of the command line that are not UTF-8."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"The prompt {prompt!r} is not valid UTF-8 text.") from None


class Tokenizer:
    """T5's SentencePiece tokenizer: appends `</s>`, pads to `max_length`, masks the
    padding."""

    def __init__(self, model_file: str, max_length: int):
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except RuntimeError:
            raise ValueError(
                f"{model_file} is damaged: it is not a SentencePiece model."
            ) from None
        self.model_proto = self.sp.serialized_model_proto()
        self.max_length = max_length
        self.eos_id = self.sp.piece_to_id("</s>")
        self.pad_id = self.sp.piece_to_id("<pad>")

    def __call__(self, prompts: list[str]):
        """Token ids and attention mask, both (len(prompts), max_length) int32."""
        tokens = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), self.max_length), np.int32)
        for i, prompt in enumerate(prompts):
            check_prompt(prompt)
            ids = self.sp.encode(prompt)
            keep = self.max_length - 1
            if len(ids) > keep:
                dropped = self.sp.decode(ids[keep:])
                dropped = dropped if len(dropped) <= 80 else dropped[:80] + "..."
                warnings.warn(
                    f"Prompt longer than {self.max_length} tokens; "
                    f"these words were dropped: {dropped!r}",
                    stacklevel=2,
                )
                ids = ids[:keep]
            ids = ids + [self.eos_id]
            tokens[i, : len(ids)] = ids
            mask[i, : len(ids)] = 1
        return mx.array(tokens), mx.array(mask)

"""Configs, the checkpoint rename table, strict loading, and quantization."""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .conditioners import Conditioner, ConditionerConfig
from .dit import DiT, DiTConfig, check_values
from .files import written
from .hub import (
    COMPONENTS,
    DEFAULT_REPO,
    PICKLED,
    RELEASED_FILES,
    is_converted,
    resolve,
)
from .t5 import T5Config, T5Encoder, Tokenizer
from .vae import VAE, VAEConfig

# Checkpoint name fragments -> MLX parameter names, applied in order
RENAMES = [
    # model.safetensors: DiT, seconds conditioners, autoencoder
    ("model.model.transformer.", "dit."),
    ("model.model.", "dit."),
    ("conditioner.conditioners.", "conditioner.numbers."),
    (".embedder.embedding.0.weights", ".freqs"),
    (".embedder.embedding.1.", ".proj."),
    ("pretransform.model.", "vae."),
    ("norm.gamma", "norm.weight"),
    ("norm.beta", "norm.bias"),
    (".ff.ff.0.proj.", ".ff.proj."),
    (".ff.ff.2.", ".ff.out."),
    # text_encoder/model.safetensors: the T5 encoder
    (
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.",
        "t5.relative_attention_bias.",
    ),
    ("encoder.block.", "t5.blocks."),
    (".layer.0.SelfAttention.", ".attention."),
    (".layer.0.layer_norm.", ".attention_norm."),
    (".layer.1.DenseReluDense.", "."),
    (".layer.1.layer_norm.", ".ff_norm."),
    ("encoder.final_layer_norm.", "t5.final_norm."),
    ("shared.", "t5.embed."),
]


@dataclass
class Config:
    sample_rate: int
    sample_size: int
    t5: T5Config
    conditioner: ConditionerConfig
    dit: DiTConfig
    vae: VAEConfig
    model_config: dict  # the checkpoint's model_config.json, kept for convert.py
    t5_config: dict  # text_encoder/config.json
    quantization: dict = None  # {"group_size", "bits"} of a quantized DiT


# Bounds on what a config may ask for, far beyond the released models (44.1 kHz, a
# 47.55 s window of 1024 latents, seconds up to 512), so that an absurd one is refused
# rather than crashing out of memory
RATES = (1_000, 384_000)
MAX_LATENTS = 1 << 16
MAX_SECONDS = 3600


def check_sizes(model_config: dict, conditioner, vae):
    """Refuse a sample rate, window or seconds range that no model of ours could run."""
    rate, size = model_config["sample_rate"], model_config["sample_size"]
    ratio = vae.downsampling_ratio
    if not RATES[0] <= rate <= RATES[1]:
        raise ValueError(f"sample_rate {rate} is not in [{RATES[0]}, {RATES[1]}] Hz.")
    if size % ratio or not 1 <= size // ratio <= MAX_LATENTS:
        raise ValueError(
            f"sample_size {size} must be a multiple of the autoencoder's downsampling"
            f" ratio ({ratio}), at most {MAX_LATENTS} latents."
        )
    for name, (low, high) in conditioner.numbers.items():
        if not -MAX_SECONDS <= low < high <= MAX_SECONDS:
            raise ValueError(
                f"The {name} condition's range [{low}, {high}] is beyond"
                f" [-{MAX_SECONDS}, {MAX_SECONDS}]."
            )


def parse_config(model_config: dict, t5_config: dict) -> Config:
    """Read the architecture from the checkpoint's own configs, refusing what we do not
    implement."""
    if model_config.get("model_type") != "diffusion_cond":
        raise ValueError(
            f"Unsupported model_type {model_config.get('model_type')!r} in"
            " model_config.json (supported: diffusion_cond, the text-to-audio models"
            " of stable-audio-tools)."
        )
    for key in ("sample_rate", "sample_size"):
        if not isinstance(model_config.get(key), int) or model_config[key] <= 0:
            raise ValueError(f"model_config.json has no valid {key}.")
    model = model_config.get("model", {})
    t5 = T5Config.from_dict(t5_config)
    conditioner = ConditionerConfig.from_model_config(model)
    dit = DiTConfig.from_model_config(model)
    vae = VAEConfig.from_model_config(model)
    for section, c in (
        ("T5", t5),
        ("conditioning", conditioner),
        ("DiT", dit),
        ("autoencoder", vae),
    ):
        check_values(section, c)
    check_sizes(model_config, conditioner, vae)
    number_widths = len(conditioner.global_ids) * conditioner.cond_dim
    checks = [
        (
            t5.d_model == conditioner.cond_dim,
            "T5 width",
            t5.d_model,
            "cond_dim",
            conditioner.cond_dim,
        ),
        (
            dit.cond_token_dim == conditioner.cond_dim,
            "DiT cond_token_dim",
            dit.cond_token_dim,
            "cond_dim",
            conditioner.cond_dim,
        ),
        (
            dit.global_cond_dim == number_widths,
            "DiT global_cond_dim",
            dit.global_cond_dim,
            "global conditioning width",
            number_widths,
        ),
        (
            dit.io_channels == vae.latent_dim,
            "DiT io_channels",
            dit.io_channels,
            "latent_dim",
            vae.latent_dim,
        ),
        (
            model_config.get("audio_channels", 2) == vae.audio_channels,
            "audio_channels",
            model_config.get("audio_channels"),
            "autoencoder channels",
            vae.audio_channels,
        ),
    ]
    for ok, a, a_value, b, b_value in checks:
        if not ok:
            raise ValueError(
                f"Inconsistent model_config.json: {a} {a_value} does not match {b}"
                f" {b_value}."
            )
    return Config(
        sample_rate=model_config["sample_rate"],
        sample_size=model_config["sample_size"],
        t5=t5,
        conditioner=conditioner,
        dit=dit,
        vae=vae,
        model_config=model_config,
        t5_config=t5_config,
    )


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is damaged: it is not valid JSON ({e}).") from None
    if not isinstance(value, dict):
        raise ValueError(
            f"{path} is damaged: it holds a JSON {type(value).__name__}, not an object."
        )
    return value


def read_safetensors(path: Path, dtypes: tuple, metadata: bool = False):
    """The tensors of a safetensors file (and with `metadata`, its metadata too),
    refused if it is cut short, damaged, or holds a dtype other than `dtypes`. mx.load
    checks the header and every tensor's extent against the file's size without reading
    the data.
    """
    try:
        tensors, stored = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        reason = str(e).split("] ", 1)[-1].split(". Perhaps")[0].rstrip(".")
        if "unsupported dtype" in reason:  # float64, say: a file from another tool
            raise ValueError(
                f"{path} holds tensors of a type MLX cannot load ({reason}); expected"
                " float32, float16 or bfloat16."
            ) from None
        raise ValueError(
            f"{path} is damaged ({reason}): download or convert it again."
        ) from None
    if not isinstance(tensors, dict):  # a .npy file under this name, say
        raise ValueError(f"{path} is damaged: it is not a safetensors file.")
    for key, value in tensors.items():
        if value.dtype not in dtypes:
            allowed = ", ".join(str(d).split(".")[-1] for d in dtypes)
            raise ValueError(
                f"Tensor {path.name}: {key} has dtype"
                f" {str(value.dtype).split('.')[-1]}; expected {allowed}."
            )
    return (tensors, stored) if metadata else tensors


def write_safetensors(path, tensors: dict, metadata: dict):
    """mx.save_safetensors, the file appearing only when whole (files.written)."""
    mx.eval(tensors)  # computed first, so that a failure while writing is the disk's
    with written(path) as tmp:
        mx.save_safetensors(str(tmp), tensors, metadata=metadata)


def sanitize(tensors: dict, models: dict) -> tuple[dict, dict]:
    """Released-checkpoint tensors -> MLX-named weights, and the original name of
    each."""
    weights, origin = {}, {}
    for key, value in tensors.items():
        name = key
        for old, new in RENAMES:
            name = name.replace(old, new)
        weights[name], origin[name] = value, key

    # Deliberately dropped: the tied copy of T5's embedding, and RoPE's inverse
    # frequencies (a constant buffer; mx.fast.rope derives it from its base)
    weights.pop("encoder.embed_tokens.weight", None)
    inv_freq = weights.pop("dit.rotary_pos_emb.inv_freq", None)
    if inv_freq is not None:
        dims = 2 * inv_freq.shape[0]
        expected = 1.0 / (10000.0 ** (mx.arange(0, dims, 2) / dims))
        if not mx.allclose(inv_freq, expected, rtol=1e-5).item():
            raise ValueError(
                "Unsupported RoPE frequencies in"
                f" {origin['dit.rotary_pos_emb.inv_freq']} (base is not 10000)."
            )

    # Weight norm: w = g * v / ||v||, the norm taken per index of dim 0 in PyTorch
    # layout (the output channel of a Conv1d, the input channel of a ConvTranspose1d)
    for name in [n for n in weights if n.endswith(".weight_v")]:
        base = name[: -len("_v")]
        v, g = weights.pop(name), weights.pop(base + "_g", None)
        if g is None:
            raise ValueError(f"{origin[name]} has no matching weight_g.")
        norm = mx.sqrt(mx.sum(v.astype(mx.float32) ** 2, axis=(1, 2), keepdims=True))
        weights[base], origin[base] = g * v / norm, origin[name]

    # PyTorch conv layouts -> MLX: Conv1d (out, in, k) -> (out, k, in);
    # ConvTranspose1d (in, out, k) -> (out, k, in)
    for component, module in models.items():
        for path, layer in module.named_modules():
            name = f"{component}.{path}.weight"
            if name in weights and isinstance(layer, nn.ConvTranspose1d):
                weights[name] = weights[name].transpose(1, 2, 0)
            elif name in weights and isinstance(layer, nn.Conv1d):
                weights[name] = weights[name].transpose(0, 2, 1)
    return weights, {name: origin[name] for name in weights}


FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def _released_weights(
    folder: Path, models: dict, read_pickle=None
) -> tuple[dict, dict]:
    tensors, files = {}, {}
    weights_file = RELEASED_FILES["weights"]
    if not (
        folder / weights_file
    ).is_file():  # _check_layout let it through: read_pickle is given
        weights_file = PICKLED
    for file in (weights_file, RELEASED_FILES["t5_weights"]):
        read = (
            read_pickle(folder / file)
            if file == PICKLED
            else read_safetensors(folder / file, FLOATS)
        )
        for key, value in read.items():
            tensors[key], files[key] = value, file
    weights, origin = sanitize(tensors, models)
    return weights, {k: f"{files[key]}: {key}" for k, key in origin.items()}


def _converted_weights(folder: Path) -> tuple[dict, dict]:
    weights, sources = {}, {}
    for component in COMPONENTS:
        file = f"{component}.safetensors"
        # uint32: the packed weights of a quantized DiT
        for key, value in read_safetensors(
            folder / file, FLOATS + (mx.uint32,)
        ).items():
            weights[f"{component}.{key}"] = value
            sources[f"{component}.{key}"] = f"{file}: {key}"
    return weights, sources


def load_strict(component: str, module: nn.Module, weights: dict, sources: dict):
    """Load every parameter of `module` from `weights`, refusing anything unexpected."""
    expected = dict(tree_flatten(module.parameters()))
    prefix = component + "."
    # popped, so the source tensors are freed once the (possibly cast) parameters exist
    ours = {
        k[len(prefix) :]: weights.pop(k) for k in list(weights) if k.startswith(prefix)
    }
    for key, value in ours.items():
        if key not in expected:
            raise ValueError(
                f"Unexpected tensor {sources[prefix + key]} (no such {component}"
                " parameter)."
            )
        if (value.dtype == mx.uint32) != (expected[key].dtype == mx.uint32):
            raise ValueError(
                f"Tensor {sources[prefix + key]} has dtype {value.dtype}; the model"
                f" expects {expected[key].dtype}."
            )
        if value.shape != expected[key].shape:
            raise ValueError(
                f"Tensor {sources[prefix + key]} has shape {tuple(value.shape)}; "
                f"the model config implies {tuple(expected[key].shape)}."
            )
    missing = sorted(expected.keys() - ours.keys())
    if missing:
        raise ValueError(
            f"The checkpoint has no tensor for {component} parameter {missing[0]}"
            f" ({len(missing)} missing)."
        )
    module.load_weights(list(ours.items()), strict=True)


def build(config: Config) -> dict:
    """The four networks with unset (lazily random) parameters."""
    return {
        "t5": T5Encoder(config.t5),
        "conditioner": Conditioner(config.conditioner),
        "dit": DiT(config.dit),
        "vae": VAE(config.vae),
    }


@dataclass
class Components:
    config: Config
    tokenizer: Tokenizer
    t5: T5Encoder
    conditioner: Conditioner
    dit: DiT
    vae: VAE

    def modules(self) -> dict:
        return {c: getattr(self, c) for c in COMPONENTS}


def _read_config(folder: Path) -> Config:
    """The configs of a folder, any value we cannot run refused with its file named."""
    if is_converted(folder):
        file = folder / "config.json"
        stored = _read_json(file)
        if stored.get("model_type") != "stable-audio":
            raise ValueError(
                f"{file} is not a config written by convert.py (its model_type is"
                f" {stored.get('model_type')!r})."
            )
        files = (file, file)
        configs = (stored.get("model_config"), stored.get("text_encoder"))
        quantization = stored.get("quantization")
    else:
        files = (
            folder / RELEASED_FILES["config"],
            folder / RELEASED_FILES["t5_config"],
        )
        configs = tuple(_read_json(f) for f in files)
        quantization = None
    try:
        config = parse_config(*configs)
        if quantization is not None and set(quantization) != {"group_size", "bits"}:
            raise ValueError(f"Unsupported quantization {quantization!r}.")
    except ValueError as e:
        raise ValueError(f"{files[0].parent}: {e}") from None
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        # a value of another type, or a section missing, where the checks above did not
        # look
        raise ValueError(
            f"{files[0]} or {files[1].name} holds a value we cannot read"
            f" ({type(e).__name__}: {e})."
        ) from None
    config.quantization = quantization
    return config


def quantize_dit(dit: nn.Module, group_size: int = 64, bits: int = 4):
    """Quantize the linear layers of the transformer blocks (99% of the DiT's weights).

    At 4 bits the self-attention projections keep 8: on random weights they carry most
    of the error (18% relative on the DiT's output with them at 4 bits, 7% without).
    The timestep, conditioning and global embedders, project_in/out and the 1x1 convs
    stay in floating point, as do T5 and the VAE."""
    if bits not in (4, 8) or group_size not in (32, 64, 128):
        raise ValueError(
            f"Unsupported quantization: {bits} bits in groups of {group_size} "
            "(supported: 4 or 8 bits, groups of 32, 64 or 128)."
        )

    def settings(path: str, module: nn.Module):
        if not (path.startswith("layers.") and isinstance(module, nn.Linear)):
            return False
        if module.weight.shape[1] % group_size:
            return False
        return {"group_size": group_size, "bits": 8 if ".self_attn." in path else bits}

    nn.quantize(dit, class_predicate=settings)


def _quantize_as_stored(dit: nn.Module, weights: dict, sources: dict):
    """Quantize a skeleton like the stored DiT, each layer's bits and group size read
    from the shapes of its packed weights and scales."""

    def settings(path: str, module: nn.Module):
        scales, packed = weights.get(f"dit.{path}.scales"), weights.get(
            f"dit.{path}.weight"
        )
        if scales is None or not isinstance(module, nn.Linear):
            return False
        in_dims = module.weight.shape[1]
        if (
            packed is None
            or packed.ndim != 2
            or scales.ndim != 2
            or not scales.shape[1]
        ):
            raise ValueError(
                f"Tensor {sources[f'dit.{path}.scales']} belongs to no valid quantized"
                " weight."
            )
        bits, group_size = packed.shape[1] * 32 // in_dims, in_dims // scales.shape[1]
        if bits not in (4, 8) or group_size not in (32, 64, 128):
            raise ValueError(
                f"Tensor {sources[f'dit.{path}.weight']} is quantized as we cannot read"
                f" ({bits} bits in groups of {group_size})."
            )
        return {"group_size": group_size, "bits": bits}

    nn.quantize(dit, class_predicate=settings)


def load_config(path_or_repo: str = DEFAULT_REPO) -> Config:
    """The architecture alone, without reading (or downloading) any weights."""
    return _read_config(resolve(path_or_repo, configs_only=True))


def load(
    path_or_repo: str = DEFAULT_REPO,
    dtype=None,
    vae_dtype=mx.float32,
    quantize: dict = None,
    read_pickle=None,
) -> Components:
    """Load a released checkpoint folder, a folder written by convert.py, or a Hub repo.

    `dtype` applies to T5 and the DiT (None keeps the stored dtype); the conditioner
    stays in float32 and the autoencoder in `vae_dtype`. `quantize` ({"group_size",
    "bits"}) quantizes a floating-point DiT after loading. The VAE encoder, which
    text-to-audio does not use, is read from disk only when first used. Only safetensors
    are read, unless `read_pickle` (a function of a path returning {name: mx.array}:
    convert.py's, which needs torch) is given to read a released folder's model.ckpt in
    place of a missing model.safetensors.
    """
    folder = resolve(path_or_repo, allow_pickle=read_pickle is not None)
    config = _read_config(folder)
    if quantize and config.quantization:
        raise ValueError(
            f"{path_or_repo} is already quantized ({config.quantization['bits']} bits)."
        )
    tokenizer_file = folder / (
        "spiece.model" if is_converted(folder) else RELEASED_FILES["tokenizer"]
    )
    tokenizer = Tokenizer(tokenizer_file, config.conditioner.text_max_length)
    if tokenizer.sp.get_piece_size() > config.t5.vocab_size:
        raise ValueError(
            f"{tokenizer_file} has {tokenizer.sp.get_piece_size()} tokens, more than"
            f" T5's vocab_size {config.t5.vocab_size}."
        )

    models = build(config)
    if is_converted(folder):
        weights, sources = _converted_weights(folder)
        # quantize the skeleton first: the stored weights are packed integers
        _quantize_as_stored(models["dit"], weights, sources)
    else:
        weights, sources = _released_weights(folder, models, read_pickle)
    unknown = sorted(k for k in weights if k.split(".")[0] not in models)
    if unknown:
        raise ValueError(f"Unexpected tensor {sources[unknown[0]]} in the checkpoint.")

    dtypes = {"t5": dtype, "conditioner": mx.float32, "dit": dtype, "vae": vae_dtype}
    for component, module in models.items():
        load_strict(component, module, weights, sources)
        if dtypes[component] is not None:
            module.set_dtype(dtypes[component])
        # checked as cast, so that the stored tensors feed only the cast; the VAE's
        # encoder is read when first used, and its output checked then
        used = module.decoder if component == "vae" else module
        names, values = zip(*tree_flatten(used.parameters()))
        finite = mx.stack([mx.all(mx.isfinite(v)) for v in values])
        kinds = [str(v.dtype).split(".")[-1] for v in values]
        del values  # quantizing replaces them
        if component == "dit" and quantize:
            quantize_dit(module, **quantize)
            config.quantization = dict(quantize)
        mx.eval(finite, used.parameters())
        if not finite.all():
            i = finite.tolist().index(False)
            prefix = f"{component}.decoder." if component == "vae" else f"{component}."
            raise ValueError(
                f"Tensor {sources[prefix + names[i]]} holds NaN or Inf as {kinds[i]}:"
                " the file is damaged (or its values overflow that dtype); download or"
                " convert it again."
            )
    return Components(config, tokenizer, **models)

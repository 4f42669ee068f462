import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .dit import DiT, Conditioner, ConditionerConfig, DiTConfig
from .t5 import T5Config, T5Encoder, Tokenizer
from .vae import VAE, VAEConfig

DEFAULT_REPO = "stabilityai/stable-audio-open-1.0"

# The files of the released Hub repo that we read (it also holds model.ckpt and diffusers folders)
RELEASED_FILES = {
    "config": "model_config.json",
    "weights": "model.safetensors",
    "t5_config": "text_encoder/config.json",
    "t5_weights": "text_encoder/model.safetensors",
    "tokenizer": "tokenizer/spiece.model",
}
# The files convert.py writes: one safetensors file per component
COMPONENTS = ("t5", "conditioner", "dit", "vae")
CONVERTED_FILES = ["config.json", "spiece.model"] + [f"{c}.safetensors" for c in COMPONENTS]

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
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.", "t5.relative_attention_bias."),
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


def parse_config(model_config: dict, t5_config: dict) -> Config:
    """Read the architecture from the checkpoint's own configs, refusing what we do not implement."""
    if model_config.get("model_type") != "diffusion_cond":
        raise ValueError(
            f"Unsupported model_type {model_config.get('model_type')!r} in model_config.json "
            "(supported: diffusion_cond, the text-to-audio models of stable-audio-tools)."
        )
    for key in ("sample_rate", "sample_size"):
        if not isinstance(model_config.get(key), int) or model_config[key] <= 0:
            raise ValueError(f"model_config.json has no valid {key}.")
    model = model_config.get("model", {})
    t5 = T5Config.from_dict(t5_config)
    conditioner = ConditionerConfig.from_model_config(model)
    dit = DiTConfig.from_model_config(model)
    vae = VAEConfig.from_model_config(model)
    number_widths = len(conditioner.global_ids) * conditioner.cond_dim
    checks = [
        (t5.d_model == conditioner.cond_dim, "T5 width", t5.d_model, "cond_dim", conditioner.cond_dim),
        (dit.cond_token_dim == conditioner.cond_dim, "DiT cond_token_dim", dit.cond_token_dim, "cond_dim", conditioner.cond_dim),
        (dit.global_cond_dim == number_widths, "DiT global_cond_dim", dit.global_cond_dim, "global conditioning width", number_widths),
        (dit.io_channels == vae.latent_dim, "DiT io_channels", dit.io_channels, "latent_dim", vae.latent_dim),
        (model_config.get("audio_channels", 2) == vae.audio_channels, "audio_channels", model_config.get("audio_channels"), "autoencoder channels", vae.audio_channels),
    ]
    for ok, a, a_value, b, b_value in checks:
        if not ok:
            raise ValueError(f"Inconsistent model_config.json: {a} {a_value} does not match {b} {b_value}.")
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


def resolve(path_or_repo: str, configs_only: bool = False) -> Path:
    """A local folder, or a Hub repo id downloaded (only the files we read) to the cache."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_repo)):
        raise ValueError(f"{path_or_repo} is neither a model folder nor a Hugging Face repo id.")
    from huggingface_hub import snapshot_download

    patterns = list(RELEASED_FILES.values()) + CONVERTED_FILES
    if configs_only:
        patterns = [p for p in patterns if p.endswith(".json")]
    return Path(snapshot_download(path_or_repo, allow_patterns=patterns))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a Stable Audio model folder.")
    with open(path) as f:
        return json.load(f)


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and not (folder / "model_config.json").is_file()


def sanitize(tensors: dict, models: dict) -> tuple[dict, dict]:
    """Released-checkpoint tensors -> MLX-named weights, and the original name of each."""
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
            raise ValueError(f"Unsupported RoPE frequencies in {origin['dit.rotary_pos_emb.inv_freq']} (base is not 10000).")

    # Weight norm: w = g * v / ||v||, the norm taken per index of dim 0 in PyTorch layout
    # (the output channel of a Conv1d, the input channel of a ConvTranspose1d)
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


def _released_weights(folder: Path, models: dict) -> tuple[dict, dict]:
    tensors, files = {}, {}
    for file in (RELEASED_FILES["weights"], RELEASED_FILES["t5_weights"]):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder / file} is missing.")
        for key, value in mx.load(str(folder / file)).items():
            tensors[key], files[key] = value, file
    weights, origin = sanitize(tensors, models)
    return weights, {k: f"{files[key]}: {key}" for k, key in origin.items()}


def _converted_weights(folder: Path) -> tuple[dict, dict]:
    weights, sources = {}, {}
    for component in COMPONENTS:
        file = f"{component}.safetensors"
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder / file} is missing.")
        for key, value in mx.load(str(folder / file)).items():
            weights[f"{component}.{key}"] = value
            sources[f"{component}.{key}"] = f"{file}: {key}"
    return weights, sources


def load_strict(component: str, module: nn.Module, weights: dict, sources: dict):
    """Load every parameter of `module` from `weights`, refusing anything unexpected."""
    expected = dict(tree_flatten(module.parameters()))
    prefix = component + "."
    # popped, so the source tensors are freed once the (possibly cast) parameters exist
    ours = {k[len(prefix) :]: weights.pop(k) for k in list(weights) if k.startswith(prefix)}
    for key, value in ours.items():
        if key not in expected:
            raise ValueError(f"Unexpected tensor {sources[prefix + key]} (no such {component} parameter).")
        if value.shape != expected[key].shape:
            raise ValueError(
                f"Tensor {sources[prefix + key]} has shape {tuple(value.shape)}; "
                f"the model config implies {tuple(expected[key].shape)}."
            )
    missing = sorted(expected.keys() - ours.keys())
    if missing:
        raise ValueError(f"The checkpoint has no tensor for {component} parameter {missing[0]} ({len(missing)} missing).")
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
    if is_converted(folder):
        stored = _read_json(folder / "config.json")
        config = parse_config(stored["model_config"], stored["text_encoder"])
        config.quantization = stored.get("quantization")
        return config
    return parse_config(
        _read_json(folder / RELEASED_FILES["config"]),
        _read_json(folder / RELEASED_FILES["t5_config"]),
    )


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


def _quantize_as_stored(dit: nn.Module, weights: dict):
    """Quantize a skeleton like the stored DiT, each layer's bits and group size read from
    the shapes of its packed weights and scales."""

    def settings(path: str, module: nn.Module):
        scales = weights.get(f"dit.{path}.scales")
        if scales is None or not isinstance(module, nn.Linear):
            return False
        in_dims = module.weight.shape[1]
        bits = weights[f"dit.{path}.weight"].shape[1] * 32 // in_dims
        return {"group_size": in_dims // scales.shape[1], "bits": bits}

    nn.quantize(dit, class_predicate=settings)


def load_config(path_or_repo: str = DEFAULT_REPO) -> Config:
    """The architecture alone, without reading (or downloading) any weights."""
    return _read_config(resolve(path_or_repo, configs_only=True))


def load(
    path_or_repo: str = DEFAULT_REPO, dtype=None, vae_dtype=mx.float32, quantize: dict = None
) -> Components:
    """Load a released checkpoint folder, a folder written by convert.py, or a Hub repo.

    `dtype` applies to T5 and the DiT (None keeps the stored dtype); the conditioner stays
    in float32 and the autoencoder in `vae_dtype`. `quantize` ({"group_size", "bits"})
    quantizes a floating-point DiT after loading. The VAE encoder, which text-to-audio
    does not use, is read from disk only when first used.
    """
    folder = resolve(path_or_repo)
    config = _read_config(folder)
    if quantize and config.quantization:
        raise ValueError(f"{path_or_repo} is already quantized ({config.quantization['bits']} bits).")
    tokenizer_file = folder / ("spiece.model" if is_converted(folder) else RELEASED_FILES["tokenizer"])
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} is missing.")

    models = build(config)
    if is_converted(folder):
        weights, sources = _converted_weights(folder)
        # quantize the skeleton first: the stored weights are packed integers
        _quantize_as_stored(models["dit"], weights)
    else:
        weights, sources = _released_weights(folder, models)
    unknown = sorted(k for k in weights if k.split(".")[0] not in models)
    if unknown:
        raise ValueError(f"Unexpected tensor {sources[unknown[0]]} in the checkpoint.")

    dtypes = {"t5": dtype, "conditioner": mx.float32, "dit": dtype, "vae": vae_dtype}
    for component, module in models.items():
        load_strict(component, module, weights, sources)
        if dtypes[component] is not None:
            module.set_dtype(dtypes[component])
        if component == "dit" and quantize:
            quantize_dit(module, **quantize)
            config.quantization = dict(quantize)
        mx.eval(module.decoder.parameters() if component == "vae" else module.parameters())
    tokenizer = Tokenizer(tokenizer_file, config.conditioner.text_max_length)
    return Components(config, tokenizer, **models)

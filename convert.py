import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from stable_audio import hub, lora, model_io
from stable_audio.cli import DTYPES, first_line, one_line_errors, parser


def read_pickled(path: Path) -> dict:
    """The tensors of a PyTorch checkpoint (its "state_dict"), read with torch.load's
    weights_only=True, which refuses any object but tensors and plain containers."""
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"Reading {path} (a pickled PyTorch checkpoint) needs torch: pip install"
            " torch."
        ) from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as e:  # UnpicklingError for a refused object, RuntimeError for damage, ...
        raise ValueError(
            f"{path} was refused by torch.load(weights_only=True): {first_line(e)}"
        ) from None
    state = (
        checkpoint.get("state_dict", checkpoint)
        if isinstance(checkpoint, dict)
        else None
    )
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state_dict of tensors.")
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"{path}: {key} is not a floating-point tensor.")
        dtype = {torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}.get(
            value.dtype, mx.float32
        )
        tensors[key] = mx.array(value.float().numpy()).astype(dtype)
    return tensors


def check_output(mlx_path: Path, force: bool):
    """Refuse an output folder we must not write: an existing one without `force`, or,
    even with it, anything but an empty folder or one that convert.py wrote."""
    if not mlx_path.parent.is_dir():
        raise ValueError(f"The folder {mlx_path.parent} does not exist.")
    if not (mlx_path.exists() or mlx_path.is_symlink()):
        return
    if not force:
        raise ValueError(
            f"{mlx_path} already exists; choose another --mlx-path, or replace it with"
            " --force."
        )
    ours = hub.is_converted(mlx_path) and all(
        (mlx_path / f).is_file() for f in hub.CONVERTED_FILES
    )
    if (
        mlx_path.is_symlink()
        or not mlx_path.is_dir()
        or not (ours or not any(mlx_path.iterdir()))
    ):
        raise ValueError(
            f"{mlx_path} is not a folder written by convert.py; --force replaces only"
            " those."
        )


def convert(
    hf_path: str,
    mlx_path: str,
    dtype: str = "float16",
    quantize: dict = None,
    force: bool = False,
    allow_pickle: bool = False,
    loras: list = (),
):
    """Write `hf_path` (released layout, local or on the Hub) as MLX safetensors in
    `mlx_path`.

    T5 and the DiT are stored in `dtype`; the conditioner and the autoencoder stay in
    float32. `loras` [(adapter file, strength), ...] are merged into the float32
    weights, in order, before the cast; then `quantize` ({"group_size", "bits"})
    quantizes the DiT's transformer blocks. config.json records the adapters merged.
    The folder appears only when complete: it is written under a temporary name beside
    `mlx_path` and renamed at the end; `force` then replaces an earlier conversion.
    `allow_pickle` reads a released folder's model.ckpt when it has no
    model.safetensors.
    """
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    mlx_path = Path(mlx_path)
    check_output(mlx_path, force)
    for path, strength in loras:
        lora.check_lora(path, strength)

    print(f"[INFO] Loading {hf_path}")
    read_pickle = read_pickled if allow_pickle else None
    if not loras:
        models = model_io.load(
            hf_path,
            dtype=getattr(mx, dtype),
            quantize=quantize,
            read_pickle=read_pickle,
        )
    else:
        models = model_io.load(hf_path, dtype=mx.float32, read_pickle=read_pickle)
        if quantize and models.config.quantization:
            raise ValueError(
                f"{hf_path} is already quantized ({models.config.quantization['bits']}"
                " bits)."
            )
        merged = []
        for path, strength in loras:
            print(f"[INFO] Merging {path} at strength {strength:g}")
            adapter = lora.read_adapter(path, models.dit, models.conditioner)
            lora.apply_adapter(models.dit, models.conditioner, adapter, strength)
            merged.append(
                {
                    "file": Path(path).name,
                    "adapter_type": adapter.adapter_type,
                    "rank": adapter.rank,
                    "alpha": adapter.alpha,
                    "strength": strength,
                }
            )
        for module in (models.t5, models.dit):
            module.set_dtype(getattr(mx, dtype))
        if quantize:
            model_io.quantize_dit(models.dit, **quantize)
            models.config.quantization = dict(quantize)
    config = {
        "model_type": "stable-audio",
        "dtype": dtype,
        "quantization": models.config.quantization,
        "model_config": models.config.model_config,
        "text_encoder": models.config.t5_config,
    }
    if loras:
        config["loras_merged"] = merged
    print(f"[INFO] Writing {mlx_path}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{mlx_path.name}.", dir=mlx_path.parent))
    try:
        for name, module in models.modules().items():
            weights = dict(tree_flatten(module.parameters()))
            mx.save_safetensors(
                str(tmp / f"{name}.safetensors"), weights, {"format": "mlx"}
            )
        (tmp / "spiece.model").write_bytes(models.tokenizer.model_proto)
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=4)
        check_output(mlx_path, force)  # again: it may have appeared meanwhile
        if mlx_path.exists():
            # set the old folder aside, put the new one in place, only then delete the
            # old
            os.rename(mlx_path, tmp / ".replaced")
            os.rename(tmp, mlx_path)
            shutil.rmtree(mlx_path / ".replaced")
        else:
            os.rename(tmp, mlx_path)
    except BaseException:
        if (tmp / ".replaced").exists() and not mlx_path.exists():
            os.rename(tmp / ".replaced", mlx_path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None):
    p = parser("Convert Stable Audio Open weights to MLX safetensors.")
    p.add_argument(
        "--hf-path",
        default=hub.DEFAULT_REPO,
        help="Released-layout folder or Hugging Face repo id (default: %(default)s).",
    )
    p.add_argument(
        "--mlx-path",
        default="mlx_model",
        help="Folder to create for the MLX model (default: %(default)s).",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help=(
            "Replace --mlx-path if it exists (only a folder convert.py wrote, or an"
            " empty one)."
        ),
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float16",
        help=(
            "dtype of T5 and the DiT; the autoencoder stays float32 (default:"
            " %(default)s)."
        ),
    )
    p.add_argument(
        "-q",
        "--quantize",
        action="store_true",
        help="Quantize the DiT's transformer blocks.",
    )
    p.add_argument(
        "--q-bits",
        type=int,
        choices=(4, 8),
        default=4,
        help="Bits per weight (default: %(default)s).",
    )
    p.add_argument(
        "--q-group-size",
        type=int,
        choices=(32, 64, 128),
        default=64,
        help="Weights sharing one scale and bias (default: %(default)s).",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help=(
            "Read the pickled model.ckpt when the checkpoint has no model.safetensors "
            "(needs torch; loaded with weights_only=True; only for a file you trust)."
        ),
    )
    p.add_argument(
        "--lora",
        type=lora.parse_file_strength,
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help=(
            "Merge this LoRA or DoRA adapter (stable-audio-tools' .safetensors) into"
            " the weights at STRENGTH (default 1), before --quantize; repeat to merge"
            " several, in order."
        ),
    )
    args = p.parse_args(argv)
    quantize = (
        {"group_size": args.q_group_size, "bits": args.q_bits}
        if args.quantize
        else None
    )
    with one_line_errors("nothing was written.", "Interrupted; nothing was written."):
        convert(
            args.hf_path,
            args.mlx_path,
            args.dtype,
            quantize,
            args.force,
            args.allow_pickle,
            args.lora,
        )
    print(f"[INFO] Wrote {args.mlx_path}")


if __name__ == "__main__":
    main()

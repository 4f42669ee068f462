import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from stable_audio import files, hub, lora, model_io
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
    even with it, anything but an empty folder or one holding only what convert.py
    writes (so that --force never deletes a file a person put there)."""
    if not mlx_path.parent.is_dir():
        raise ValueError(f"The folder {mlx_path.parent} does not exist.")
    if not (mlx_path.exists() or mlx_path.is_symlink()):
        return
    if not force:
        raise ValueError(
            f"{mlx_path} already exists; choose another --mlx-path, or replace it with"
            " --force."
        )
    if mlx_path.is_symlink() or not mlx_path.is_dir():
        raise ValueError(
            f"{mlx_path} is not a folder written by convert.py; --force replaces only"
            " those."
        )
    held = {p.name for p in mlx_path.iterdir()}
    others = sorted(held - set(hub.CONVERTED_FILES))
    if others:
        raise ValueError(
            f"{mlx_path} holds files convert.py did not write ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); --force would delete them: move"
            " them out, or choose another --mlx-path."
        )
    if held and not hub.is_converted(mlx_path):
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
    tmp = None
    try:
        with files.deferred_interrupts():  # made first: can the folder take it?
            tmp = files.temporary(mlx_path, folder=True)
        print(f"[INFO] Loading {hf_path}")
        models, merged = load_models(hf_path, dtype, quantize, allow_pickle, loras)
        print(f"[INFO] Writing {mlx_path}")
        write_folder(tmp, models, dtype, merged)
        check_output(mlx_path, force)  # again: it may have appeared meanwhile
        put_in_place(tmp, mlx_path)
    except BaseException as e:
        failure = files.full_disk(mlx_path, e, tmp)
        if tmp is not None:
            files.remove(tmp)
        if failure is not None:
            raise failure from None
        raise


def load_models(hf_path, dtype: str, quantize, allow_pickle: bool, loras) -> tuple:
    """The models to write, `loras` merged, cast and quantized; and what was merged."""
    read_pickle = read_pickled if allow_pickle else None
    if not loras:
        models = model_io.load(
            hf_path,
            dtype=getattr(mx, dtype),
            quantize=quantize,
            read_pickle=read_pickle,
        )
        return models, []
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
    return models, merged


def write_folder(folder: Path, models, dtype: str, merged: list):
    """The converted layout: a safetensors file per component, the tokenizer, and
    config.json (the checkpoint's own configs, with what was done to them)."""
    config = {
        "model_type": "stable-audio",
        "dtype": dtype,
        "quantization": models.config.quantization,
        "model_config": models.config.model_config,
        "text_encoder": models.config.t5_config,
    }
    if merged:
        config["loras_merged"] = merged
    for name, module in models.modules().items():
        weights = dict(tree_flatten(module.parameters()))
        mx.eval(
            weights
        )  # computed first, so that a failure while writing is the disk's
        mx.save_safetensors(
            str(folder / f"{name}.safetensors"), weights, {"format": "mlx"}
        )
    (folder / "spiece.model").write_bytes(models.tokenizer.model_proto)
    (folder / "config.json").write_text(json.dumps(config, indent=4))


def put_in_place(tmp: Path, mlx_path: Path):
    """Rename the written folder `tmp` to `mlx_path`; an earlier conversion there is
    set aside first and deleted only once the new one is in place."""
    if not mlx_path.exists():
        os.rename(tmp, mlx_path)
        return
    os.rename(mlx_path, tmp / ".replaced")
    try:
        os.rename(tmp, mlx_path)
    except BaseException:
        os.rename(tmp / ".replaced", mlx_path)
        raise
    shutil.rmtree(mlx_path / ".replaced")


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

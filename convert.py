import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from stable_audio import model_io

DTYPES = ("float16", "bfloat16", "float32")


def convert(hf_path: str, mlx_path: str, dtype: str = "float16", quantize: dict = None):
    """Write `hf_path` (released layout, local or on the Hub) as MLX safetensors in `mlx_path`.

    T5 and the DiT are stored in `dtype`; the conditioner and the autoencoder stay in
    float32. `quantize` ({"group_size", "bits"}) quantizes the DiT's transformer blocks.
    The folder appears only when complete: it is written under a temporary name beside
    `mlx_path` and renamed at the end.
    """
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    mlx_path = Path(mlx_path)
    if mlx_path.exists():
        raise ValueError(f"{mlx_path} already exists; remove it or choose another --mlx-path.")
    if not mlx_path.parent.is_dir():
        raise ValueError(f"The folder {mlx_path.parent} does not exist.")

    models = model_io.load(hf_path, dtype=getattr(mx, dtype), quantize=quantize)
    config = {
        "model_type": "stable-audio",
        "dtype": dtype,
        "quantization": models.config.quantization,
        "model_config": models.config.model_config,
        "text_encoder": models.config.t5_config,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{mlx_path.name}.", dir=mlx_path.parent))
    try:
        for name, module in models.modules().items():
            weights = dict(tree_flatten(module.parameters()))
            mx.save_safetensors(str(tmp / f"{name}.safetensors"), weights, {"format": "mlx"})
        (tmp / "spiece.model").write_bytes(models.tokenizer.model_proto)
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=4)
        tmp.rename(mlx_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Convert Stable Audio Open weights to MLX safetensors."
    )
    parser.add_argument(
        "--hf-path",
        default=model_io.DEFAULT_REPO,
        help="Released-layout folder or Hugging Face repo id (default: %(default)s).",
    )
    parser.add_argument(
        "--mlx-path",
        default="mlx_model",
        help="Folder to create for the MLX model (default: %(default)s).",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float16",
        help="dtype of T5 and the DiT; the autoencoder stays float32 (default: %(default)s).",
    )
    parser.add_argument(
        "-q", "--quantize", action="store_true", help="Quantize the DiT's transformer blocks."
    )
    parser.add_argument(
        "--q-bits", type=int, choices=(4, 8), default=4, help="Bits per weight (default: %(default)s)."
    )
    parser.add_argument(
        "--q-group-size",
        type=int,
        choices=(32, 64, 128),
        default=64,
        help="Weights sharing one scale and bias (default: %(default)s).",
    )
    args = parser.parse_args()
    quantize = {"group_size": args.q_group_size, "bits": args.q_bits} if args.quantize else None
    try:
        convert(args.hf_path, args.mlx_path, args.dtype, quantize)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"[INFO] Wrote {args.mlx_path}")

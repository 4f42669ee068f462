"""What the scripts share: their argument parser, dtype names, range and interval
parsing, the adapter flags, and the one-line error exit."""

import argparse
import math
import sys
from contextlib import contextmanager

import mlx.core as mx

from . import lora
from .files import interruptible

DTYPES = ("float16", "bfloat16", "float32")
INTERVAL = "MIN:MAX noise levels, e.g. 0.1:0.9"


def parser(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose errors are one line, without the usage."""
    result = argparse.ArgumentParser(description=description)
    result.error = lambda message: sys.exit(f"error: {message} (see --help)")
    return result


def first_line(error: Exception) -> str:
    """An exception's message cut to its first line (its name if it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def one_line_errors(advice: str, interrupted: str = "Interrupted."):
    """Exit with one line for what a user can meet: their own mistakes (ValueError, and
    ArgumentError among them), files (OSError), overflow; MLX's own failures (out of
    memory, most likely) followed by `advice`; Ctrl-C, SIGTERM and SIGHUP with
    `interrupted`, once what they interrupted has cleaned up."""
    try:
        with interruptible():
            yield
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except (RuntimeError, MemoryError) as e:
        sys.exit(f"error: MLX failed ({first_line(e)}); {advice}")
    except KeyboardInterrupt:
        sys.exit(interrupted)


def dtype_name(name: str, default: str = "float16") -> str:
    """`name`, checked (None: `default` on a GPU, float32 on the CPU)."""
    if name is None:
        name = default if mx.default_device() == mx.gpu else "float32"
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.")
    return name


def dtype(name: str, default: str = "float16") -> mx.Dtype:
    return getattr(mx, dtype_name(name, default))


def number(text: str) -> float:
    """A float flag's value: a finite number (argparse's one-line error if not)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
    return value


def parse_range(text: str, example: str = "START:END in seconds, e.g. 10:15") -> tuple:
    try:
        start, end = (float(t) for t in text.split(":"))
    except ValueError:
        start = end = math.nan
    if not (math.isfinite(start) and math.isfinite(end)):
        raise argparse.ArgumentTypeError(f"expected {example}, not {text!r}")
    return start, end


def parse_interval(text: str) -> tuple:
    return parse_range(text, INTERVAL)


def add_model_arguments(group):
    """How the model is loaded and run: precision, quantization, compilation."""
    add = group.add_argument
    add(
        "--dtype",
        help=(
            f"One of {', '.join(DTYPES)} for T5 and the DiT (default: float16 on a "
            "GPU, float32 on the CPU)"
        ),
    )
    add(
        "--vae-dtype",
        default="float32",
        help="dtype of the VAE decoder (default: %(default)s)",
    )
    add(
        "--quantize",
        type=int,
        choices=(4, 8),
        help="Quantize a floating-point DiT to 4 or 8 bits at load time",
    )
    add(
        "--compile",
        action="store_true",
        help="Compile each sampler step (DiT, guidance and update) with mx.compile",
    )


def add_lora_arguments(parser: argparse.ArgumentParser):
    parser.add_argument(
        "--lora",
        type=lora.parse_file_strength,
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help=(
            "A LoRA or DoRA adapter file (stable-audio-tools' .safetensors) and its "
            "strength (default 1); repeat to stack several, applied in order"
        ),
    )
    parser.add_argument(
        "--lora-interval",
        type=parse_interval,
        action="append",
        default=[],
        metavar="MIN:MAX",
        help=(
            "Use the adapter only at noise levels in [MIN, MAX], as --cfg-interval; "
            "give it once for every adapter, or once per --lora (default: always)"
        ),
    )
    parser.add_argument(
        "--lora-layer-filter",
        action="append",
        default=[],
        metavar="PATTERNS",
        help=(
            "Comma-separated patterns of the DiT layers the adapter leaves alone, in"
            " stable-audio-tools' names, e.g."
            " 'transformer.layers.[0-5].,to_global_embed'; once for every adapter, or"
            " once per --lora"
        ),
    )


def lora_settings(args) -> list:
    """(file, strength, interval, layer_filter) per --lora; an interval or a filter
    given once applies to every adapter, or is given once per --lora, in order."""
    n = len(args.lora)
    per_adapter = []
    for flag, values, default in (
        ("--lora-interval", args.lora_interval, None),
        ("--lora-layer-filter", args.lora_layer_filter, ""),
    ):
        if values and not n:
            raise ValueError(f"{flag} needs a --lora.")
        if len(values) not in (0, 1, n):
            raise ValueError(
                f"Give {flag} once (for every adapter) or once per --lora ({n} times), "
                f"not {len(values)} times."
            )
        per_adapter.append(values * n if len(values) == 1 else values or [default] * n)
    entries = [
        (path, strength, interval, layer_filter)
        for (path, strength), interval, layer_filter in zip(args.lora, *per_adapter)
    ]
    for entry in entries:
        lora.check_lora(*entry)
    return entries

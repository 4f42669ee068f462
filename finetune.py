"""Teach Stable Audio Open your own sounds: train a LoRA or DoRA adapter on a folder of
captioned audio files, written in stable-audio-tools 0.0.20's adapter format."""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from stable_audio import datasets, lora, model_io, trainer
from stable_audio.model_io import first_line

DTYPES = ("float16", "bfloat16", "float32")
CFG_DROPOUT = 0.1  # 0.0.20's default


def check_output(output: str, force: bool):
    path = Path(output)
    if path.suffix != ".safetensors":
        raise ValueError(f"The adapter file {output!r} must end in .safetensors.")
    if not path.parent.is_dir():
        raise ValueError(f"The folder of {output!r} does not exist.")
    if path.exists() and not force:
        raise ValueError(f"{output} already exists; choose another --output, or replace it with --force.")


def prepare_examples(models, clips, window: int, verbose: bool) -> list:
    """Each file cut into consecutive windows of `window` samples (the last zero-padded),
    each window encoded once to its posterior (mean, std) and kept with its latent mask,
    its seconds (as 0.0.20's PadCrop_Normalized_T sets them for that offset) and its
    caption's T5 output; silent windows are left out, as 0.0.20 rejects them."""
    config = models.config
    rate, ratio = config.sample_rate, config.vae.downsampling_ratio
    encoded_text = {}
    examples = []
    dtype = models.vae.encoder.layers[0].weight.dtype
    for path, caption in tqdm(clips, desc="Preparing", disable=not verbose):
        audio = datasets.load_clip(path, rate, config.vae.audio_channels)
        if caption not in encoded_text:
            tokens, mask = models.tokenizer([caption])
            text = models.t5(tokens, mask)
            mx.eval(text)
            encoded_text[caption] = (text[0], mask[0])
        for offset in range(0, audio.shape[1], window):
            chunk, sample_mask, seconds_start, seconds_total = datasets.pad_crop(audio, window, rate, offset)
            if datasets.is_silent(chunk):
                continue
            mean, std = models.vae.posterior(mx.array(np.clip(chunk, -1, 1).T[None]).astype(dtype))
            mx.eval(mean, std)
            examples.append({
                "mean": mean[0].astype(mx.float32), "std": std[0].astype(mx.float32),
                "loss_mask": mx.array(datasets.latent_mask(sample_mask, window // ratio)),
                "text": encoded_text[caption][0], "text_mask": encoded_text[caption][1],
                "seconds_start": float(seconds_start), "seconds_total": float(seconds_total),
            })
    if not examples:
        raise ValueError("Every clip is silent (below -60 dBFS): there is nothing to learn from.")
    return examples


def batch_at(examples: list, step: int, seed: int, batch_size: int, shape: tuple) -> tuple:
    """The step's batch and random draws, a function of (seed, step) alone, so that a run
    is reproducible: the examples, the posterior samples, t ~ U(0, 1), the noise and the
    cfg-dropout mask."""
    rng = np.random.default_rng([seed, step])
    chosen = [examples[i] for i in rng.integers(0, len(examples), batch_size)]
    stack = lambda key: mx.stack([e[key] for e in chosen])
    draws = lambda: mx.array(rng.standard_normal((batch_size, *shape)).astype(np.float32))
    return (
        stack("mean"), stack("std"), draws(), mx.array(rng.uniform(size=batch_size).astype(np.float32)), draws(),
        stack("text"), stack("text_mask"), mx.array([e["seconds_start"] for e in chosen]),
        mx.array([e["seconds_total"] for e in chosen]), stack("loss_mask"),
        mx.array(rng.uniform(size=batch_size) < CFG_DROPOUT),
    )


def checkpoint_path(output: str) -> Path:
    """Where a run keeps what --resume needs, beside its adapter file."""
    path = Path(output)
    return path.with_name(path.stem + ".checkpoint.safetensors")


def save_checkpoint(path: Path, model, optimizer, step: int, settings: dict):
    """The adapters, the optimizer's state, the step and the run's settings in one file,
    written atomically. The random draws are a function of (seed, step), so nothing else
    is needed to go on exactly where the run stopped."""
    tensors = {f"adapter.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
    tensors.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)})
    model_io.write_safetensors(path, tensors, {"step": str(step), "settings": json.dumps(settings)})


def load_checkpoint(path: Path, model, optimizer, settings: dict) -> int:
    """Restore save_checkpoint's file into a fresh model and optimizer (whose state has
    been initialised); returns the step it was written at."""
    tensors, metadata = model_io.read_safetensors(path, model_io.FLOATS + (mx.uint32, mx.int32, mx.uint64, mx.int64), metadata=True)
    try:
        stored, step = json.loads(metadata["settings"]), int(metadata["step"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path} is not a checkpoint written by finetune.py.") from None
    changed = [k for k in settings if stored.get(k) != settings[k]]
    if changed:
        raise ValueError(f"{path} is of another run: its {changed[0]} is {stored.get(changed[0])!r}, not {settings[changed[0]]!r}.")
    adapters = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
    expected = dict(tree_flatten(model.trainable_parameters()))
    if adapters.keys() != expected.keys() or any(adapters[k].shape != expected[k].shape for k in expected):
        raise ValueError(f"{path} holds other adapters than this run trains.")
    model.update(tree_unflatten(list(adapters.items())))
    saved = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    current = dict(tree_flatten(optimizer.state))
    if saved.keys() != {k for k, v in current.items() if isinstance(v, mx.array)}:
        raise ValueError(f"{path} holds another optimizer state than this run's.")
    for key, value in saved.items():  # into the state's own nesting (lists where the model has lists)
        node, *_, last = [optimizer.state, *key.split(".")]
        for part in key.split(".")[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, no usage
    parser.add_argument("--model", default=model_io.DEFAULT_REPO, help="Converted folder, released folder or Hub repo (default: %(default)s)")
    parser.add_argument("--data", required=True, help="Folder of audio files, each captioned by a same-named .txt or a row of metadata.jsonl / metadata.csv")
    parser.add_argument("--output", required=True, help="The adapter file to write (.safetensors)")
    parser.add_argument("--force", action="store_true", help="Replace --output if it exists")
    parser.add_argument("--rank", type=int, default=8, help="Adapter rank (default: %(default)s)")
    parser.add_argument("--alpha", type=float, help="Adapter alpha; the update is scaled by alpha / rank (default: the rank)")
    parser.add_argument("--adapter-type", choices=lora.ADAPTER_TYPES, default="lora", help="lora or dora-rows (default: %(default)s)")
    parser.add_argument("--include", action="append", help="Adapt only layers whose stable-audio-tools name contains this (repeatable; e.g. 'transformer.layers.[0-11].')")
    parser.add_argument("--exclude", action="append", help="Leave out layers whose name contains this (repeatable; wins over --include)")
    parser.add_argument("--steps", type=int, default=1000, help="Training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="Examples per step (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW's learning rate after warm-up (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=100, help="Steps of linear learning-rate warm-up (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="AdamW's weight decay (default: %(default)s, SAO 1.0's)")
    parser.add_argument("--crop-seconds", type=float, help="Train on windows of this length (default: the model's whole window)")
    parser.add_argument("--seed", type=int, default=0, help="Random seed (default: %(default)s)")
    parser.add_argument("--save-every", type=int, default=0, help="Also write the adapter, and a checkpoint for --resume beside it, every N steps (default: only at the end)")
    parser.add_argument("--resume", action="store_true", help="Go on from the checkpoint beside --output (same data, model and settings)")
    parser.add_argument("--grad-checkpoint", action="store_true", help="Recompute each DiT block in the backward pass: less memory, more time")
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="Quantize the frozen DiT to 4 or 8 bits (QLoRA)")
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of T5 and the frozen DiT (default: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show the data preparation's progress")
    args = parser.parse_args(argv)

    try:
        check_output(args.output, args.force or args.resume)
        if args.resume and not checkpoint_path(args.output).is_file():
            raise ValueError(f"There is no checkpoint {checkpoint_path(args.output)} to resume from.")
        problems = [
            (args.rank < 1, "--rank must be >= 1"), (args.steps < 1, "--steps must be >= 1"),
            (args.batch_size < 1, "--batch-size must be >= 1"), (not args.learning_rate > 0, "--learning-rate must be > 0"),
            (args.warmup < 0 or args.save_every < 0, "--warmup and --save-every must be >= 0"),
            (args.alpha is not None and not args.alpha > 0, "--alpha must be > 0"),
        ]
        for failed, message in problems:
            if failed:
                raise ValueError(message + ".")
        clips = datasets.find_clips(args.data)
        config = model_io.load_config(args.model)
        window_seconds = config.sample_size / config.sample_rate
        seconds = window_seconds if args.crop_seconds is None else args.crop_seconds
        ratio = config.vae.downsampling_ratio
        window = math.ceil(seconds * config.sample_rate / ratio) * ratio  # whole latents
        if not (0 < seconds <= window_seconds + 1e-9 and window <= config.sample_size):
            raise ValueError(f"--crop-seconds must be in (0, {window_seconds:.2f}], the model's window.")
        if args.dtype is None:
            args.dtype = "bfloat16" if mx.default_device() == mx.gpu else "float32"

        dtype = getattr(mx, args.dtype)
        models = model_io.load(args.model, dtype=dtype)
        if args.quantize and models.config.quantization:
            raise ValueError(f"{args.model} is already quantized; leave out --quantize.")
        if args.quantize:
            model_io.quantize_dit(models.dit, 64, args.quantize)
        examples = prepare_examples(models, clips, window, args.verbose)
        del models.t5, models.vae  # T5 and the VAE are done with

        model = trainer.FineTuned(
            models.dit, models.conditioner, models.config.dit.objective, args.rank, args.alpha,
            args.adapter_type, args.include, args.exclude, key=mx.random.key(args.seed),
        )
        # linear warm-up from lr / warmup, then constant
        warmup = max(args.warmup, 1)
        schedule = optim.join_schedules(
            [optim.linear_schedule(args.learning_rate / warmup, args.learning_rate, warmup), lambda _: args.learning_rate], [warmup]
        )
        optimizer = optim.AdamW(learning_rate=schedule, weight_decay=args.weight_decay)
        models.dit.checkpoint_blocks = args.grad_checkpoint
        settings = {k: getattr(args, k) for k in ("model", "data", "rank", "alpha", "adapter_type", "include", "exclude",
                                                  "batch_size", "learning_rate", "warmup", "weight_decay", "crop_seconds",
                                                  "seed", "quantize", "dtype")}
        optimizer.init(model.trainable_parameters())
        first = 1
        if args.resume:
            first = load_checkpoint(checkpoint_path(args.output), model, optimizer, settings) + 1
            print(f"[INFO] Resuming at step {first}")
        step = trainer.training_step(model, optimizer)
        state = [model.state, optimizer.state]

        shape = examples[0]["mean"].shape
        start, losses = time.perf_counter(), []
        progress = tqdm(range(first, args.steps + 1), desc="Training", initial=first - 1, total=args.steps)
        for i in progress:
            loss = step(*batch_at(examples, i, args.seed, args.batch_size, shape))
            mx.eval(loss, state)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"The loss became {losses[-1]} at step {i}: lower --learning-rate, or use --dtype float32.")
            progress.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", it_s=f"{len(losses) / (time.perf_counter() - start):.2f}",
                                 peak=f"{mx.get_peak_memory() / 1e9:.2f} GB")
            if (args.save_every and i % args.save_every == 0) or i == args.steps:
                lora.save_adapter(args.output, model.adapter_tensors(), model.lora_config)
                save_checkpoint(checkpoint_path(args.output), model, optimizer, i, settings)
        if losses:
            print(f"[INFO] Wrote {args.output} ({len(examples)} examples; loss {np.mean(losses[:20]):.4f} -> {np.mean(losses[-20:]):.4f})")
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except (RuntimeError, MemoryError) as e:  # MLX's own failures: out of memory, most likely
        sys.exit(f"error: MLX failed ({first_line(e)}); if memory ran out, lower --batch-size or --crop-seconds, or try --quantize 8.")
    except KeyboardInterrupt:
        sys.exit("Interrupted; the adapter and checkpoint files hold the last --save-every step, if any (go on with --resume).")


if __name__ == "__main__":
    main()

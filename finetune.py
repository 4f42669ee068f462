"""Teach Stable Audio Open your own sounds: train a LoRA or DoRA adapter on a folder of
captioned audio files, written in stable-audio-tools 0.0.20's adapter format."""

import json
import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from stable_audio import (
    Conditioning,
    StableAudio,
    datasets,
    hub,
    lora,
    model_io,
    trainer,
)
from stable_audio.audio import peak_normalize, write_audio
from stable_audio.cli import (
    DTYPES,
    dtype_name,
    first_line,
    number,
    one_line_errors,
    parser,
)
from stable_audio.conditioners import Conditioner
from stable_audio.dit import DiT
from stable_audio.files import check_writable, deferred_interrupts, same_file
from stable_audio.model_io import Components
from stable_audio.settings import physical_memory

CFG_DROPOUT = 0.1  # 0.0.20's default
MEMORY_ADVICE = (
    "if memory ran out, lower --batch-size or --crop-seconds, or add --grad-checkpoint "
    "or --quantize 8."
)
INTERRUPTED = (
    "Interrupted; the adapter and checkpoint files hold the last --save-every step, if "
    "any (go on with --resume)."
)


def check_output(args):
    """Refuse an adapter name we cannot take, and any file the run will write that
    could not be written: now, not after the training."""
    path = Path(args.output)
    if path.suffix != ".safetensors":
        raise ValueError(f"The adapter file {args.output!r} must end in .safetensors.")
    for output in output_files(args):
        check_writable(output)
    kept = [p for p in (path, checkpoint_path(args.output)) if p.exists()]
    if kept and not (args.force or args.resume):  # a checkpoint alone is a run's too
        raise ValueError(
            f"{kept[0]} already exists; choose another --output, or replace it with"
            " --force."
        )
    if args.preview_prompt is not None and same_file(path.parent, args.data):
        raise ValueError(
            "--preview-prompt would write its previews into the data folder"
            f" {args.data}, where the next run would take them for training files;"
            " choose an --output outside --data."
        )


def output_files(args) -> list:
    """The files a run writes: the adapter, its checkpoint and, with --preview-prompt,
    the first and the last preview (no other's name is longer)."""
    paths = [Path(args.output), checkpoint_path(args.output)]
    if args.preview_prompt is not None:
        first = min(args.preview_every, args.steps)
        paths += [preview_path(args.output, s) for s in sorted({first, args.steps})]
    return paths


def model_key(model: str) -> str:
    """What the latent cache keys a model by: its weight files' names, sizes and
    times."""
    folder = hub.resolve(model)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".ckpt"))
    return json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])


def prepare_clips(
    models, clips, window: int, args, cache, key, show: bool, save: bool = True
) -> list:
    """Every file encoded once (or read back from the latent cache, and with `save` what
    was encoded written to it), those that cannot be read skipped with a count (refused
    under --strict), those with no window above -60 dBFS left out, as 0.0.20 rejects
    silent crops."""
    prepared, everything, unreadable, silent = [], [], [], 0
    for path, caption in tqdm(clips, desc="Encoding audio", disable=not show):
        try:
            clip = datasets.encode_clip(
                models.vae,
                path,
                caption,
                models.config.sample_rate,
                window,
                args.phase_flip,
                cache,
                key,
            )
        except ValueError as e:
            if args.strict:
                raise
            unreadable.append(f"{path.name} ({first_line(e)})")
            continue
        everything.append(clip)
        if clip.starts.size:
            prepared.append(clip)
        else:
            silent += 1
    if show and unreadable:
        print(
            f"[WARN] Skipped {len(unreadable)} file(s) that cannot be read (--strict"
            f" refuses them), first: {unreadable[0]}"
        )
    if show and silent:
        print(f"[INFO] Left out {silent} silent file(s) (below -60 dBFS throughout)")
    if not prepared:
        raise ValueError(
            "No file can be read."
            if not silent
            else (
                "Every clip is silent (below -60 dBFS): there is nothing to learn from."
            )
        )
    problem = datasets.save_to_cache(everything) if save else ""
    if show and problem:
        print(
            f"[WARN] Cannot write the latent cache ({problem}); the next run encodes"
            " again (see --cache)"
        )
    return prepared


def encode_captions(models, captions) -> dict:
    """{caption: (T5's output, its mask)}, T5 run once per distinct caption."""
    encoded = {}
    for caption in captions:
        if caption not in encoded:
            tokens, mask = models.tokenizer([caption])
            text = models.t5(tokens, mask)
            mx.eval(text)
            encoded[caption] = (text[0], mask[0])
    return encoded


def batches_at(
    clips, texts, step: int, args, config, latents: int, world: int = 1, rank: int = 0
) -> list:
    """This process's micro-batches of a step: the whole step's examples and random
    draws are a function of (seed, step) alone, drawn for all --grad-accumulate x
    processes x --batch-size of them at once and then shared out, so that a run is
    reproducible and N processes with batch B make the step one process makes with batch
    N x B. Each example is a random window of a random clip (its offset, polarity,
    posterior sample), t from --timestep-sampler, the noise and the cfg-dropout draw."""
    ratio, rate = config.vae.downsampling_ratio, config.sample_rate
    size = args.batch_size * args.grad_accumulate * world
    rng = np.random.default_rng([args.seed, step])
    chosen = [clips[i] for i in rng.integers(0, len(clips), size)]
    starts = [int(c.starts[rng.integers(0, c.starts.size)]) for c in chosen]
    flipped = (
        rng.uniform(size=size) < 0.5 if args.phase_flip else np.zeros(size, dtype=bool)
    )
    channels = chosen[0].posteriors[0][0].shape[-1]
    posterior_noise = rng.standard_normal((size, latents, channels), dtype=np.float32)
    shift = int(np.random.default_rng([args.seed]).integers(2**32))
    t = trainer.sample_timesteps(
        args.timestep_sampler, size, rng, (step - 1) * size, shift
    ).astype(np.float32)
    noise = rng.standard_normal((size, latents, channels), dtype=np.float32)
    dropped = rng.uniform(size=size) < CFG_DROPOUT
    micro_batches = []
    for k in range(args.grad_accumulate):
        mine = range(
            (k * world + rank) * args.batch_size,
            (k * world + rank + 1) * args.batch_size,
        )
        posterior = [chosen[j].posteriors[int(flipped[j])] for j in mine]
        window_of = lambda array, j: array[starts[j] : starts[j] + latents]
        micro_batches.append(
            (
                mx.stack([window_of(p[0], j) for p, j in zip(posterior, mine)]),
                mx.stack([window_of(p[1], j) for p, j in zip(posterior, mine)]),
                mx.array(posterior_noise[mine.start : mine.stop]),
                mx.array(t[mine.start : mine.stop]),
                mx.array(noise[mine.start : mine.stop]),
                mx.stack([texts[chosen[j].caption][0] for j in mine]),
                mx.stack([texts[chosen[j].caption][1] for j in mine]),
                mx.array(
                    [float(math.floor(starts[j] * ratio / rate)) for j in mine]
                ),  # PadCrop_Normalized_T's seconds
                mx.array([float(math.ceil(chosen[j].samples / rate)) for j in mine]),
                mx.array(
                    np.arange(latents)[None]
                    < np.array([[chosen[j].latents - starts[j]] for j in mine])
                ),
                mx.array(dropped[mine.start : mine.stop]),
            )
        )
    return micro_batches


def write_preview(models, text, args, step: int) -> Path:
    """--preview-prompt rendered with the adapters as they are at `step`, with a fixed
    seed, as flux's dreambooth writes progress images."""
    config = models.config
    seconds = {"seconds_start": [0.0], "seconds_total": [args.preview_seconds]}
    seconds = {k: v for k, v in seconds.items() if k in models.conditioner.numbers}
    cross, global_cond = models.conditioner(text[0][None], text[1][None], **seconds)
    pipe = StableAudio(
        Components(config, None, None, models.conditioner, models.dit, models.vae)
    )
    for latents in pipe.generate_latents(
        Conditioning(cross, global_cond), steps=args.preview_steps, seed=args.seed
    ):
        mx.eval(latents)
    audio = np.array(
        pipe.decode(latents)[0, :, : round(args.preview_seconds * config.sample_rate)]
    )
    path = preview_path(args.output, step)
    write_audio(path, peak_normalize(audio), config.sample_rate)
    return path


def preview_path(output: str, step: int) -> Path:
    """Where the preview of `step` is written, beside the adapter file."""
    path = Path(output)
    return path.with_name(f"{path.stem}.preview-{step:06d}.wav")


def checkpoint_path(output: str) -> Path:
    """Where a run keeps what --resume needs, beside its adapter file."""
    path = Path(output)
    return path.with_name(path.stem + ".checkpoint.safetensors")


def save_checkpoint(path: Path, model, optimizer, step: int, settings: dict):
    """The adapters, the optimizer's state, the step and the run's settings in one file,
    written atomically. The random draws are a function of (seed, step), so nothing else
    is needed to go on exactly where the run stopped."""
    tensors = {f"adapter.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
    tensors.update(
        {
            f"optimizer.{k}": v
            for k, v in tree_flatten(optimizer.state)
            if isinstance(v, mx.array)
        }
    )
    model_io.write_safetensors(
        path, tensors, {"step": str(step), "settings": json.dumps(settings)}
    )


def load_checkpoint(path: Path, model, optimizer, settings: dict) -> int:
    """Restore save_checkpoint's file into a fresh model and optimizer (whose state has
    been initialised); returns the step it was written at."""
    tensors, metadata = model_io.read_safetensors(
        path,
        model_io.FLOATS + (mx.uint32, mx.int32, mx.uint64, mx.int64),
        metadata=True,
    )
    try:
        stored, step = json.loads(metadata["settings"]), int(metadata["step"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{path} is not a checkpoint written by finetune.py."
        ) from None
    changed = [k for k in settings if not same_setting(k, stored.get(k), settings[k])]
    if changed:
        raise ValueError(
            f"{path} is of another run: its {changed[0]} is {stored.get(changed[0])!r},"
            f" not {settings[changed[0]]!r}."
        )
    adapters = {
        k[len("adapter.") :]: v for k, v in tensors.items() if k.startswith("adapter.")
    }
    expected = dict(tree_flatten(model.trainable_parameters()))
    if adapters.keys() != expected.keys() or any(
        adapters[k].shape != expected[k].shape for k in expected
    ):
        raise ValueError(f"{path} holds other adapters than this run trains.")
    model.update(tree_unflatten(list(adapters.items())))
    saved = {
        k[len("optimizer.") :]: v
        for k, v in tensors.items()
        if k.startswith("optimizer.")
    }
    current = dict(tree_flatten(optimizer.state))
    if saved.keys() != {k for k, v in current.items() if isinstance(v, mx.array)}:
        raise ValueError(f"{path} holds another optimizer state than this run's.")
    for (
        key,
        value,
    ) in (
        saved.items()
    ):  # into the state's own nesting (lists where the model has lists)
        node, *_, last = [optimizer.state, *key.split(".")]
        for part in key.split(".")[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value
    return step


def same_setting(key: str, stored, current) -> bool:
    """Whether a checkpoint's setting is this run's: paths as the files they name
    ("data/", "./data" and the absolute path are one folder)."""
    if key in PATHS and isinstance(stored, str):
        return same_file(stored, current)
    return stored == current


def run_settings(args, world: int) -> dict:
    """The settings a checkpoint records, the paths that exist made absolute (so that
    a run resumed from another folder is the same run)."""
    settings = {k: getattr(args, k) for k in SETTINGS}
    settings["processes"] = world
    for key in PATHS:
        if Path(settings[key]).exists():
            settings[key] = str(Path(settings[key]).resolve())
    return settings


PATHS = ("model", "data")  # settings compared as the files they name
SETTINGS = (  # what a checkpoint must have been trained with to be resumed
    "model",
    "data",
    "rank",
    "alpha",
    "adapter_type",
    "include",
    "exclude",
    "batch_size",
    "grad_accumulate",
    "learning_rate",
    "warmup",
    "weight_decay",
    "timestep_sampler",
    "crop_seconds",
    "phase_flip",
    "seed",
    "quantize",
    "dtype",
)


def _adapter(group):
    add = group.add_argument
    add(
        "--rank",
        type=int,
        default=8,
        help=(
            "Adapter rank, at most the largest smaller side among the layers adapted"
            " (the -xs types: the smallest) (default: %(default)s)"
        ),
    )
    add(
        "--alpha",
        type=number,
        help="Adapter alpha; the update is scaled by alpha / rank (default: the rank)",
    )
    add(
        "--adapter-type",
        choices=lora.ADAPTER_TYPES,
        default="lora",
        help=(
            "Any of stable-audio-tools 0.0.20's types (docs/lora.md; default:"
            " %(default)s)"
        ),
    )
    add(
        "--include",
        action="append",
        help=(
            "Adapt only layers whose stable-audio-tools name contains this (repeatable;"
            " e.g. 'transformer.layers.[0-11].')"
        ),
    )
    add(
        "--exclude",
        action="append",
        help=(
            "Leave out layers whose name contains this (repeatable; wins over"
            " --include)"
        ),
    )


def _training(group):
    add = group.add_argument
    add(
        "--steps",
        type=int,
        default=1000,
        help="Training steps (optimizer updates) (default: %(default)s)",
    )
    add(
        "--batch-size",
        type=int,
        default=1,
        help="Examples per micro-batch and process (default: %(default)s)",
    )
    add(
        "--grad-accumulate",
        type=int,
        default=1,
        help="Micro-batches whose gradients make one step (default: %(default)s)",
    )
    add(
        "--learning-rate",
        type=number,
        default=1e-4,
        help="AdamW's learning rate after warm-up (default: %(default)s)",
    )
    add(
        "--warmup",
        type=int,
        default=100,
        help="Steps of linear learning-rate warm-up (default: %(default)s)",
    )
    add(
        "--weight-decay",
        type=number,
        default=1e-3,
        help="AdamW's weight decay (default: %(default)s, SAO 1.0's)",
    )
    add(
        "--timestep-sampler",
        choices=trainer.TIMESTEP_SAMPLERS,
        default="uniform",
        help=(
            "How t is drawn, as 0.0.20's option of that name (default: %(default)s,"
            " 0.0.20's)"
        ),
    )
    add(
        "--crop-seconds",
        type=number,
        help="Train on windows of this length (default: the model's whole window)",
    )
    add(
        "--phase-flip",
        action="store_true",
        help=(
            "Invert the waveform of half the examples, as 0.0.20's PhaseFlipper"
            " (encodes each file twice)"
        ),
    )
    add("--seed", type=int, default=0, help="Random seed (default: %(default)s)")


def _data(group):
    add = group.add_argument
    add(
        "--cache",
        help=(
            "Folder of the encoded files' latents, reused by later runs (default:"
            " .stable-audio-cache in --data)"
        ),
    )
    add(
        "--no-cache",
        action="store_true",
        help="Encode the files afresh, keeping nothing on disk",
    )
    add(
        "--strict",
        action="store_true",
        help="Refuse a file that cannot be read, instead of skipping it",
    )


def _saving(group):
    add = group.add_argument
    add(
        "--save-every",
        type=int,
        default=0,
        help=(
            "Also write the adapter, and a checkpoint for --resume beside it, every N"
            " steps (default: only at the end)"
        ),
    )
    add(
        "--resume",
        action="store_true",
        help=(
            "Go on from the checkpoint beside --output (same data, model and settings)"
        ),
    )
    add(
        "--preview-prompt",
        help=(
            "Every --preview-every steps, write this prompt's audio (fixed seed) beside"
            " --output"
        ),
    )
    add(
        "--preview-every",
        type=int,
        default=250,
        help="Steps between previews (default: %(default)s)",
    )
    add(
        "--preview-seconds",
        type=number,
        default=10.0,
        help="Length of a preview (default: %(default)s)",
    )
    add(
        "--preview-steps",
        type=int,
        default=50,
        help="Sampler steps of a preview (default: %(default)s)",
    )


def _runtime(group):
    add = group.add_argument
    add(
        "--grad-checkpoint",
        action="store_true",
        help="Recompute each DiT block in the backward pass: less memory, more time",
    )
    add(
        "--quantize",
        type=int,
        choices=(4, 8),
        help="Quantize the frozen DiT to 4 or 8 bits (QLoRA)",
    )
    add(
        "--dtype",
        choices=DTYPES,
        help=(
            "dtype of T5 and the frozen DiT (default: bfloat16 on a GPU, float32 on the"
            " CPU)"
        ),
    )
    add(
        "-v",
        "--verbose",
        action="store_true",
        help="Show the data preparation's progress",
    )


def arguments():
    p = parser(__doc__.splitlines()[0])
    add = p.add_argument
    add(
        "--model",
        default=hub.DEFAULT_REPO,
        help=(
            "Converted folder, released folder or Hub repo, in floating point (default:"
            " %(default)s)"
        ),
    )
    add(
        "--data",
        required=True,
        help=(
            "Folder of audio files, each captioned by a same-named .txt or a row of"
            " metadata.jsonl / metadata.csv"
        ),
    )
    add("--output", required=True, help="The adapter file to write (.safetensors)")
    add("--force", action="store_true", help="Replace --output if it exists")
    _adapter(p.add_argument_group("the adapter"))
    _training(p.add_argument_group("training"))
    _data(p.add_argument_group("the data's latent cache"))
    _saving(p.add_argument_group("checkpoints and previews"))
    _runtime(p.add_argument_group("precision and memory"))
    return p


def check(args):
    """Refuse bad flags, and outputs that could not be written, before anything is
    read."""
    problems = [
        (args.rank < 1, "--rank must be >= 1"),
        (args.steps < 1, "--steps must be >= 1"),
        (
            args.batch_size < 1 or args.grad_accumulate < 1,
            "--batch-size and --grad-accumulate must be >= 1",
        ),
        (not args.learning_rate > 0, "--learning-rate must be > 0"),
        (
            args.warmup < 0 or args.save_every < 0,
            "--warmup and --save-every must be >= 0",
        ),
        (args.alpha is not None and not args.alpha > 0, "--alpha must be > 0"),
        (
            args.preview_every < 1 or args.preview_steps < 1,
            "--preview-every and --preview-steps must be >= 1",
        ),
        (not args.weight_decay >= 0, "--weight-decay must be >= 0"),
        (
            args.crop_seconds is not None and not args.crop_seconds > 0,
            "--crop-seconds must be > 0",
        ),
        (not 0 <= args.seed < 2**64, "--seed must be in [0, 2**64)"),
    ]
    for failed, message in problems:
        if failed:
            raise ValueError(message + ".")
    check_output(args)
    if args.resume and not checkpoint_path(args.output).is_file():
        raise ValueError(
            f"There is no checkpoint {checkpoint_path(args.output)} to resume from."
        )


def crop_samples(args, config) -> int:
    """The crop's length in samples, whole latents; a quantized model refused."""
    if config.quantization:
        bits = config.quantization["bits"]
        raise ValueError(
            f"{args.model} is quantized ({bits} bits); fine-tuning reads the"
            f" floating-point model (add --quantize {bits} to train over a quantized"
            " copy)."
        )
    window_seconds = config.sample_size / config.sample_rate
    seconds = window_seconds if args.crop_seconds is None else args.crop_seconds
    ratio = config.vae.downsampling_ratio
    refusal = (
        f"--crop-seconds must be in (0, {window_seconds:.2f}], the model's window."
    )
    if not 0 < seconds <= window_seconds + 1e-9:  # before sizing: 1e308 would overflow
        raise ValueError(refusal)
    window = math.ceil(seconds * config.sample_rate / ratio) * ratio  # whole latents
    if window > config.sample_size:
        raise ValueError(refusal)
    longest = window_seconds + 1e-9 if args.preview_prompt is not None else math.inf
    if not 0 < args.preview_seconds <= longest:  # unused without a prompt, yet > 0
        raise ValueError(
            f"--preview-seconds must be in (0, {window_seconds:.2f}], the model's"
            " window."
        )
    return window


def check_adapters(args, config):
    """Refuse, before the weights load, a rank beyond every adapted layer's smaller side
    (it adds nothing anywhere; an -xs type's bases, singular vectors, need it within
    each layer's), and adapters whose training state (weights, gradients and AdamW's two
    moments, float32; the -xs bases once) would not fit in the machine's memory: running
    out of it is a crash, not an error, on Linux. The shapes come from the config alone:
    a skeleton whose (lazy) random weights are never computed."""
    dit, conditioner = DiT(config.dit), Conditioner(config.conditioner)
    shapes = lora.layer_shapes(dit, conditioner, args.include, args.exclude)
    if not shapes:
        raise ValueError("The include/exclude patterns leave no layer to adapt.")
    xs = args.adapter_type.endswith("-xs")
    pick = min if xs else max
    bound = pick(shapes, key=lambda name: min(shapes[name]))
    limit = min(shapes[bound])
    if not args.rank <= limit:
        out_dim, in_dim = shapes[bound]
        raise ValueError(
            f"--rank must be in [1, {limit}]: "
            + (
                "an -xs adapter's bases are singular vectors, as many as each"
                f" layer's smaller side, and {bound} is {out_dim} x {in_dim}."
                if xs
                else f"no layer adapted has a smaller side above that ({bound} is"
                f" {out_dim} x {in_dim})."
            )
        )
    sizes = [training_sizes(args.adapter_type, args.rank, *s) for s in shapes.values()]
    count, frozen = map(sum, zip(*sizes))
    needed, memory = count * 4 * 4 + frozen * 4, physical_memory()
    if memory and needed > memory:
        raise ValueError(
            f"--rank {args.rank} needs {readable(needed)} for the adapters' training"
            f" state ({count:,} parameters), more than this machine's"
            f" {readable(memory)}; lower --rank or adapt fewer layers (--include,"
            " --exclude)."
        )


def training_sizes(kind: str, rank: int, out_dim: int, in_dim: int) -> tuple:
    """A layer's adapter parameters: (trained, frozen), the frozen ones the -xs
    bases."""
    form = kind.removesuffix("-xs")
    magnitudes = {"lora": 0, "dora-rows": out_dim, "dora-cols": in_dim}.get(
        form, out_dim + in_dim
    )
    low_rank = rank * (out_dim + in_dim)
    if kind.endswith("-xs"):
        return rank * rank + magnitudes, low_rank
    return low_rank + magnitudes, 0


def readable(size: int) -> str:
    """A size in bytes as people read it."""
    return f"{size / 1e9:.2f} GB" if size >= 1e7 else f"{size / 1e6:.2f} MB"


def prepare(args, clips, window: int, leader: bool) -> tuple:
    """The models, the clips encoded (or read from the cache) and the captions'
    conditioning; T5 and the encoder freed, the DiT quantized if asked."""
    cache = (
        None
        if args.no_cache
        else Path(args.cache or Path(args.data) / ".stable-audio-cache")
    )
    args.dtype = dtype_name(args.dtype, "bfloat16")
    models = model_io.load(args.model, dtype=getattr(mx, args.dtype))
    clips = prepare_clips(
        models,
        clips,
        window,
        args,
        cache,
        model_key(args.model),
        leader and args.verbose,
        save=leader,
    )
    texts = encode_captions(
        models,
        [c.caption for c in clips]
        + [args.preview_prompt] * (args.preview_prompt is not None),
    )
    del models.t5, models.vae.encoder  # done with; the decoder stays for previews
    if args.preview_prompt is None:
        del models.vae
    if args.quantize:
        model_io.quantize_dit(models.dit, 64, args.quantize)
    return models, clips, texts


def optimizer(args):
    """AdamW, its learning rate warming up linearly from lr / warmup, then constant."""
    warmup = max(args.warmup, 1)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(
                args.learning_rate / warmup, args.learning_rate, warmup
            ),
            lambda _: args.learning_rate,
        ],
        [warmup],
    )
    return optim.AdamW(learning_rate=schedule, weight_decay=args.weight_decay)


def train(args, models, clips, texts, window: int, group):
    world, rank = group.size(), group.rank()
    leader = rank == 0  # writes the files and shows the progress
    config = models.config
    model = trainer.FineTuned(
        models.dit,
        models.conditioner,
        config.dit.objective,
        args.rank,
        args.alpha,
        args.adapter_type,
        args.include,
        args.exclude,
        key=mx.random.key(args.seed),
    )
    adam = optimizer(args)
    models.dit.checkpoint_blocks = args.grad_checkpoint
    settings = run_settings(args, world)
    adam.init(model.trainable_parameters())
    first = 1
    if args.resume:
        path = checkpoint_path(args.output)
        first = load_checkpoint(path, model, adam, settings) + 1
        if leader:
            print(f"[INFO] Resuming at step {first}")
    step = trainer.training_step(model, adam)
    state = [model.state, adam.state]

    latents = window // config.vae.downsampling_ratio
    start, losses = time.perf_counter(), []
    progress = tqdm(
        range(first, args.steps + 1),
        desc="Training",
        initial=first - 1,
        total=args.steps,
        disable=not leader,
    )
    for i in progress:
        loss = step(batches_at(clips, texts, i, args, config, latents, world, rank))
        mx.eval(loss, state)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(
                f"The loss became {losses[-1]} at step {i}: lower --learning-rate, or "
                "use --dtype float32."
            )
        progress.set_postfix(
            loss=f"{np.mean(losses[-20:]):.4f}",
            it_s=f"{len(losses) / (time.perf_counter() - start):.2f}",
            peak=f"{mx.get_peak_memory() / 1e9:.2f} GB",
        )
        if leader and (
            (args.save_every and i % args.save_every == 0) or i == args.steps
        ):
            with deferred_interrupts():  # the adapter and its checkpoint, both whole
                lora.save_adapter(
                    args.output, model.adapter_tensors(), model.lora_config
                )
                save_checkpoint(checkpoint_path(args.output), model, adam, i, settings)
        if (
            leader
            and args.preview_prompt is not None
            and (i % args.preview_every == 0 or i == args.steps)
        ):
            preview = write_preview(models, texts[args.preview_prompt], args, i)
            progress.write(f"[INFO] Preview: {preview}")
    return losses


def main(argv=None):
    args = arguments().parse_args(argv)
    group = mx.distributed.init()  # under mlx.launch: one of several, data parallel
    leader = group.rank() == 0
    with one_line_errors(MEMORY_ADVICE, INTERRUPTED):
        check(args)
        clips = datasets.find_clips(args.data)
        config = model_io.load_config(args.model)
        window = crop_samples(args, config)
        check_adapters(args, config)
        models, clips, texts = prepare(args, clips, window, leader)
        losses = train(args, models, clips, texts, window, group)
        if losses and leader:
            before, after = np.mean(losses[:20]), np.mean(losses[-20:])
            print(
                f"[INFO] Wrote {args.output} ({len(clips)} clips; loss {before:.4f} -> "
                f"{after:.4f})"
            )


if __name__ == "__main__":
    main()

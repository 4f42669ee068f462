"""Time Stable Audio Open 1.0 generation with random weights at the real shapes (no download).

For each precision (float32, float16, 8-bit and 4-bit DiT), with and without compiled
steps: text encoding, the time per sampler step, the sampling loop, VAE decoding and
end to end (medians of --runs after a warm-up), and the peak memory of one generation
run as txt2audio.py runs it (T5 freed after encoding, the DiT before decoding). Prints
a markdown table. With --peer diffusers (a CUDA machine with torch and diffusers), the
peer (peer_diffusers.py) runs before and after ours in the same call, at the matching
precision, its DiT eager and under torch.compile (--peer-compile), and the ratios are
printed. --whole-process times what a person waits for: whole txt2audio.py processes
(and the peer's) from start to written file. --gemms times the matrix products of one
step.

float32 means true float32 on Apple silicon and the CPU; MLX's CUDA backend multiplies
float32 in TF32 unless MLX_ENABLE_TF32=0 is set (the header says which).
"""

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

# Commit GPU work in command buffers of at most 50 ops or 50 MB, as MLX does on an
# M-series Max or Ultra. MLX's CUDA defaults on an H100 (100 ops, 1000 MB) let ~10 such
# batches run ahead, whose freed intermediates stay allocated: 6.4 GB peak instead of
# 3.4 GB (float16, same speed). Set the variables yourself to measure something else.
USER_ENV = dict(os.environ)  # --whole-process runs txt2audio.py as a person would
os.environ.setdefault("MLX_MAX_OPS_PER_BUFFER", "50")
os.environ.setdefault("MLX_MAX_MB_PER_BUFFER", "50")

import mlx.core as mx  # noqa: E402

from stable_audio import Conditioning, StableAudio, limit_memory, lora
from stable_audio.cli import number
from stable_audio.cli import parser as one_line_parser
from stable_audio.model_io import Components, build, parse_config, quantize_dit

DATA = Path(__file__).parent / "test_data"
VARIANTS = ("float32", "float16", "8-bit", "4-bit")
PROMPT = "128 BPM tech house drum loop"


def float32_matmuls() -> str:
    """What float32 means for matrix products on the default device."""
    if (
        mx.default_device() == mx.gpu
        and mx.cuda.is_available()
        and os.environ.get("MLX_ENABLE_TF32", "1") != "0"
    ):
        return "TF32"
    return "true float32"


def label(variant: str) -> str:
    return f"float32 ({float32_matmuls()})" if variant == "float32" else variant


PEER = Path(__file__).parent / "peer_diffusers.py"


def run(command: list, env=None) -> str:
    """Run `command`; its standard output, or SystemExit with its last error line."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{' '.join(map(str, command[1:]))} failed: {last}")
    return done.stdout


def run_peer(dtype: str, steps: int, runs: int, mode: str = "off") -> dict:
    """peer_diffusers.py's figures at `dtype`, its DiT under torch.compile in `mode`
    ("off": eager), in a process of its own."""
    command = [sys.executable, PEER, "--dtype", dtype, "--torch-compile", mode]
    output = run(command + ["--steps", str(steps), "--runs", str(runs)])
    print(output.strip().splitlines()[-1], file=sys.stderr, flush=True)
    return json.loads(output.strip().splitlines()[-1])


def peer_dtype(variant: str) -> str:
    """The peer's precision that is like for like with our `variant`."""
    if variant == "float32":
        return "tf32" if float32_matmuls() == "TF32" else "float32"
    return "float16"


def gemm_shapes(config, latents: int = 1024) -> list:
    """(name, rows, in, out, bias, count a step) of the DiT's matrix products in one
    guided step (the cfg batch of 2; cross-attention runs on the conditional half
    only)."""
    d, rows = config.dit.embed_dim, 2 * (latents + 1)
    return [
        ("self-attention qkv", rows, d, 3 * d, False, 1),
        ("self-attention out", rows, d, d, False, 1),
        ("cross-attention q", rows // 2, d, d, False, 1),
        ("cross-attention out", rows // 2, d, d, False, 1),
        ("feed-forward in", rows, d, 8 * d, True, 1),
        ("feed-forward out", rows, 4 * d, d, True, 1),
    ]


def measure_gemms(dtype=mx.float16, repeats: int = 20) -> list:
    """Each product of gemm_shapes as nn.Linear computes it, and PyTorch's F.linear at
    the same shape if torch with CUDA is importable: (name, shape, MLX s, PyTorch s or
    None).
    """
    import mlx.nn as nn

    config = parse_config(
        json.loads((DATA / "sao1_model_config.json").read_text()),
        json.loads((DATA / "t5_config.json").read_text()),
    )
    try:
        import torch

        torch_dtype = (
            getattr(torch, str(dtype).split(".")[-1])
            if torch.cuda.is_available()
            else None
        )
    except ImportError:
        torch_dtype = None
    results = []
    for name, m, k, n, bias, _ in gemm_shapes(config):
        layer = nn.Linear(k, n, bias=bias)
        layer.set_dtype(dtype)
        x = mx.random.normal((m, k)).astype(dtype)
        mx.eval(layer.parameters(), x)
        best = []
        for _ in range(4):
            start = time.perf_counter()
            mx.eval([layer(x) for _ in range(repeats)])
            best.append((time.perf_counter() - start) / repeats)
        theirs = None
        if torch_dtype is not None:
            tx = torch.randn(m, k, device="cuda", dtype=torch_dtype)
            tw = torch.randn(n, k, device="cuda", dtype=torch_dtype)
            tb = torch.randn(n, device="cuda", dtype=torch_dtype) if bias else None
            times = []
            for _ in range(4):
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(repeats):
                    torch.nn.functional.linear(tx, tw, tb)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - start) / repeats)
            theirs = min(times[1:])
        results.append((name, (m, k, n, bias), min(best[1:]), theirs))
    return results


def random_pipeline(variant: str, config=None, vae_dtype=mx.float32) -> StableAudio:
    """Random weights, as StableAudio.from_pretrained would hold them for `variant`."""
    config = config or parse_config(
        json.loads((DATA / "sao1_model_config.json").read_text()),
        json.loads((DATA / "t5_config.json").read_text()),
    )
    models = build(config)
    dtype = mx.float32 if variant == "float32" else mx.float16
    for name in ("t5", "dit"):
        models[name].set_dtype(dtype)
    models["vae"].set_dtype(vae_dtype)
    if variant.endswith("-bit"):
        quantize_dit(models["dit"], 64, int(variant[0]))
    del models["vae"].encoder  # text-to-audio never reads it
    mx.eval([m.parameters() for m in models.values()])
    return StableAudio(Components(config, None, **models))


def add_adapter(pipe, mode: str, folder: Path, rank: int = 8):
    """A random rank-8 LoRA on every layer 0.0.20 adapts: "static" (merged into float
    weights, beside quantized ones) or "gated" (active at noise levels in [0.5, 1],
    beside every layer)."""
    layers = lora.initial_tensors(pipe.dit, pipe.conditioner, rank)
    for i, tensors in enumerate(layers.values()):
        tensors["lora_B"] = 0.01 * mx.random.normal(
            tensors["lora_B"].shape, key=mx.random.key(i)
        )
    path = folder / f"{mode}.safetensors"
    lora.save_adapter(
        path, layers, {"rank": rank, "alpha": rank, "adapter_type": "lora"}
    )
    pipe.load_lora(path, 1.0, (0.5, 1.0) if mode == "gated" else None)
    mx.eval(pipe.dit.parameters(), pipe.conditioner.parameters())


def condition(pipe, batch_size) -> Conditioning:
    """What StableAudio.condition does, on random token ids instead of a tokenized
    prompt."""
    vocab = pipe.config.t5.vocab_size
    tokens = mx.random.randint(0, vocab, (batch_size, 128), key=mx.random.key(0))
    mask = mx.broadcast_to((mx.arange(128) < 20).astype(mx.int32), (batch_size, 128))
    seconds = dict(
        seconds_start=[0.0] * batch_size,
        seconds_total=[pipe.window_seconds] * batch_size,
    )
    cross, global_cond = pipe.conditioner(pipe.t5(tokens, mask), mask, **seconds)
    mx.eval(cross, global_cond)
    return Conditioning(cross, global_cond)


def generate(
    pipe, steps, batch_size, compile, times, peaks=None, low_memory=False, sampling=None
):
    """One full generation, recording each phase's time in `times`. With `peaks`, each
    phase's peak memory is recorded there, and T5 and the DiT are deleted when done, as
    txt2audio.py does."""

    def phase_end(name, start):
        times[name].append(time.perf_counter() - start)
        if peaks is not None:
            peaks[name] = mx.get_peak_memory() / 1e9
            mx.reset_peak_memory()

    start = time.perf_counter()
    conditioning = condition(pipe, batch_size)
    phase_end("text", start)
    if peaks is not None:
        del pipe.t5
    default_limit = limit_memory() if low_memory else None

    start = time.perf_counter()
    for latents in pipe.generate_latents(
        conditioning, steps=steps, seed=0, compile=compile, **(sampling or {})
    ):
        mx.eval(latents)
    phase_end("sampling", start)
    if peaks is not None:
        del pipe.dit, conditioning
        if low_memory:
            limit_memory()  # again, now that the DiT is gone

    start = time.perf_counter()
    mx.eval(pipe.decode(latents))
    phase_end("decode", start)
    if low_memory:
        mx.set_memory_limit(default_limit)
    times["end to end"].append(
        sum(times[k][-1] for k in ("text", "sampling", "decode"))
    )


def measure(
    variant,
    compile,
    steps,
    runs,
    batch_size,
    config=None,
    low_memory=False,
    vae_dtype=mx.float32,
    sampling=None,
    adapter="none",
):
    """Times are medians of `runs` generations with everything loaded; the peaks come
    from one more generation run as txt2audio.py runs it."""
    pipe = random_pipeline(variant, config, vae_dtype)
    if adapter != "none":
        with tempfile.TemporaryDirectory() as folder:
            add_adapter(pipe, adapter, Path(folder))
    times = {k: [] for k in ("text", "sampling", "decode", "end to end")}
    first = {k: [] for k in times}  # tracing, and kernels built on first use
    generate(pipe, steps, batch_size, compile, first, sampling=sampling)
    for _ in range(runs):
        generate(
            pipe,
            steps,
            batch_size,
            compile,
            times,
            low_memory=low_memory,
            sampling=sampling,
        )
    mx.clear_cache()
    mx.reset_peak_memory()
    peaks = {}
    generate(
        pipe,
        steps,
        batch_size,
        compile,
        {k: [] for k in times},
        peaks,
        low_memory,
        sampling,
    )
    result = {k: statistics.median(v) for k, v in times.items()}
    result["first"], result["runs"] = first["end to end"][0], times["end to end"]
    result["peak"] = max(peaks.values())
    result["peaks"] = peaks
    del pipe
    mx.clear_cache()
    return result


def measure_piece(variant: str, seconds_total: float, steps: int, config=None) -> dict:
    """A piece beyond the window, as txt2audio.py --seconds-total makes it (compiled
    steps; random token ids for the prompt), after a 2-step piece on the same pipeline
    (its tracing and first allocations, as for a warm generation): its windows, each
    window's sampling time, the sampling time, the decoding time of the whole piece and
    the peak memory."""
    from stable_audio import Settings, long_form

    pipe = random_pipeline(variant, config)
    s = Settings(seconds_total=seconds_total, steps=steps, seed=0, compile=True)
    s = s.resolved(pipe.config)
    windows = long_form.windows(pipe.config, seconds_total, s.overlap)
    vocab = pipe.config.t5.vocab_size
    tokens = mx.random.randint(0, vocab, (1, 128), key=mx.random.key(0))
    mask = (mx.arange(128) < 20).astype(mx.int32)[None]
    hidden = pipe.t5(tokens, mask)  # T5 once; then each window's timing
    samples, ratio = (
        round(seconds_total * pipe.sample_rate),
        pipe.config.vae.downsampling_ratio,
    )
    conditionings = []
    for start, _ in windows:
        timing = {
            k: [v]
            for k, v in long_form.timing(
                start, samples, ratio, pipe.sample_rate
            ).items()
            if k in pipe.conditioner.numbers
        }
        conditionings.append(Conditioning(*pipe.conditioner(hidden, mask, **timing)))
    del pipe.t5
    mx.clear_cache()

    def sample(settings) -> tuple:
        piece, ends = long_form.canvas(pipe, windows), []
        start = time.perf_counter()
        made = long_form.sample(pipe, conditionings, windows, piece, settings)
        for done, x in enumerate(made, 1):
            mx.eval(x)
            if done % settings.steps == 0:
                ends.append(time.perf_counter() - start)
        return piece, [b - a for a, b in zip([0.0] + ends, ends)]

    sample(replace(s, steps=2))  # warm-up
    mx.reset_peak_memory()
    piece, each = sample(s)
    start = time.perf_counter()
    mx.eval(pipe.decode(piece)[..., :samples])
    return {
        "windows": len(windows),
        "each window": each,
        "sampling": sum(each),
        "decode": time.perf_counter() - start,
        "peak": mx.get_peak_memory() / 1e9,
    }


def write_released(folder: Path) -> Path:
    """SAO 1.0 in its released file layout (model_config.json, model.safetensors,
    text_encoder/, tokenizer/spiece.model) with random float32 weights scaled by their
    fan-in, and a small SentencePiece model with T5's special ids."""
    import numpy as np
    import sentencepiece as spm
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)

    def random_weights(keys: str) -> dict:
        tensors = {}
        for name, (shape, _) in json.loads((DATA / keys).read_text()).items():
            x = rng.standard_normal(shape, dtype=np.float32)
            x /= math.sqrt(math.prod(shape[1:]) if len(shape) > 1 else 4)
            if name.endswith("inv_freq"):  # a constant of the architecture
                dims = 2 * shape[0]
                x = (1e4 ** -(np.arange(0, dims, 2) / dims)).astype(np.float32)
            # weight-norm gains positive and below 1, as in a trained VAE
            tensors[name] = 0.5 * np.abs(x) if name.endswith("weight_g") else x
        return tensors

    (folder / "text_encoder").mkdir(parents=True)
    (folder / "tokenizer").mkdir()
    (folder / "model_config.json").write_bytes(
        (DATA / "sao1_model_config.json").read_bytes()
    )
    config = folder / "text_encoder" / "config.json"
    config.write_bytes((DATA / "t5_config.json").read_bytes())
    save_file(random_weights("sao1_keys.json"), str(folder / "model.safetensors"))
    t5 = random_weights("t5base_keys.json")
    save_file(t5, str(folder / "text_encoder" / "model.safetensors"))
    words = PROMPT.lower().split() + "ambient warm pads rain piano synth".split()
    lines = [" ".join(rng.choice(words, size=8)) for _ in range(500)]
    with open(folder / "tokenizer" / "spiece.model", "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=f,
            vocab_size=40,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    return folder


def whole_processes(runs: int, steps: int, peer_modes=()) -> dict:
    """{what: seconds of each whole process}: txt2audio.py eager and --compile on SAO
    1.0's released layout (random weights: import, load, compile, generate 47.55 s,
    decode, write), and, for each of `peer_modes`, peer_diffusers.py --one-shot doing
    the same from its own files; run in turn, `runs` times, in a person's environment
    (without this benchmark's command-buffer settings)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours = write_released(tmp / "released")
        txt2audio = [sys.executable, Path(__file__).parent / "txt2audio.py", PROMPT]
        txt2audio += ["--model", ours, "--seed", "0", "--steps", steps]
        commands = {
            "txt2audio.py": txt2audio + ["--output", tmp / "ours.wav"],
            "txt2audio.py --compile": txt2audio
            + ["--output", tmp / "c.wav", "--compile"],
        }
        if peer_modes:
            spiece = ours / "tokenizer" / "spiece.model"
            run([sys.executable, PEER, "--save", tmp / "peer", "--spiece", spiece])
        for mode in peer_modes:
            commands[f"diffusers, torch.compile {mode}"] = [
                *(sys.executable, PEER, "--one-shot", tmp / "peer", "--steps", steps),
                *("--output", tmp / "peer.wav", "--torch-compile", mode),
            ]
        times = {what: [] for what in commands}
        for _ in range(runs):
            for what, command in commands.items():
                start = time.perf_counter()
                run([str(c) for c in command], env=USER_ENV)
                times[what].append(time.perf_counter() - start)
                print(f"{what}: {times[what][-1]:.2f} s", file=sys.stderr, flush=True)
        return times


PEER_LAYERS = [
    "self_attn.to_qkv",
    "self_attn.to_out",
    "cross_attn.to_q",
    "cross_attn.to_kv",
    "cross_attn.to_out",
]


def measure_training(
    variant: str,
    checkpoint: bool,
    steps: int = 8,
    config=None,
    latents: int = 1024,
    adapter_type: str = "lora",
) -> dict:
    """finetune.py's compiled step (a rank-8 adapter of `adapter_type` on the attention
    projections, the layers the PEFT peer adapts; batch 1, `latents` latents, AdamW):
    seconds per step after 3 warm-up steps, and the peak memory of those steps (weights
    included; T5 and the VAE, which fine-tuning frees after preparing its data,
    excluded)."""
    from mlx import optimizers as optim

    from stable_audio import trainer

    dtype = {"bfloat16": mx.bfloat16, "float16": mx.float16}.get(variant, mx.float16)
    pipe = random_pipeline(
        "float32" if variant in ("bfloat16", "float16") else variant, config
    )
    if variant in ("bfloat16", "float16"):
        pipe.dit.set_dtype(dtype)
    del pipe.t5, pipe.vae
    model = trainer.FineTuned(
        pipe.dit,
        pipe.conditioner,
        pipe.config.dit.objective,
        rank=8,
        adapter_type=adapter_type,
        include=PEER_LAYERS,
    )
    pipe.dit.checkpoint_blocks = checkpoint
    optimizer = optim.AdamW(learning_rate=1e-4)
    step = trainer.training_step(model, optimizer)
    key = iter(mx.random.split(mx.random.key(0), 8))
    C = pipe.config.dit.io_channels
    normal = lambda *shape: mx.random.normal(shape, key=next(key))
    inputs = (
        normal(1, latents, C),
        mx.ones((1, latents, C)) * 0.1,
        normal(1, latents, C),
        mx.array([0.5]),
        normal(1, latents, C),
        normal(1, 128, pipe.config.conditioner.cond_dim),
        mx.ones((1, 128), dtype=mx.int32),
        mx.array([0.0]),
        mx.array([47.0]),
        mx.ones((1, latents), dtype=mx.bool_),
        mx.array([False]),
    )
    state = [model.state, optimizer.state]
    for _ in range(3):
        mx.eval(step([inputs]), state)
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    for _ in range(steps):
        mx.eval(step([inputs]), state)
    result = {
        "step": (time.perf_counter() - start) / steps,
        "peak": mx.get_peak_memory() / 1e9,
    }
    del pipe, model, optimizer, step, state
    mx.clear_cache()
    return result


def arguments() -> argparse.ArgumentParser:
    parser = one_line_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=VARIANTS,
        help="DiT and T5 precisions (default: all)",
    )
    parser.add_argument(
        "--compile",
        choices=("off", "on", "both"),
        default="both",
        help="compiled sampler steps (default: both)",
    )
    parser.add_argument(
        "--steps", type=int, default=100, help="sampler steps (default: 100)"
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="timed runs after a warm-up (default: 3)"
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1], help="audios per generation"
    )
    parser.add_argument(
        "--low-memory", action="store_true", help="as txt2audio.py --low-memory"
    )
    parser.add_argument(
        "--vae-dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="the decoder's dtype (default: float32)",
    )
    parser.add_argument(
        "--sampler", help="the sampler (default: the model's, dpmpp-3m-sde)"
    )
    parser.add_argument(
        "--apg-scale",
        type=number,
        default=0.0,
        help="adaptive projected guidance (default: 0, plain CFG)",
    )
    parser.add_argument(
        "--adapters",
        nargs="+",
        default=["none"],
        choices=("none", "static", "gated"),
        help=(
            "a random rank-8 LoRA: none, static (merged) or gated by a noise interval"
            " (default: none)"
        ),
    )
    parser.add_argument(
        "--finetune",
        action="store_true",
        help=(
            "time finetune.py's training step instead, over a bfloat16 DiT and each of"
            " --variants, with and without --grad-checkpoint, for SAO 1.0 and SAO Small"
            " (each at its whole window)"
        ),
    )
    parser.add_argument(
        "--grad-checkpoint",
        choices=("off", "on", "both"),
        default="both",
        help="--finetune with gradient checkpointing (default: both)",
    )
    parser.add_argument(
        "--adapter-types",
        nargs="+",
        default=["lora"],
        choices=lora.ADAPTER_TYPES,
        help="--finetune's adapter types (default: lora)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["SAO 1.0", "SAO Small"],
        choices=("SAO 1.0", "SAO Small"),
        help="--finetune's models (default: both)",
    )
    parser.add_argument(
        "--seconds-total",
        type=number,
        help=(
            "time a piece of this length instead (window by window, beyond the model's"
            " window), for each of --variants"
        ),
    )
    parser.add_argument(
        "--peer",
        choices=("diffusers",),
        help=(
            "also run diffusers (peer_diffusers.py: torch, diffusers, CUDA) before and"
            " after ours, at the matching precision, and print the ratios"
        ),
    )
    parser.add_argument(
        "--peer-compile",
        nargs="+",
        default=["off", "default"],
        choices=("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"),
        help="the peer's DiT: eager (off) and under torch.compile in these modes"
        " (default: off default)",
    )
    parser.add_argument(
        "--whole-process",
        type=int,
        metavar="RUNS",
        help="time whole txt2audio.py processes instead (and the peer's, with --peer),"
        " RUNS of each in turn",
    )
    parser.add_argument(
        "--gemms",
        action="store_true",
        help=(
            "time the matrix products of one guided step instead (float16; PyTorch's"
            " too, where torch has CUDA)"
        ),
    )
    return parser


if __name__ == "__main__":
    args = arguments().parse_args()
    if args.gemms:
        print(
            f"mlx {mx.__version__}, {mx.default_device()}, float16, the products of one"
            " guided step (1024 latents), as nn.Linear computes them"
        )
        print(
            "| product | rows x in -> out | bias | MLX (us) | MLX TFLOP/s | PyTorch"
            " (us) | PyTorch TFLOP/s |"
        )
        print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
        ours = theirs = 0.0
        depth = json.loads((DATA / "sao1_model_config.json").read_text())["model"][
            "diffusion"
        ]["config"]["depth"]
        for name, (m, k, n, bias), t, peer in measure_gemms():
            rate = lambda s: 2 * m * k * n / s / 1e12
            ours, theirs = ours + t, theirs + (peer or 0.0)
            peer_cells = f"{1e6 * peer:.1f} | {rate(peer):.0f}" if peer else "- | -"
            print(
                f"| {name} | {m} x {k} -> {n} | {'yes' if bias else 'no'} |"
                f" {1e6 * t:.1f} | {rate(t):.0f} | {peer_cells} |",
                flush=True,
            )
        print(
            f"One step's products ({depth} blocks): MLX {1e3 * depth * ours:.2f} ms"
            + (f", PyTorch {1e3 * depth * theirs:.2f} ms" if theirs else "")
        )
        raise SystemExit
    if args.whole_process:
        modes = args.peer_compile if args.peer else ()
        print(
            f"mlx {mx.__version__}, {mx.default_device()}, whole processes, SAO 1.0's"
            f" released layout (random float32 weights), {args.steps} steps, cfg 7,"
            " 47.55 s, seed 0, the default dtype (float16 on a GPU)"
        )
        print("| process | each run, in turn (s) | median (s) |")
        print("| --- | --- | ---: |")
        times = whole_processes(args.whole_process, args.steps, modes)
        for what, seconds in times.items():
            each = ", ".join(f"{t:.2f}" for t in seconds)
            print(f"| {what} | {each} | {statistics.median(seconds):.2f} |")
        raise SystemExit
    if args.seconds_total:
        print(
            f"mlx {mx.__version__}, {mx.default_device()}, a {args.seconds_total:g} s"
            f" piece, {args.steps} steps a window, cfg 7, compiled"
        )
        print(
            "| DiT | windows | each window (s) | sampling (s) | decode (s) | end to end"
            " (s) | peak (GB) |"
        )
        print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
        for variant in args.variants:
            r = measure_piece(variant, args.seconds_total, args.steps)
            each = ", ".join(f"{t:.2f}" for t in r["each window"])
            print(
                f"| {variant} | {r['windows']} | {each} | {r['sampling']:.2f} |"
                f" {r['decode']:.2f} | {r['sampling'] + r['decode']:.2f} |"
                f" {r['peak']:.2f} |",
                flush=True,
            )
        raise SystemExit
    if args.finetune:
        print(
            f"mlx {mx.__version__}, {mx.default_device()}, rank 8 on the attention"
            " projections, batch 1, the model's whole window, AdamW, compiled step"
        )
        print(
            "| model | frozen DiT | adapter | gradient checkpointing | per step (ms) |"
            " peak (GB) |"
        )
        print("| --- | --- | --- | --- | ---: | ---: |")
        small = parse_config(
            json.loads((DATA / "saos_model_config.RECONSTRUCTED.json").read_text()),
            json.loads((DATA / "t5_config.json").read_text()),
        )
        for name, config in [
            m for m in (("SAO 1.0", None), ("SAO Small", small)) if m[0] in args.models
        ]:
            latents = (
                (config.sample_size // config.vae.downsampling_ratio)
                if config
                else 1024
            )
            variants = list(dict.fromkeys(["bfloat16", *args.variants]))
            for variant in (
                variants
                if config is None
                else [v for v in variants if v in ("bfloat16", "4-bit")]
            ):
                checkpoints = {"off": [False], "on": [True], "both": [False, True]}
                for kind, checkpoint in itertools.product(
                    args.adapter_types, checkpoints[args.grad_checkpoint]
                ):
                    r = measure_training(
                        variant, checkpoint, args.runs * 4, config, latents, kind
                    )
                    print(
                        f"| {name} ({latents} latents) | {variant} | {kind} |"
                        f" {'yes' if checkpoint else 'no'} | {1e3 * r['step']:.1f} |"
                        f" {r['peak']:.2f} |",
                        flush=True,
                    )
        raise SystemExit

    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    print(
        f"mlx {mx.__version__}, {mx.default_device()}, {args.steps} steps, cfg 7, 1024"
        f" latents, sampler {args.sampler or 'dpmpp-3m-sde'}, APG {args.apg_scale}, VAE"
        f" {args.vae_dtype}, low memory {'on' if args.low_memory else 'off'}, command"
        f" buffers of {os.environ['MLX_MAX_OPS_PER_BUFFER']} ops /"
        f" {os.environ['MLX_MAX_MB_PER_BUFFER']} MB, float32 = {float32_matmuls()}"
        " matmuls"
    )
    peers = {}  # (precision, torch.compile mode): [before, after]
    if args.peer:
        for dtype in dict.fromkeys(peer_dtype(v) for v in args.variants):
            for mode in args.peer_compile:
                peers[dtype, mode] = [run_peer(dtype, args.steps, 2, mode)]
    ends = {}
    print(
        "| DiT | LoRA | compiled | audios | text (s) | per step (ms) | sampling (s) |"
        " decode (s) | end to end (s) | per audio (s) | first generation (s) | each"
        " later one (s) | peak (GB): all (text / sampling / decode) |"
    )
    print(
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        " --- | ---: |"
    )
    for variant, adapter, compile, batch_size in itertools.product(
        args.variants, args.adapters, compiles, args.batch_sizes
    ):
        r = measure(
            variant,
            compile,
            args.steps,
            args.runs,
            batch_size,
            low_memory=args.low_memory,
            vae_dtype=getattr(mx, args.vae_dtype),
            sampling=dict(sampler=args.sampler, apg_scale=args.apg_scale),
            adapter=adapter,
        )
        print(
            f"| {label(variant)} | {adapter} | {'yes' if compile else 'no'} |"
            f" {batch_size} | {r['text']:.3f} | {1e3 * r['sampling'] / args.steps:.1f}"
            f" | {r['sampling']:.2f} | {r['decode']:.3f} | {r['end to end']:.2f} |"
            f" {r['end to end'] / batch_size:.2f} | {r['first']:.2f} |"
            f" {', '.join(f'{t:.2f}' for t in r['runs'])} | {r['peak']:.2f}"
            f" ({' / '.join(f'{v:.2f}' for v in r['peaks'].values())}) |",
            flush=True,
        )
        ends[variant, adapter, compile, batch_size] = r["end to end"] / batch_size
    if peers:
        for key in peers:
            peers[key].append(run_peer(*key[:1], args.steps, 2, key[1]))
        torch_version = next(iter(peers.values()))[0]["torch"]
        print(
            f"\ndiffusers (peer_diffusers.py, torch {torch_version}), before / after"
            " ours, same call:"
        )
        print(
            "| precision | DiT | first generation, 2 steps (s) | end to end (s) |"
            " DiT forward, batch 2 (ms) | decode (ms) | peak (GiB) |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for (dtype, mode), (before, after) in peers.items():
            cells = [
                f"{before[k]:.2f} / {after[k]:.2f}"
                for k in ("first_generation_s", "end_to_end_s")
            ]
            cells += [
                f"{1e3 * before[k]:.1f} / {1e3 * after[k]:.1f}"
                for k in ("dit_forward_s", "decode_s")
            ]
            dit = "eager" if mode == "off" else f"torch.compile {mode}"
            print(
                f"| {dtype} | {dit} | {' | '.join(cells)} |"
                f" {max(before['peak_GiB'], after['peak_GiB']):.2f} |"
            )
        print(
            "\n| ours | compiled | audios | peer | ours end to end per audio (s) | peer"
            " (s, mean) | ours faster |"
        )
        print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
        for (variant, adapter, compile, batch_size), ours in ends.items():
            dtype = peer_dtype(variant)
            for mode in args.peer_compile:
                theirs = statistics.mean(p["end_to_end_s"] for p in peers[dtype, mode])
                dit = "eager" if mode == "off" else f"torch.compile {mode}"
                print(
                    f"| {label(variant)}"
                    f"{' + ' + adapter if adapter != 'none' else ''} |"
                    f" {'yes' if compile else 'no'} | {batch_size} | diffusers {dtype},"
                    f" {dit} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x |"
                )

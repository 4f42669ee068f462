"""Time Stable Audio Open 1.0 generation with random weights at the real shapes (no download).

Prints, per dtype: text encoding, one guided DiT step, the sampling loop, VAE decoding,
end to end, and the peak memory of the whole generation, as a markdown table.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx

from stable_audio import StableAudio
from stable_audio.model_io import Components, build, parse_config

DATA = Path(__file__).parent / "test_data"


def random_pipeline(dtype) -> StableAudio:
    config = parse_config(
        json.loads((DATA / "sao1_model_config.json").read_text()),
        json.loads((DATA / "t5_config.json").read_text()),
    )
    models = build(config)
    for name in ("t5", "dit"):
        models[name].set_dtype(dtype)
    mx.eval([m.parameters() for m in models.values()])
    return StableAudio(Components(config, None, **models))


def encode_text(pipe, batch_size):
    """What StableAudio.condition does, on random token ids instead of a tokenized prompt."""
    vocab = pipe.config.t5.vocab_size
    tokens = mx.random.randint(0, vocab, (batch_size, 128), key=mx.random.key(0))
    mask = mx.broadcast_to((mx.arange(128) < 20).astype(mx.int32), (batch_size, 128))
    seconds = dict(seconds_start=[0.0] * batch_size, seconds_total=[pipe.window_seconds] * batch_size)
    cross, global_cond = pipe.conditioner(pipe.t5(tokens, mask), mask, **seconds)
    mx.eval(cross, global_cond)
    return cross, global_cond


def generate(pipe, steps, batch_size, times):
    """One full generation, recording each phase's time in `times`."""
    start = time.perf_counter()
    cross, global_cond = encode_text(pipe, batch_size)
    times["text"].append(time.perf_counter() - start)

    start = time.perf_counter()
    for latents in pipe.generate_latents((cross, global_cond, None), steps=steps, seed=0):
        mx.eval(latents)
    times["sampling"].append(time.perf_counter() - start)

    start = time.perf_counter()
    mx.eval(pipe.decode(latents))
    times["decode"].append(time.perf_counter() - start)
    times["end to end"].append(sum(times[k][-1] for k in ("text", "sampling", "decode")))


def dit_step(pipe, batch_size, repeats=10):
    cross, global_cond = encode_text(pipe, batch_size)
    c = pipe.config
    x = mx.random.normal((batch_size, c.sample_size // c.vae.downsampling_ratio, c.dit.io_channels))
    t = mx.full((batch_size,), 0.5)
    step = lambda: mx.eval(pipe.dit.guided(x, t, cross, global_cond, cfg_scale=7.0))
    step()
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()

    print(f"mlx {mx.__version__}, {mx.default_device()}, {args.steps} steps, cfg 7, 1024 latents")
    print("| DiT/T5 dtype | text (s) | DiT step (ms) | sampling (s) | decode (s) | end to end (s) | peak (GB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.dtypes:
        pipe = random_pipeline(getattr(mx, name))
        step = dit_step(pipe, args.batch_size)
        times = {k: [] for k in ("text", "sampling", "decode", "end to end")}
        generate(pipe, 2, args.batch_size, {k: [] for k in times})  # warm-up
        mx.reset_peak_memory()
        for _ in range(args.runs):
            generate(pipe, args.steps, args.batch_size, times)
        med = {k: statistics.median(v) for k, v in times.items()}
        peak = mx.get_peak_memory() / 1e9
        print(
            f"| {name} | {med['text']:.3f} | {1e3 * step:.1f} | {med['sampling']:.2f} | "
            f"{med['decode']:.3f} | {med['end to end']:.2f} | {peak:.2f} |"
        )
        del pipe
        mx.clear_cache()

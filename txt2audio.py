import argparse
import secrets
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from stable_audio import DEFAULT_REPO, StableAudio, check_arguments, check_finite, check_lora, limit_memory, load_config, settings
from stable_audio import loops, lora
from stable_audio.audio import FORMATS, LEVELS, read_audio, set_level, write_audio
from stable_audio.spectrogram import write_spectrogram
from stable_audio.model_io import first_line
from stable_audio.sampler import FLOW_SAMPLERS, SAMPLERS
from stable_audio.t5 import check_prompt

DTYPES = ("float16", "bfloat16", "float32")


def output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(n)]


def check_output(output: str, raw: bool):
    """Refuse output paths we cannot write."""
    path = Path(output)
    if path.suffix.lower() not in FORMATS:
        *others, last = FORMATS
        raise ValueError(f"Output {output!r} must end in {', '.join(others)} or {last}.")
    if not path.parent.is_dir():
        raise ValueError(f"The folder of {output!r} does not exist.")
    if path.is_dir():
        raise ValueError(f"Output {output!r} is a folder.")
    if raw and path.suffix.lower() != ".wav":
        raise ValueError(f"--raw writes 32-bit float samples, which {path.suffix.lower()[1:].upper()} cannot hold: use .wav.")


def parse_range(text: str, example: str = "START:END in seconds, e.g. 10:15") -> tuple:
    try:
        start, end = (float(t) for t in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {example}, not {text!r}") from None
    return start, end


def parse_interval(text: str) -> tuple:
    return parse_range(text, "MIN:MAX noise levels, e.g. 0.1:0.9")


def lora_settings(args) -> list:
    """(file, strength, interval, layer_filter) per --lora; an interval or a filter given
    once applies to every adapter, or is given once per --lora, in order."""
    n = len(args.lora)
    per_adapter = []
    for flag, values, default in (("--lora-interval", args.lora_interval, None), ("--lora-layer-filter", args.lora_layer_filter, "")):
        if values and not n:
            raise ValueError(f"{flag} needs a --lora.")
        if len(values) not in (0, 1, n):
            raise ValueError(f"Give {flag} once (for every adapter) or once per --lora ({n} times), not {len(values)} times.")
        per_adapter.append(values * n if len(values) == 1 else values or [default] * n)
    entries = [(path, strength, interval, layer_filter) for (path, strength), interval, layer_filter in zip(args.lora, *per_adapter)]
    for entry in entries:
        check_lora(*entry)
    return entries


def check_dtypes(args):
    """Fill in --dtype's default (float16 on a GPU, float32 on the CPU) and refuse unknown dtypes."""
    if args.dtype is None:
        args.dtype = "float16" if mx.default_device() == mx.gpu else "float32"
    for dtype in (args.dtype, args.vae_dtype):
        if dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")


def report(verbose: bool, phase: str, start: float):
    if verbose:
        peak = mx.get_peak_memory() / 1024**3
        print(f"[INFO] {phase}: {time.perf_counter() - start:.2f} s, peak memory {peak:.2f} GB")
        mx.reset_peak_memory()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate audio from text with Stable Audio Open.")
    parser.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, no usage
    parser.add_argument("prompt")
    parser.add_argument("--model", default=DEFAULT_REPO, help="Converted folder, released folder or Hub repo (default: %(default)s)")
    parser.add_argument("--negative-prompt", help="What the audio should not sound like")
    parser.add_argument("--seconds-start", type=float, default=0.0, help="Timing condition: where the clip starts (default: 0)")
    parser.add_argument("--seconds-total", type=float, help="Length of the audio, up to 512 s for SAO 1.0; beyond the model's window it is made window by window (default: the window, 47.55 s)")
    parser.add_argument("--overlap", type=float, help="Seconds each window of a longer piece keeps of the one before (default: a quarter of the window)")
    parser.add_argument("--continue", dest="continue_audio", metavar="FILE", help="Extend this audio file to --seconds-total (its end is kept by the first window)")
    parser.add_argument("--loop", action="store_true", help="Make a seamless loop: its end flows into its start (--seconds-total long, or --bpm and --bars)")
    parser.add_argument("--bpm", type=float, help="The loop's tempo, with --bars: its length is exactly that many bars")
    parser.add_argument("--bars", type=int, help="The loop's length in bars, with --bpm")
    parser.add_argument("--beats-per-bar", type=int, default=4, help="Beats in a bar, with --bpm (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="Sampler steps (default: the model's, 100 for SAO 1.0, 8 for SAO Small)")
    parser.add_argument("--cfg-scale", type=float, help="Classifier-free guidance scale (default: 7 for SAO 1.0, 1 for SAO Small)")
    parser.add_argument("--apg-scale", type=float, default=0.0, help="Adaptive projected guidance, 0 (plain CFG) to 1 (stable-audio-tools 0.0.20's default) (default: %(default)s)")
    parser.add_argument("--cfg-norm-threshold", type=float, default=0.0, help="Cap on the norm of the guidance difference, 0 for none (default: %(default)s)")
    parser.add_argument("--cfg-interval", type=parse_interval, default=(0.0, 1.0), metavar="MIN:MAX", help="Guide only at noise levels in [MIN, MAX]: sin(pi t / 2) for SAO 1.0, t for SAO Small (default: 0:1)")
    parser.add_argument("--cfg-rescale", type=float, default=0.0, help="CFG rescale (scale_phi), 0 to 1 (default: %(default)s)")
    parser.add_argument("--sampler", help=f"One of {', '.join(SAMPLERS)} for SAO 1.0 (default: dpmpp-3m-sde); {', '.join(FLOW_SAMPLERS)} for SAO Small (default: pingpong)")
    parser.add_argument("--sigma-min", type=float, help="Lowest noise level of the k-diffusion samplers (default: 0.3)")
    parser.add_argument("--sigma-max", type=float, help="Highest noise level (default: 500 for SAO 1.0's k-diffusion samplers; 1, a time, for v-ddim, euler and SAO Small)")
    parser.add_argument("--flow-schedule", help="SAO Small's schedule: 0.0.20 (stable-audio-tools 0.0.20's, the default) or 0.0.19")
    parser.add_argument("--init-audio", metavar="FILE", help="Make a variation of this audio file (any rate; read with soundfile)")
    parser.add_argument("--init-noise-level", type=float, default=1.0, metavar="SIGMA", help="How far --init-audio is noised before sampling; it replaces --sigma-max (default: %(default)s)")
    parser.add_argument("--inpaint-audio", metavar="FILE", help="Keep this audio file except the --inpaint-range parts, which are regenerated")
    parser.add_argument("--inpaint-range", type=parse_range, action="append", default=[], metavar="START:END", help="Seconds of --inpaint-audio to regenerate; repeat for several ranges")
    parser.add_argument("--lora", type=lora.parse_file_strength, action="append", default=[], metavar="FILE[:STRENGTH]", help="A LoRA or DoRA adapter file (stable-audio-tools' .safetensors) and its strength (default 1); repeat to stack several, applied in order")
    parser.add_argument("--lora-interval", type=parse_interval, action="append", default=[], metavar="MIN:MAX", help="Use the adapter only at noise levels in [MIN, MAX], as --cfg-interval; give it once for every adapter, or once per --lora (default: always)")
    parser.add_argument("--lora-layer-filter", action="append", default=[], metavar="PATTERNS", help="Comma-separated patterns of the DiT layers the adapter leaves alone, in stable-audio-tools' names, e.g. 'transformer.layers.[0-5].,to_global_embed'; once for every adapter, or once per --lora")
    parser.add_argument("--seed", type=int, help="Random seed (default: a random one, printed)")
    parser.add_argument("--n-audios", type=int, default=1, help="How many audios to make (default: %(default)s)")
    parser.add_argument("--output", default="output.wav", help="A .wav, .flac or .mp3 file; several are numbered (default: %(default)s)")
    parser.add_argument("--normalize", choices=LEVELS, default="peak", help="The output's level: peak (the loudest sample at full scale), clamp (clip to +-1, as stable-audio-tools 0.0.20's page) or none (as decoded) (default: %(default)s)")
    parser.add_argument("--spectrogram", action="store_true", help="Also write each output's spectrogram beside it, as a PNG of the same name")
    parser.add_argument("--dtype", help=f"One of {', '.join(DTYPES)} for T5 and the DiT (default: float16 on a GPU, float32 on the CPU)")
    parser.add_argument("--vae-dtype", default="float32", help="dtype of the VAE decoder (default: %(default)s)")
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="Quantize a floating-point DiT to 4 or 8 bits at load time")
    parser.add_argument("--compile", action="store_true", help="Compile each sampler step (DiT, guidance and update) with mx.compile")
    parser.add_argument("--low-memory", action="store_true", help="Keep memory within 0.5 GB of the weights, a little slower")
    parser.add_argument("--raw", action="store_true", help="Write the decoder's float output as is (32-bit float WAV; --normalize none)")
    parser.add_argument("-v", "--verbose", action="store_true", help="Print the time and peak memory of each stage")
    args = parser.parse_args(argv)

    try:
        # Everything that can be checked is checked before the weights are read
        check_dtypes(args)
        check_output(args.output, args.raw)
        if args.init_audio and args.inpaint_audio:
            raise ValueError("Give --init-audio or --inpaint-audio, not both.")
        if bool(args.inpaint_audio) != bool(args.inpaint_range):
            raise ValueError("--inpaint-audio and --inpaint-range go together.")
        if args.continue_audio and (args.init_audio or args.inpaint_audio):
            raise ValueError("--continue takes neither --init-audio nor --inpaint-audio.")
        if args.continue_audio and args.seconds_total is None:
            raise ValueError("--continue needs --seconds-total, the length to extend the file to.")
        if (args.bpm is None) != (args.bars is None) or (args.bpm is not None and not args.loop):
            raise ValueError("--bpm and --bars go together, with --loop.")
        if args.loop and (args.continue_audio or args.init_audio or args.inpaint_audio):
            raise ValueError("--loop makes a clip from the prompt alone: it takes no --continue, --init-audio or --inpaint-audio.")
        if args.bpm is not None and args.seconds_total is not None:
            raise ValueError("Give --seconds-total or --bpm and --bars, not both.")
        for text in (args.prompt, args.negative_prompt or ""):
            check_prompt(text)
        loras = lora_settings(args)
        config = load_config(args.model)
        if args.bpm is not None:  # exactly so many bars, to the sample
            args.seconds_total = loops.loop_samples(args.bpm, args.bars, args.beats_per_bar, config.sample_rate) / config.sample_rate
        if args.init_audio:
            args.sigma_max = args.init_noise_level
        check_arguments(
            config, args.seconds_start, args.seconds_total, args.steps, args.cfg_scale,
            args.sampler, args.sigma_min, args.sigma_max, args.n_audios, args.inpaint_range, args.seed,
            args.cfg_rescale, args.apg_scale, args.cfg_norm_threshold, args.cfg_interval, args.flow_schedule,
        )
        window = config.sample_size / config.sample_rate
        if args.loop and (args.seconds_total or 0) > window + 1e-9:
            raise ValueError(f"A loop is made within one window: {args.seconds_total:.2f} s is longer than {window:.2f} s.")
        piece = bool(args.continue_audio) or (args.seconds_total or 0) > window + 1e-9
        if piece and (args.init_audio or args.inpaint_audio):
            raise ValueError(f"--init-audio and --inpaint-audio work within one window ({window:.2f} s).")
        if args.overlap is not None and not piece:
            raise ValueError(f"--overlap applies to --continue, or to a --seconds-total beyond the window ({window:.2f} s).")
        continued = read_audio(args.continue_audio) if args.continue_audio else None
        init_audio = read_audio(args.init_audio, window) if args.init_audio else None
        inpaint_audio = read_audio(args.inpaint_audio, window) if args.inpaint_audio else None
        seed = secrets.randbits(32) if args.seed is None else args.seed
        print(f"[INFO] Seed {seed}")

        start = time.perf_counter()
        if args.quantize and config.quantization:
            raise ValueError(f"{args.model} is already quantized; leave out --quantize.")
        pipe = StableAudio.from_pretrained(
            args.model, getattr(mx, args.dtype), getattr(mx, args.vae_dtype), args.quantize, loras
        )
        for a in pipe.adapters:
            print(f"[INFO] Adapter {a['file']} ({a['adapter_type']}, rank {a['rank']}) at strength {a['strength']:g}")
        report(args.verbose, "Loading", start)

        init_latents = inpaint = made = None
        if continued:
            start = time.perf_counter()
            made = pipe.encode_whole(continued[1], continued[0])
            check_finite("audio encoding", made)
            del pipe.vae.encoder
            report(args.verbose, "Audio encoding", start)
        if piece:  # checked before anything heavy runs
            windows = pipe.piece_windows(args.seconds_total, args.overlap, 0 if made is None else made.shape[1])
        if init_audio or inpaint_audio:
            start = time.perf_counter()
            if init_audio:
                init_latents = pipe.init_latents(init_audio[1], init_audio[0], seed)
            else:
                inpaint = pipe.inpaint_source(inpaint_audio[1], inpaint_audio[0], args.inpaint_range)
            check_finite("audio encoding", init_latents if init_audio else inpaint[0])
            del pipe.vae.encoder
            report(args.verbose, "Audio encoding", start)

        start = time.perf_counter()
        if piece:
            conditionings = pipe.piece_conditioning(args.prompt, args.negative_prompt, windows, args.seconds_total, args.n_audios)
        else:
            conditionings = [pipe.condition(args.prompt, args.negative_prompt, args.seconds_start, args.seconds_total, args.n_audios)]
        check_finite("text encoding", *[c for conditioning in conditionings for c in conditioning])
        del pipe.t5  # not needed any more
        if args.low_memory:
            limit_memory()
        report(args.verbose, "Text encoding", start)

        start = time.perf_counter()
        sampling = dict(
            steps=args.steps, cfg_scale=args.cfg_scale, sampler=args.sampler, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
            compile=args.compile, cfg_rescale=args.cfg_rescale, apg_scale=args.apg_scale,
            cfg_norm_threshold=args.cfg_norm_threshold, cfg_interval=args.cfg_interval, flow_schedule=args.flow_schedule,
        )
        steps = settings(config, steps=args.steps)["steps"]
        samples = round((args.seconds_total or pipe.window_seconds) * pipe.sample_rate)
        if args.loop:  # the generators fill `filled` in place
            filled = pipe.loop_latents(samples, args.n_audios)
            latents = pipe.generate_loop_latents(conditionings[0], filled, seed, **sampling)
            steps *= 2
        elif piece:
            filled = pipe.piece_latents(windows, args.n_audios, made)
            latents = pipe.generate_piece_latents(conditionings, windows, filled, seed, **sampling)
            steps *= len(windows)
            print(f"[INFO] {len(windows)} windows")
        else:
            latents = pipe.generate_latents(conditionings[0], seed=seed, init_latents=init_latents, inpaint=inpaint, **sampling)
        for i, x in enumerate(tqdm(latents, total=steps, desc="Sampling")):
            mx.eval(x)
            if i == 0 and args.verbose:
                first_step = time.perf_counter() - start
        if args.verbose:
            what = "with compilation" if args.compile else "eager"
            tqdm.write(f"[INFO] First step ({what}): {first_step:.2f} s")
        x = filled if piece or args.loop else x
        check_finite("sampling", x)
        del pipe.dit
        if args.low_memory:
            limit_memory()  # again, now that the DiT is gone
        report(args.verbose, "Sampling", start)

        start = time.perf_counter()
        audio = mx.array(pipe.decode_loop(x, samples)) if args.loop else pipe.decode(x)[..., :samples]
        check_finite("decoding", audio)
        audio = np.array(audio)
        report(args.verbose, "Decoding", start)

        for path, item in zip(output_paths(args.output, args.n_audios), audio):
            if args.raw:
                write_audio(path, item, pipe.sample_rate, subtype="FLOAT")
            else:
                write_audio(path, set_level(item, args.normalize), pipe.sample_rate)
            print(f"[INFO] Wrote {path}")
            if args.spectrogram:
                write_spectrogram(path.with_suffix(".png"), item, pipe.sample_rate)
                print(f"[INFO] Wrote {path.with_suffix('.png')}")
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except (RuntimeError, MemoryError) as e:  # MLX's own failures: out of memory, most likely
        sys.exit(f"error: MLX failed ({first_line(e)}); if memory ran out, try --low-memory, --quantize 8 or fewer --n-audios.")
    except KeyboardInterrupt:
        sys.exit("Interrupted.")


if __name__ == "__main__":
    main()

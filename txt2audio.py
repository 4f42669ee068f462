"""Generate audio from text with Stable Audio Open: the command line of
StableAudio.generate, for one prompt or (--prompts) a file of many."""

import time
from contextlib import suppress
from dataclasses import fields
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from stable_audio import (
    DEFAULT_REPO,
    Settings,
    StableAudio,
    batch,
    limit_memory,
    load_config,
)
from stable_audio.audio import FORMATS, LEVELS, set_level, write_audio
from stable_audio.cli import (
    add_lora_arguments,
    add_model_arguments,
    dtype,
    dtype_name,
    lora_settings,
    number,
    one_line_errors,
    parse_interval,
    parse_range,
    parser,
)
from stable_audio.files import check_writable, same_file
from stable_audio.sampler import FLOW_SAMPLERS, SAMPLERS
from stable_audio.spectrogram import write_spectrogram

MEMORY_ADVICE = "if memory ran out, try --low-memory, --quantize 8 or fewer --n-audios."
# What a line of a --prompts .jsonl file may set, by option name with underscores: the
# flags of one generation and its file; the others (the model, ...) are the run's
LINE_KEYS = (
    "prompt",
    "negative_prompt",
    "seconds_start",
    "seconds_total",
    "overlap",
    "continue",
    "loop",
    "bpm",
    "bars",
    "beats_per_bar",
    "steps",
    "cfg_scale",
    "apg_scale",
    "cfg_norm_threshold",
    "cfg_interval",
    "cfg_rescale",
    "sampler",
    "sigma_min",
    "sigma_max",
    "flow_schedule",
    "init_audio",
    "init_noise_level",
    "inpaint_audio",
    "inpaint_range",
    "seed",
    "n_audios",
    "output",
    "normalize",
    "raw",
)


def _length(group):
    add = group.add_argument
    add(
        "--seconds-start",
        type=number,
        default=0.0,
        help="Timing condition: where the clip starts (default: 0)",
    )
    add(
        "--seconds-total",
        type=number,
        help=(
            "Length of the audio, up to 512 s for SAO 1.0; beyond the model's window it"
            " is made window by window (default: the window, 47.55 s)"
        ),
    )
    add(
        "--overlap",
        type=number,
        help=(
            "Seconds each window of a longer piece keeps of the one before (default: a"
            " quarter of the window)"
        ),
    )
    add(
        "--continue",
        dest="continue_audio",
        metavar="FILE",
        help=(
            "Extend this audio file to --seconds-total (its end is kept by the first"
            " window)"
        ),
    )
    add(
        "--loop",
        action="store_true",
        help=(
            "Make a seamless loop: its end flows into its start (--seconds-total long,"
            " or --bpm and --bars)"
        ),
    )
    add(
        "--bpm",
        type=number,
        help="The loop's tempo, with --bars: its length is exactly that many bars",
    )
    add("--bars", type=int, help="The loop's length in bars, with --bpm")
    add(
        "--beats-per-bar",
        type=int,
        default=4,
        help="Beats in a bar, with --bpm (default: %(default)s)",
    )


def _sampling(group):
    add = group.add_argument
    add(
        "--steps",
        type=int,
        help="Sampler steps (default: the model's, 100 for SAO 1.0, 8 for SAO Small)",
    )
    add(
        "--cfg-scale",
        type=number,
        help="Classifier-free guidance scale (default: 7 for SAO 1.0, 1 for SAO Small)",
    )
    add(
        "--apg-scale",
        type=number,
        default=0.0,
        help=(
            "Adaptive projected guidance, 0 (plain CFG) to 1 (stable-audio-tools"
            " 0.0.20's default) (default: %(default)s)"
        ),
    )
    add(
        "--cfg-norm-threshold",
        type=number,
        default=0.0,
        help=(
            "Cap on the norm of the guidance difference, 0 for none (default:"
            " %(default)s)"
        ),
    )
    add(
        "--cfg-interval",
        type=parse_interval,
        default=(0.0, 1.0),
        metavar="MIN:MAX",
        help=(
            "Guide only at noise levels in [MIN, MAX]: sin(pi t / 2) for SAO 1.0, t for"
            " SAO Small (default: 0:1)"
        ),
    )
    add(
        "--cfg-rescale",
        type=number,
        default=0.0,
        help="CFG rescale (scale_phi), 0 to 1 (default: %(default)s)",
    )
    add(
        "--sampler",
        help=(
            f"One of {', '.join(SAMPLERS)} for SAO 1.0 (default: dpmpp-3m-sde);"
            f" {', '.join(FLOW_SAMPLERS)} for SAO Small (default: pingpong)"
        ),
    )
    add(
        "--sigma-min",
        type=number,
        help="Lowest noise level of the k-diffusion samplers (default: 0.3)",
    )
    add(
        "--sigma-max",
        type=number,
        help=(
            "Highest noise level (default: 500 for SAO 1.0's k-diffusion samplers; 1, a"
            " time, for v-ddim, euler and SAO Small)"
        ),
    )
    add(
        "--flow-schedule",
        help=(
            "SAO Small's schedule: 0.0.20 (stable-audio-tools 0.0.20's, the default) or"
            " 0.0.19"
        ),
    )


def _audio(group):
    add = group.add_argument
    add(
        "--init-audio",
        metavar="FILE",
        help="Make a variation of this audio file (any rate; read with soundfile)",
    )
    add(
        "--init-noise-level",
        type=number,
        default=1.0,
        metavar="SIGMA",
        help=(
            "How far --init-audio is noised before sampling; it replaces --sigma-max"
            " (default: %(default)s)"
        ),
    )
    add(
        "--inpaint-audio",
        metavar="FILE",
        help=(
            "Keep this audio file except the --inpaint-range parts, which are"
            " regenerated"
        ),
    )
    add(
        "--inpaint-range",
        dest="inpaint_ranges",
        type=parse_range,
        action="append",
        default=[],
        metavar="START:END",
        help="Seconds of --inpaint-audio to regenerate; repeat for several ranges",
    )


def _output(group):
    add = group.add_argument
    add(
        "--seed",
        type=int,
        help=(
            "Random seed (default: a random one, printed); with --prompts, the run's,"
            " from which each line without a seed of its own derives one"
        ),
    )
    add(
        "--n-audios",
        dest="batch_size",
        type=int,
        default=1,
        help="How many audios to make (default: %(default)s)",
    )
    add(
        "--output",
        help="A .wav, .flac or .mp3 file; several are numbered (default: output.wav)",
    )
    add(
        "--normalize",
        choices=LEVELS,
        default="peak",
        help=(
            "The output's level: peak (the loudest sample at full scale), clamp (clip"
            " to +-1, as stable-audio-tools 0.0.20's page) or none (as decoded)"
            " (default: %(default)s)"
        ),
    )
    add(
        "--spectrogram",
        action="store_true",
        help=(
            "Also write each output's spectrogram beside it, an SVG of the same name"
            " with axes: time (s), frequency (Hz, log scale) and level (dB)"
        ),
    )
    add(
        "--raw",
        action="store_true",
        help=(
            "Write the decoder's float output as is (32-bit float WAV; --normalize"
            " none)"
        ),
    )


def _many(group):
    add = group.add_argument
    add(
        "--prompts",
        metavar="FILE",
        help=(
            "Make every prompt of FILE with one loaded model: a .txt file, one prompt a"
            ' line, or a .jsonl file, one JSON object a line ("prompt" and any of'
            ' these flags, e.g. "seed", "n_audios"); the flags given are every'
            " line's defaults. See docs/batch.md"
        ),
    )
    add(
        "--output-dir",
        metavar="DIR",
        help=(
            "With --prompts: the folder of its files (made if missing), one per audio,"
            " and of manifest.jsonl, their record; a run again makes only what is"
            " missing"
        ),
    )
    add(
        "--format",
        choices=[f[1:] for f in FORMATS],
        help="With --prompts: the files' format (default: wav)",
    )


def _runtime(group):
    add = group.add_argument
    add_model_arguments(group)
    add(
        "--low-memory",
        action="store_true",
        help="Keep memory within 0.5 GB of the weights, a little slower",
    )
    add(
        "-v",
        "--verbose",
        action="store_true",
        help="Print the time and peak memory of each stage",
    )


def arguments():
    p = parser("Generate audio from text with Stable Audio Open.")
    add = p.add_argument
    add("prompt", nargs="?", help="What to generate (or --prompts FILE)")
    add(
        "--model",
        default=DEFAULT_REPO,
        help="Converted folder, released folder or Hub repo (default: %(default)s)",
    )
    add("--negative-prompt", help="What the audio should not sound like")
    _length(p.add_argument_group("length and mode"))
    _sampling(p.add_argument_group("sampler and guidance"))
    _audio(p.add_argument_group("audio to audio"))
    add_lora_arguments(p.add_argument_group("adapters"))
    _output(p.add_argument_group("seed, batch and output"))
    _many(p.add_argument_group("many prompts"))
    _runtime(p.add_argument_group("precision and memory"))
    return p


def output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(n)]


def check_output(output: str, raw: bool):
    """Refuse an output name we cannot write."""
    path = Path(output)
    if path.suffix.lower() not in FORMATS:
        *others, last = FORMATS
        raise ValueError(
            f"Output {output!r} must end in {', '.join(others)} or {last}."
        )
    if raw and path.suffix.lower() != ".wav":
        kind = path.suffix.lower()[1:].upper()
        raise ValueError(
            f"--raw writes 32-bit float samples, which {kind} cannot hold: use .wav."
        )


def output_files(args, n: int) -> list[Path]:
    """Every file the run will write (its audios, their spectrograms), each checked
    writable now, before any work, and none of them an input file."""
    paths = output_paths(args.output, n)
    paths += [p.with_suffix(".svg") for p in paths] if args.spectrogram else []
    inputs = (args.continue_audio, args.init_audio, args.inpaint_audio)
    for path in paths:
        for source in filter(None, inputs):
            if same_file(path, source):
                raise ValueError(
                    f"The output {path} is the input {source}; choose another --output"
                    " (outputs replace files of their name)."
                )
        check_writable(path)
    return paths


def check_flags(args):
    """What only the command line's flags can get wrong together; the settings
    themselves are checked by Settings.check, as for every front end."""
    given = lambda *names: [n for n in names if getattr(args, n) is not None]
    if bool(args.inpaint_audio) != bool(args.inpaint_ranges):
        raise ValueError("--inpaint-audio and --inpaint-range go together.")
    if args.continue_audio and given("init_audio", "inpaint_audio"):
        raise ValueError("--continue takes neither --init-audio nor --inpaint-audio.")
    if args.continue_audio and args.seconds_total is None:
        raise ValueError(
            "--continue needs --seconds-total, the length to extend the file to."
        )
    if len(given("bpm", "bars")) == 1 or (args.bpm is not None and not args.loop):
        raise ValueError("--bpm and --bars go together, with --loop.")
    if args.loop and given("continue_audio", "init_audio", "inpaint_audio"):
        raise ValueError(
            "--loop makes a clip from the prompt alone: it takes no --continue, "
            "--init-audio or --inpaint-audio."
        )
    if args.bpm is not None and args.seconds_total is not None:
        raise ValueError("Give --seconds-total or --bpm and --bars, not both.")


def settings(args, config) -> Settings:
    """The flags as Settings, checked for the model (which reads the audio files)."""
    s = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    if args.overlap is not None and not s.is_piece(config):
        window = s.window_seconds(config)
        raise ValueError(
            "--overlap applies to --continue, or to a --seconds-total beyond the"
            f" window ({window:.2f} s)."
        )
    return s.check(config)


class Phases:
    """A generation as the command line shows it: a progress bar, and with --verbose
    each phase's time and peak memory; it frees what the phases after it no longer
    need."""

    def __init__(self, s: Settings, args, free: bool = True, **bar_options):
        self.s, self.args = s, args
        self.bar = None
        self.start = time.perf_counter()
        self.free = free  # a batch keeps every model for the lines after
        self.bar_options = bar_options  # the sampler's bar's, beside a batch's

    def begin(self, s: Settings):
        """A batch's next generation."""
        self.s, self.start = s, time.perf_counter()

    def loaded(self, pipe: StableAudio):
        self.pipe = pipe
        for a in pipe.adapters:
            print(
                f"[INFO] Adapter {a['file']} ({a['adapter_type']}, rank {a['rank']}) "
                f"at strength {a['strength']:g}"
            )
        self.report("Loading")

    def report(self, phase: str):
        if self.args.verbose:
            peak = mx.get_peak_memory() / 1024**3
            elapsed = time.perf_counter() - self.start
            print(f"[INFO] {phase}: {elapsed:.2f} s, peak memory {peak:.2f} GB")
            mx.reset_peak_memory()
        self.start = time.perf_counter()

    def progress(self, done: int, total: int):
        if self.bar is None:
            if self.s.is_piece(self.pipe.config):
                print(f"[INFO] {total // self.s.steps} windows")
            self.bar = tqdm(total=total, desc="Sampling", **self.bar_options)
            self.first_step = time.perf_counter() - self.start
        self.bar.update(1)
        if done == total:
            self.close()

    def close(self):
        """The progress bar ended, before any message that follows it."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def phase(self, name: str):
        if name == "audio encoding" and self.free:
            del self.pipe.vae.encoder
        if name == "text encoding" and self.free:
            del self.pipe.t5  # not needed any more
        if name == "sampling":
            if self.args.verbose:
                what = "with compilation" if self.s.compile else "eager"
                print(f"[INFO] First step ({what}): {self.first_step:.2f} s")
            if self.free:
                del self.pipe.dit
        if self.args.low_memory and name in ("text encoding", "sampling"):
            limit_memory()  # again, once the DiT is gone
        self.report(name.capitalize())


def write(audio: np.ndarray, args, sample_rate: int, wanted=None, done=None):
    """Write the audios (all, or the indices in `wanted`) as `args` say, each with a
    warning if it is silent or not finite; `done(index, path, audio)` is called as each
    one's files are whole."""
    paths = output_paths(args.output, args.batch_size)
    for i, (path, item) in enumerate(zip(paths, audio)):
        if wanted is not None and i not in wanted:
            continue
        if args.raw:
            write_audio(path, item, sample_rate, subtype="FLOAT")
        else:
            write_audio(path, set_level(item, args.normalize), sample_rate)
        print(f"[INFO] Wrote {path}")
        warning = batch.level_warning(path, item)
        if warning:
            print(warning)
        if args.spectrogram:
            write_spectrogram(path.with_suffix(".svg"), item, sample_rate)
            print(f"[INFO] Wrote {path.with_suffix('.svg')}")
        if done is not None:
            done(i, path, item)


def check_many(args):
    """A prompt or --prompts, and the flags that go with each."""
    if args.prompts is None:
        given = [f for f in ("output_dir", "format") if getattr(args, f) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ValueError(f"{flag} goes with --prompts FILE.")
        if args.prompt is None:
            raise ValueError("Give a prompt (or --prompts FILE for many).")
        if args.output is None:
            args.output = "output.wav"
        return
    if args.prompt is not None:
        raise ValueError("Give a prompt or --prompts FILE, not both.")
    if args.output_dir is None:
        raise ValueError("--prompts needs --output-dir DIR, the folder of its files.")
    if args.output is not None:
        raise ValueError(
            "--prompts names its files in --output-dir (a .jsonl line may name its own,"
            ' "output"); leave out --output.'
        )


def check_line(args, config) -> tuple:
    """A --prompts line's flags checked as a single run's are: its Settings for the
    model, and the paths of its audios."""
    check_output(args.output, args.raw)
    check_flags(args)
    s = settings(args, config)
    output_files(args, s.batch_size)
    return s, output_paths(args.output, s.batch_size)


def run_settings(args, loras: list, run_seed: int) -> dict:
    """What every audio of a batch is recorded with beside its line's settings."""
    return {
        "model": args.model,
        "dtype": dtype_name(args.dtype),
        "vae_dtype": dtype_name(args.vae_dtype),
        "quantize": args.quantize,
        "lora": [[str(f), s, i, lf] for f, s, i, lf in loras],
        "compile": args.compile,
        "run_seed": run_seed,
    }


def run_many(args, dtypes):
    """--prompts: every line checked, then this process's share of those not made
    yet, with one loaded model; each audio recorded in the manifest once written."""
    every = batch.actions(arguments())
    options = {key: every[key] for key in LINE_KEYS}  # what a line may set
    lines = batch.read_prompts(args.prompts, list(options))
    loras = lora_settings(args)
    config = load_config(args.model)
    if args.quantize and config.quantization:
        raise ValueError(f"{args.model} is already quantized; leave out --quantize.")
    group = mx.distributed.init()  # under mlx.launch: one of several, a share each
    leader = group.rank() == 0
    folder = Path(args.output_dir)
    made_folder = batch.make_folder(folder)
    manifest = batch.Manifest(folder, group.rank(), group.size())
    run_seed, source = batch.draw_run_seed(args.seed, manifest, group)
    recorded = run_settings(args, loras, run_seed)
    suffix = "." + (args.format or "wav")
    run = batch.Run(args.prompts, folder, options, recorded, suffix)
    try:
        jobs = batch.plan(lines, run, args, lambda line: check_line(line, config))
    except BaseException:
        if made_folder:  # nothing written
            with suppress(OSError):
                folder.rmdir()
        raise
    if leader and source != "given":
        print(f"[INFO] Seed {run_seed} ({source}): each line's derives from it")
    jobs = batch.share(jobs, group.rank(), group.size())
    done = batch.pending(jobs, manifest)
    todo = [job for job in jobs if job.missing]
    total = sum(len(job.paths) for job in jobs)
    here = " for this process" if group.size() > 1 else ""
    print(
        f"[INFO] {len(lines)} prompts, {total} audio(s){here}: {done} in {folder}"
        f" already, {total - done} to make"
    )
    if todo:
        quiet = not leader  # one process shows the bars
        sampling_bar = dict(position=1, leave=False, disable=quiet)
        phases = Phases(todo[0].settings, args, False, **sampling_bar)
        pipe = StableAudio.from_pretrained(args.model, *dtypes, args.quantize, loras)
        phases.loaded(pipe)
        batch_bar = dict(total=total, initial=done, desc="Batch", unit="audio")
        with tqdm(**batch_bar, disable=quiet) as bar:
            make(pipe, phases, todo, manifest, bar)
    batch.barrier(group)  # every process done: one manifest
    if leader:
        manifest.merge()
        print(f"[INFO] Manifest {folder / batch.MANIFEST}")


def make(pipe: StableAudio, phases: Phases, todo: list, manifest, bar):
    """Generate and write the audios of the jobs `todo`, each recorded in `manifest`
    and counted on the batch's `bar` as it is written."""
    made = batch.generate_many(
        pipe, [job.settings for job in todo], phases.progress, phases.phase
    )
    for job in todo:
        phases.begin(job.settings)
        try:
            _, audio = next(made)
        except FloatingPointError as e:
            raise FloatingPointError(f"{job.where}: {e}") from None
        finally:
            phases.close()

        def record(index, path, item, job=job):
            manifest.append(job.done(index, item, pipe.sample_rate), path)
            bar.update(1)

        with tqdm.external_write_mode():
            write(np.array(audio), job.args, pipe.sample_rate, job.missing, record)


def main(argv=None):
    args = arguments().parse_args(argv)
    with one_line_errors(MEMORY_ADVICE):
        check_many(args)
        # Everything that can be checked is checked before the weights are read
        dtypes = dtype(args.dtype), dtype(args.vae_dtype)
        if args.prompts is not None:
            return run_many(args, dtypes)
        check_output(args.output, args.raw)
        check_flags(args)
        loras = lora_settings(args)
        config = load_config(args.model)
        s = settings(args, config)
        output_files(args, s.batch_size)
        print(f"[INFO] Seed {s.seed}")
        if args.quantize and config.quantization:
            raise ValueError(
                f"{args.model} is already quantized; leave out --quantize."
            )

        phases = Phases(s, args)
        pipe = StableAudio.from_pretrained(args.model, *dtypes, args.quantize, loras)
        phases.loaded(pipe)
        try:
            audio = pipe.generate(
                settings=s, progress=phases.progress, phase=phases.phase
            )
        finally:
            phases.close()  # a failure's message comes after the bar
        write(np.array(audio), args, pipe.sample_rate)


if __name__ == "__main__":
    main()

"""Many generations with one loaded model: prompt files (.txt, .jsonl) read and checked
line by line before any work, each audio's file name and seed, the manifest that
records every audio written (so that a batch resumes where it stopped), the share of
the lines each process of an mlx.launch run makes, and generate_many, the Python API.

txt2audio.py --prompts is the command line of these; docs/batch.md describes them."""

import argparse
import difflib
import hashlib
import json
import math
import os
import re
import secrets
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .audio import peak_dbfs
from .datasets import SILENCE_DB
from .files import deferred_interrupts, remove, written
from .settings import ArgumentError, Settings

MANIFEST = "manifest.jsonl"
PART = "manifest.rank{}.jsonl"  # a process's own, under mlx.launch
PARTS = re.compile(r"manifest\.rank[0-9]+\.jsonl")
PROMPT_FILES = (".txt", ".jsonl")
# What a record tells beside what was asked for: not compared on resume
MEASURED = ("seconds", "peak_dbfs", "run_seed", "written")
# Settings whose default the model fills in: recorded as used, not as given
RESOLVED = ("steps", "cfg_scale", "sampler", "sigma_min", "sigma_max")
RESOLVED += ("seconds_total", "overlap", "seed")


class Line(NamedTuple):
    number: int  # in the file, from 1
    fields: dict  # "prompt" and any settings, by their option names with underscores


def read_prompts(path, keys) -> list:
    """The Lines of a prompt file: a .txt file holds one prompt a line, a .jsonl file
    one JSON object a line ("prompt" and any of `keys`); in both, blank lines and lines
    starting with # are skipped. A ValueError names the line at fault."""
    path = Path(path)
    if path.suffix.lower() not in PROMPT_FILES:
        raise ValueError(
            "--prompts takes a .txt file (one prompt a line) or a .jsonl file (one JSON"
            f" object a line), not {str(path)!r}."
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"Cannot read {path}: {e.strerror or e}.") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        number = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {number}: not UTF-8 text.") from None
    lines = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix.lower() == ".txt":
            lines.append(Line(number, {"prompt": line}))
            continue
        try:
            fields = _json_object(line)
            _check_keys(fields, keys)
        except ValueError as e:
            raise ValueError(f"{path} line {number}: {e}") from None
        lines.append(Line(number, fields))
    if not lines:
        raise ValueError(f"{path} holds no prompts.")
    return lines


def _json_object(text: str) -> dict:
    def pairs(items):
        seen = {}
        for key, value in items:
            if key in seen:
                raise ValueError(f"key {key!r} given twice")
            seen[key] = value
        return seen

    def constant(name):
        raise ValueError(f"{name} is not a finite number")

    try:
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise ValueError('not a JSON object: write {"prompt": "...", ...}')
    return value


def _check_keys(fields: dict, keys):
    for key in fields:
        if key not in keys:
            close = difflib.get_close_matches(key, keys, 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown key {key!r}{hint}")
    if "prompt" not in fields:
        raise ValueError("no 'prompt'")


def line_args(actions: dict, base: argparse.Namespace, fields: dict):
    """A copy of the command line's flags `base` (an argparse Namespace) with a line's
    `fields` in their place, each converted as its option's value is (`actions`: the
    parser's, by key): numbers as numbers, switches as true or false, ranges as
    "MIN:MAX" or [MIN, MAX], a repeatable option as a list; null for an option whose
    default is none. A ValueError names the key."""
    args = argparse.Namespace(**vars(base))
    for key, value in fields.items():
        action = actions[key]
        setattr(args, action.dest, _value(action, key, value))
    return args


def actions(parser: argparse.ArgumentParser) -> dict:
    """{key: argparse action} of a parser's options, each keyed by its name with
    underscores (n_audios, whose value argparse keeps as batch_size), and of its
    positional arguments (prompt)."""
    found = {}
    for action in parser._actions:
        names = [o[2:] for o in action.option_strings if o.startswith("--")]
        for name in names or ([action.dest] if not action.option_strings else []):
            found[name.replace("-", "_")] = action
    return found


def _value(action, key: str, value):
    if value is None:
        if action.default is None:
            return None
        raise ValueError(f"{key!r} cannot be null")
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise ValueError(f"{key!r} must be true or false, not {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list):
            raise ValueError(f"{key!r} must be a list, not {value!r}")
        return [_one(action, key, v) for v in value]
    return _one(action, key, value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _one(action, key: str, value):
    kind = action.type
    if kind is None:  # text
        if not isinstance(value, str):
            raise ValueError(f"{key!r} must be a string, not {value!r}")
        result = value
    elif kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{key!r} must be a whole number, not {value!r}")
        result = value
    elif getattr(kind, "__name__", "") == "number":  # cli.number: a finite float
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError(f"{key!r} must be a number, not {value!r}")
        result = float(value)
    else:  # a range or an interval, parsed from "MIN:MAX" as on the command line
        if isinstance(value, list) and len(value) == 2 and all(map(_is_number, value)):
            value = ":".join(repr(float(v)) for v in value)
        if not isinstance(value, str):
            raise ValueError(f'{key!r} must be "MIN:MAX" or [MIN, MAX], not {value!r}')
        try:
            result = kind(value)
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise ValueError(f"{key!r}: {e}") from None
    if action.choices is not None and result not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ValueError(f"{key!r} must be one of {choices}, not {value!r}")
    return result


# ---------------------------------------------------------------- seeds and names


def line_seed(run_seed: int, line: int) -> int:
    """The seed of a prompt line that names none: the first 4 bytes, big-endian, of the
    SHA-256 of "RUN_SEED:LINE" (a 32-bit seed, as a random one is)."""
    digest = hashlib.sha256(f"{run_seed}:{line}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def draw_run_seed(given: int, manifest: "Manifest", group=None) -> tuple:
    """(the run seed, where it comes from): --seed if given; else the run seed of the
    folder's latest record (a batch run again goes on with its own seeds); else a new
    random one. Under mlx.launch every process takes rank 0's."""
    if given is not None:
        return given, "given"
    records = manifest.records()
    latest = max(
        records.values(), key=lambda r: str(r.get("written", "")), default=None
    )
    seed = latest.get("run_seed") if latest else None
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32:
        source = f"from {manifest.folder / MANIFEST}"
    else:
        seed, source = secrets.randbits(32), "new"
    if group is not None and group.size() > 1:
        mine = seed if group.rank() == 0 else 0
        seed = mx.distributed.all_sum(mx.array(mine, mx.uint32), group=group).item()
    return seed, source


def make_folder(folder) -> bool:
    """Make the batch's folder if it is missing (its parent must exist); whether it
    was made (then removed if the batch stops before any work)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output-dir {folder} is a file, not a folder.")
    if not folder.parent.is_dir():
        raise ValueError(f"The folder of {folder} does not exist.")
    try:
        folder.mkdir()
    except FileExistsError:
        return False
    except OSError as e:
        raise ValueError(f"Cannot make {folder}: {e.strerror or e}.") from None
    return True


def slug(prompt: str, words: int = 4, width: int = 32) -> str:
    """A prompt's first words, lower case ASCII joined by '-' ("" for none)."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    return "-".join(re.findall(r"[a-z0-9]+", text.lower())[:words])[:width].strip("-")


def default_name(line: int, width: int, prompt: str, seed: int, suffix: str) -> str:
    """A line's file name: its line number, its prompt's slug and its seed, e.g.
    003-warm-analog-pad-s1234.wav."""
    parts = [f"{line:0{width}d}", slug(prompt), f"s{seed}"]
    return "-".join(p for p in parts if p) + suffix


# ---------------------------------------------------------------- the plan


@dataclass
class Job:
    """One line of a batch: one generation of its n_audios."""

    where: str  # "prompts.txt line 3", for messages
    line: int
    args: argparse.Namespace  # the command line's flags with the line's in place
    settings: Settings  # checked for the model, resolved
    paths: list  # each audio's file
    records: list  # what each audio's manifest record holds before it is measured
    missing: list = field(default_factory=list)  # indices of the audios to make

    def done(self, index: int, audio: np.ndarray, sample_rate: int) -> dict:
        """The manifest record of audio `index`, written (`audio` as decoded)."""
        level = peak_dbfs(audio)
        return {
            **self.records[index],
            "seconds": audio.shape[-1] / sample_rate,
            "peak_dbfs": round(level, 2) if math.isfinite(level) else None,
            "written": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        }


@dataclass
class Run:
    """What the lines of one prompt file share."""

    prompts: str  # the file, as messages name it
    folder: Path  # where the audios go
    options: dict  # {key: argparse action} of the settings a line may give
    recorded: dict  # with every audio: the model, its dtype, "run_seed", ...
    suffix: str = ".wav"  # the files' type where a line names no "output"


def plan(lines: list, run: Run, base: argparse.Namespace, check) -> list:
    """Every line as a Job, checked: `base` holds the command line's flags, which a
    line's own replace; `check(args)` returns the line's Settings (checked for the
    model) and its audios' paths, or raises the ValueError a single run would; every
    error is raised naming the line, before any work. A line's seed is its own, else
    line_seed(run_seed, line); its files are in the run's folder, named
    default_name(...) unless it names its "output" (relative to the folder)."""
    folder, options = Path(run.folder), run.options
    width = max(3, len(str(lines[-1].number)))
    base = argparse.Namespace(**vars(base))
    base.seed, base.output = None, None  # the run seed and no --output: not a line's
    jobs, taken = [], {}
    for line in lines:
        here = f"{run.prompts} line {line.number}"
        try:
            args = line_args(options, base, line.fields)
            if args.seed is None:
                args.seed = line_seed(run.recorded["run_seed"], line.number)
            name = line.fields.get("output") or default_name(
                line.number, width, args.prompt, args.seed, run.suffix
            )
            args.output = str(folder / name)
            settings, paths = check(args)
            for path in paths:
                # one name, whatever its case: a Mac's disk does not tell them apart
                other = taken.setdefault(os.path.abspath(path).lower(), line.number)
                if other != line.number:
                    raise ValueError(f"its file {path} is also line {other}'s")
        except ValueError as e:
            raise ValueError(f"{here}: {e}") from None
        given = {k: _jsonable(getattr(args, a.dest)) for k, a in options.items()}
        given.update({k: _jsonable(getattr(settings, k)) for k in RESOLVED})
        given.pop("output", None)  # the record's "file"
        records = [
            {
                "line": line.number,
                "index": i,
                "file": _relative(p, folder),
                **given,
                **run.recorded,
            }
            for i, p in enumerate(paths)
        ]
        jobs.append(
            Job(here, line.number, args, settings, list(map(Path, paths)), records)
        )
    return jobs


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def _relative(path, folder: Path) -> str:
    path = Path(path)
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def share(jobs: list, rank: int = 0, size: int = 1) -> list:
    """The jobs process `rank` of `size` makes: the i-th prompt (from 0, in file
    order) goes to rank i mod size."""
    return jobs[rank::size]


def pending(jobs: list, manifest: "Manifest") -> int:
    """Set each job's `missing` audios: those without a record of the same settings in
    the manifest, or whose file is gone; removes the temporary files a killed run left
    for them. Returns how many audios are done already."""
    records, done = manifest.records(), 0
    for job in jobs:
        job.missing = []
        for i, (path, wanted) in enumerate(zip(job.paths, job.records)):
            found = records.get(wanted["file"])
            if found is not None and same(found, wanted) and path.is_file():
                done += 1
            else:
                job.missing.append(i)
                for stale in leftovers(path):
                    remove(stale)
    return done


def same(record: dict, wanted: dict) -> bool:
    """Whether a manifest record is of the audio `wanted` describes: every field but
    what was measured, as JSON reads it."""
    asked = lambda r: {k: v for k, v in r.items() if k not in MEASURED}
    return asked(record) == json.loads(json.dumps(asked(wanted)))


def leftovers(path: Path) -> list:
    """The temporary files that writers of `path` (files.temporary) left behind."""
    name = re.compile(
        rf"\.{re.escape(path.stem)}\.[a-z0-9_]{{8}}\.partial{re.escape(path.suffix)}"
    )
    try:
        return [p for p in path.parent.iterdir() if name.fullmatch(p.name)]
    except OSError:
        return []


# ---------------------------------------------------------------- the manifest


class Manifest:
    """DIR/manifest.jsonl: one JSON record a line for every audio written, appended
    once its file is whole and on disk (flushed and synced), so that it never names a
    missing or partial file. Under mlx.launch each process appends to its own part,
    DIR/manifest.rank{R}.jsonl, which rank 0 merges into manifest.jsonl once all
    have finished; a part left (a process stopped, or a folder not shared) is read
    with it. Where several records name one file, the latest written holds."""

    def __init__(self, folder, rank: int = 0, size: int = 1):
        self.folder = Path(folder)
        self.path = self.folder / (MANIFEST if size == 1 else PART.format(rank))
        self.repaired = False

    def files(self) -> list:
        try:
            parts = sorted(p for p in self.folder.iterdir() if PARTS.fullmatch(p.name))
        except OSError:
            parts = []
        main = self.folder / MANIFEST
        return ([main] if main.is_file() else []) + parts

    def records(self) -> dict:
        """{file: its latest record}, from manifest.jsonl and every part; a line that
        is not a record (a last line half-written by a killed run) is ignored."""
        latest = {}
        for path in self.files():
            for record in _read_records(path):
                file = record["file"]
                when = str(record.get("written", ""))
                if when >= str(latest.get(file, {}).get("written", "")):
                    latest[file] = record
        return latest

    def append(self, record: dict, audio: Path = None):
        """Add `record` as one line, synced to disk, after `audio` (its file) is: a
        half-written last line left by a killed run is cut off first."""
        if audio is not None:
            _sync(audio)
            _sync(audio.parent)
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with deferred_interrupts():  # the line whole or not at all, on Ctrl-C
            if not self.repaired:
                _cut_partial_line(self.path)
                self.repaired = True
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            _sync(self.folder)

    def merge(self) -> bool:
        """Rank 0's, once every process has finished: manifest.jsonl and the parts
        this folder holds as one manifest.jsonl, one record a file (the latest, of the
        files still there, in line order), written whole; the parts are then removed.
        Nothing is done where there is nothing to merge or to leave out."""
        files = self.files()
        parts = [p for p in files if p.name != MANIFEST]
        lines = sum(len(_read_records(p)) for p in files)
        records = [
            r for r in self.records().values() if (self.folder / r["file"]).is_file()
        ]
        if not parts and lines == len(records):
            return False
        records.sort(key=lambda r: (r.get("line", 0), r.get("index", 0), r["file"]))
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with written(self.folder / MANIFEST) as tmp:
            tmp.write_text(text, encoding="utf-8")
            _sync(tmp)
        _sync(self.folder)
        for part in parts:
            part.unlink(missing_ok=True)
        return True


def _read_records(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    records = []
    for line in text.split("\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("file"), str):
            records.append(record)
    return records


def _cut_partial_line(path: Path):
    """Cut off a last line that a killed writer left without its newline."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


def _sync(path: Path):
    """Flush a file or a folder (its names) to disk, where the system allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def barrier(group):
    """Wait until every process of `group` gets here."""
    if group is not None and group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


# ---------------------------------------------------------------- audio and the API


def level_warning(path, audio) -> str:
    """A one-line warning for an audio (as decoded) that holds NaN or Inf, or is silent
    (its peak below -60 dBFS, the threshold stable-audio-tools 0.0.20 trains with);
    None for one that is neither."""
    level = peak_dbfs(audio)
    if math.isnan(level):
        return f"[WARNING] {path} holds NaN or Inf samples."
    if level < SILENCE_DB:
        return (
            f"[WARNING] {path} is silent: the generated audio peaks at {level:.1f} dBFS"
            f" (below {SILENCE_DB:g} dBFS)."
        )
    return None


def generate_many(pipe, settings_list, progress=None, phase=None):
    """An iterator of (settings, audio) for each of `settings_list` (Settings, or dicts of their
    fields), in order, with the one loaded `pipe`: `settings` resolved (every default
    filled in, a random seed drawn where none is given), `audio` as generate returns
    it. Every item is checked first, when this is called: an ArgumentError naming the
    item (from 0) before any work. `progress` and `phase` are generate's, for each."""
    checked = []
    for i, item in enumerate(settings_list):
        try:
            if not isinstance(item, Settings):
                unknown = set(item) - set(Settings.__dataclass_fields__)
                if unknown:
                    raise ArgumentError(f"Unknown field {min(unknown)!r}.")
                item = Settings(**item)
            checked.append(pipe.settings(item))
        except ArgumentError as e:
            raise ArgumentError(f"Settings {i}: {e}", e.argument) from None
    return _generate(pipe, checked, progress, phase)


def _generate(pipe, checked, progress, phase):
    for s in checked:
        yield s, pipe.generate(settings=s, progress=progress, phase=phase)

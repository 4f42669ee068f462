"""Tests of batch mode (txt2audio.py --prompts, stable_audio/batch.py): prompt files and
their files, each byte for byte what a single run makes; every line checked before any
work; the manifest and resuming after a kill; two processes under mlx.launch; the
warning for silent audio; generate_many."""

import io
import json
import shutil
import signal
import subprocess
import time
from contextlib import redirect_stderr, redirect_stdout
from hashlib import sha256
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from safetensors.numpy import load_file, save_file

import txt2audio
from conftest import _launch, _script
from stable_audio import ArgumentError, Settings, batch, generate_many

STEPS = ["--steps", "4"]
TXT = """# six prompts, blank lines and comments
warm analog pad

deep techno kick, C# minor
  # an indented comment
rain on a tin roof
dusty vinyl texture
birds in a forest

cello
"""
LINES = [2, 4, 6, 7, 8, 10]
SLUGS = "warm-analog-pad deep-techno-kick-c rain-on-a-tin dusty-vinyl-texture".split()
SLUGS += ["birds-in-a-forest", "cello"]
JSONL = [
    {"prompt": "b", "seed": 3, "n_audios": 2, "cfg_scale": 3},
    {"prompt": "jazz trio", "negative_prompt": "vinyl", "output": "named.flac"},
    {"prompt": "drone", "seed": 5, "seconds_total": 0.03, "sampler": "dpmpp-2m"},
    {"prompt": "kick", "seed": 9, "steps": 3, "cfg_interval": [0.1, 0.9]},
]
# each JSONL line's flags in a single run (its output aside)
SINGLE = [
    ["b", "--seed", "3", "--n-audios", "2", "--cfg-scale", "3"],
    ["jazz trio", "--negative-prompt", "vinyl"],
    ["drone", "--seed", "5", "--seconds-total", "0.03", "--sampler", "dpmpp-2m"],
    ["kick", "--seed", "9", "--steps", "3", "--cfg-interval", "0.1:0.9"],
]


def run(*argv) -> tuple:
    """txt2audio.main in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            txt2audio.main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
    if code not in (0, None):
        assert isinstance(code, str) and code.startswith("error: "), code
        assert "\n" not in code, code
    return code or 0, out.getvalue(), err.getvalue()


def records(folder: Path) -> list:
    return [json.loads(line) for line in (folder / "manifest.jsonl").open()]


def contents(folder: Path) -> dict:
    """{name: bytes} of the audio files in `folder`."""
    return {
        p.name: p.read_bytes()
        for p in folder.iterdir()
        if p.suffix in (".wav", ".flac", ".mp3")
    }


def wrote(stdout) -> list:
    """The files a run says it wrote."""
    stdout = stdout if isinstance(stdout, str) else stdout.decode()
    return [Path(line.split()[-1]) for line in stdout.splitlines() if "Wrote" in line]


def single(model, tmp_path, *argv, suffix=".wav") -> list:
    """The files a single run of txt2audio.py writes, in order."""
    out = tmp_path / f"single{len(list(tmp_path.glob('single*')))}{suffix}"
    code, stdout, _ = run(*STEPS, *argv, "--model", model, "--output", out)
    assert code == 0
    return wrote(stdout)


@pytest.fixture(scope="module")
def txt_batch(small_checkpoint, tmp_path_factory) -> Path:
    """An uninterrupted batch of TXT: its folder."""
    root = tmp_path_factory.mktemp("txt batch")
    (root / "prompts.txt").write_text(TXT)
    out = root / "out"
    code, stdout, _ = run(
        "--prompts",
        root / "prompts.txt",
        "--output-dir",
        out,
        "--model",
        small_checkpoint,
        *STEPS,
        "--seed",
        7,
    )
    assert code == 0
    assert "[WARNING]" not in stdout  # the model's output is not silent
    return out


def test_a_txt_batch_is_what_single_runs_make(txt_batch, small_checkpoint, tmp_path):
    """Six prompt lines (blank lines and comments skipped, a # inside a prompt kept):
    each file named from its line, prompt and derived seed, recorded in the manifest,
    and byte for byte the single run of its prompt and seed."""
    made = records(txt_batch)
    assert [r["line"] for r in made] == LINES
    assert made[1]["prompt"] == "deep techno kick, C# minor"
    files = contents(txt_batch)
    assert sorted(files) == sorted(r["file"] for r in made)
    for r, slug in zip(made, SLUGS):
        assert r["seed"] == batch.line_seed(7, r["line"]) and r["run_seed"] == 7
        assert r["file"] == f"{r['line']:03d}-{slug}-s{r['seed']}.wav"
        assert r["steps"] == 4 and r["sampler"] == "dpmpp-3m-sde" and r["index"] == 0
        assert r["model"] == str(small_checkpoint) and r["dtype"] == "float32"
        data, rate = sf.read(txt_batch / r["file"])
        assert r["seconds"] == len(data) / rate
        assert r["peak_dbfs"] > -60
        (path,) = single(small_checkpoint, tmp_path, r["prompt"], "--seed", r["seed"])
        assert path.read_bytes() == files[r["file"]], r["file"]
    # the seed formula docs/batch.md gives
    assert batch.line_seed(7, 2) == int.from_bytes(sha256(b"7:2").digest()[:4], "big")


def test_a_jsonl_batch_is_what_single_runs_make(small_checkpoint, tmp_path):
    """Lines with their own seeds, n_audios, a named output in another format, a piece
    beyond the window, an interval as a list: byte for byte the single runs of the same
    flags; a line without a seed gets the run's derived one."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in JSONL))
    out = tmp_path / "out"
    argv = ["--prompts", prompts, "--output-dir", out, "--model", small_checkpoint]
    code, stdout, _ = run(*argv, *STEPS, "--seed", 11)
    assert code == 0, stdout
    made = records(out)
    assert [(r["line"], r["index"]) for r in made] == [
        (1, 0),
        (1, 1),
        (2, 0),
        (3, 0),
        (4, 0),
    ]
    assert [r["file"] for r in made] == [
        "001-b-s3_0.wav",
        "001-b-s3_1.wav",
        "named.flac",
        "003-drone-s5.wav",
        "004-kick-s9.wav",
    ]
    assert made[2]["seed"] == batch.line_seed(11, 2)
    assert made[2]["negative_prompt"] == "vinyl" and made[0]["cfg_scale"] == 3
    assert made[4]["cfg_interval"] == [0.1, 0.9] and made[4]["steps"] == 3
    assert made[3]["seconds_total"] == 0.03 and made[3]["sampler"] == "dpmpp-2m"
    files = contents(out)
    assert sorted(files) == sorted(r["file"] for r in made)
    by_line = {}
    for r in made:
        by_line.setdefault(r["line"], []).append(r["file"])
    for line, flags in zip((1, 2, 3, 4), SINGLE):
        if line == 2:  # the run's seed for it
            flags = [*flags, "--seed", made[2]["seed"]]
        suffix = Path(by_line[line][0]).suffix
        paths = single(small_checkpoint, tmp_path, *flags, suffix=suffix)
        assert [p.read_bytes() for p in paths] == [files[f] for f in by_line[line]]
    # --format names the files of lines without an output
    code, _, _ = run(*argv, *STEPS, "--seed", 11, "--format", "flac")
    assert code == 0
    assert "004-kick-s9.flac" in contents(out)


BAD_LINES = {
    "broken JSON": ('{"prompt": "x" "seed": 1}', "not JSON"),
    "unknown key": ('{"prompt": "x", "sed": 1}', "unknown key 'sed'"),
    "out of range": ('{"prompt": "x", "steps": 0}', "steps must be in [1, 10000]"),
    "a wrong type": ('{"prompt": "x", "seed": "one"}', "'seed' must be a whole"),
    "an unreadable audio": ('{"prompt": "x", "init_audio": "nowhere.wav"}', "nowhere"),
    "a file twice": ('{"prompt": "x", "output": "001-a-s1.wav"}', "also line 1's"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_a_bad_line_stops_the_batch_before_any_work(
    case, small_checkpoint, tmp_path, monkeypatch
):
    """A bad line 3 of 5: one line naming line 3 and the fault, the weights never
    read, and nothing written: no folder made, an existing manifest untouched."""
    line, phrase = BAD_LINES[case]
    good = '{"prompt": "a", "seed": 1}'
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([good, '{"prompt": "b"}', line, good, good]) + "\n")
    monkeypatch.setattr(txt2audio.StableAudio, "from_pretrained", _refuse)
    argv = ["--prompts", prompts, "--model", small_checkpoint, *STEPS]
    code, _, _ = run(*argv, "--output-dir", tmp_path / "new")
    assert code.startswith(f"error: {prompts} line 3: ") and phrase in code, code
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "manifest.jsonl").write_text('{"file": "x.wav"}\n{"fi')
    code, _, _ = run(*argv, "--output-dir", kept)
    assert code.startswith(f"error: {prompts} line 3: ") and phrase in code, code
    assert [p.name for p in kept.iterdir()] == ["manifest.jsonl"]
    assert (kept / "manifest.jsonl").read_text() == '{"file": "x.wav"}\n{"fi'


def _refuse(*args, **kwargs):
    raise AssertionError("the weights were read")


def test_the_batch_flags_are_checked(small_checkpoint, tmp_path, monkeypatch):
    """A prompt and --prompts, --prompts without --output-dir or with --output, the
    batch flags without --prompts, a prompt file of another kind, missing, or empty, an
    output folder whose parent is missing: one line each, before the weights."""
    monkeypatch.setattr(txt2audio.StableAudio, "from_pretrained", _refuse)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    model = ["--model", small_checkpoint]
    for argv, phrase in [
        (["x", "--prompts", prompts, "--output-dir", tmp_path], "not both"),
        (["--prompts", prompts], "--output-dir DIR"),
        (
            ["--prompts", prompts, "--output-dir", tmp_path, "--output", "a.wav"],
            "--out",
        ),
        (["x", "--output-dir", tmp_path], "--output-dir goes with --prompts"),
        ([], "Give a prompt"),
        (["--prompts", tmp_path / "p.json", "--output-dir", tmp_path], ".jsonl"),
        (["--prompts", tmp_path / "none.txt", "--output-dir", tmp_path], "Cannot read"),
        (["--prompts", prompts, "--output-dir", tmp_path / "a" / "b"], "folder of"),
    ]:
        code, _, _ = run(*argv, *model)
        assert code.startswith("error: ") and phrase in code, (argv, code)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    code, _, _ = run(
        "--prompts", tmp_path / "empty.txt", "--output-dir", tmp_path, *model
    )
    assert "holds no prompts" in code


def _kill_after(argv: list, n: int, signum) -> subprocess.CompletedProcess:
    """Run txt2audio.py with `argv`; send `signum` once it has added `n` records to the
    manifest."""
    manifest = Path(argv[argv.index("--output-dir") + 1]) / "manifest.jsonl"
    count = lambda: manifest.read_bytes().count(b"\n") if manifest.is_file() else 0
    n += count()
    process = subprocess.Popen(
        _script("txt2audio.py", *argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if count() >= n:
            process.send_signal(signum)
            break
        time.sleep(0.002)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def test_an_interrupted_batch_resumes(txt_batch, small_checkpoint, tmp_path):
    """Killed (SIGKILL) after its second audio, and stopped (SIGTERM, as Ctrl-C) after
    two more: every file is whole, the manifest names only files there, and no
    temporary file is left once it goes on; each run again makes exactly the audios
    the manifest lacks, a half-written last manifest line is ignored, and the final
    files are those of an uninterrupted run."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(TXT)
    out = tmp_path / "out"
    argv = ["--prompts", prompts, "--output-dir", out, "--model", small_checkpoint]
    argv = [str(a) for a in argv + STEPS + ["--seed", "7"]]

    def recorded() -> set:
        """The files the manifest names, each whole; every audio file is whole."""
        names = {r["file"] for r in batch.Manifest(out).records().values()}
        assert names <= set(contents(out))
        for name in contents(out):
            assert len(sf.read(out / name)[0]) > 0
        return names

    killed = _kill_after(argv, 2, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    first = recorded()
    assert 2 <= len(first) < 6
    with (out / "manifest.jsonl").open("a") as f:  # as if killed while appending
        f.write('{"line": 10, "index": 0, "file": "010-cel')
    stopped = _kill_after(argv, 2, signal.SIGTERM)
    assert stopped.returncode == 1, stopped.stderr
    assert stopped.stderr.decode().strip().endswith("Interrupted.")
    assert not [p for p in out.iterdir() if ".partial" in p.name]
    second = recorded()
    made = {p.name for p in wrote(stopped.stdout)}
    assert made and not made & first and second - first <= made
    again = subprocess.run(_script("txt2audio.py", *argv), capture_output=True)
    assert again.returncode == 0, again.stderr
    made = {p.name for p in wrote(again.stdout)}
    assert made == set(contents(out)) - second
    assert not [p for p in out.iterdir() if ".partial" in p.name]
    final = records(out)  # each line a record: the half-written one cut off
    assert sorted(r["file"] for r in final) == sorted(contents(out))
    assert contents(out) == contents(txt_batch)  # an uninterrupted run's files
    code, stdout, _ = run(*argv)  # once more: nothing to make
    assert code == 0 and "6 in" in stdout and not wrote(stdout)


def test_two_processes_make_what_one_makes(txt_batch, small_checkpoint, tmp_path):
    """mlx.launch, 2 processes of the ring backend over loopback, without --seed (rank
    0's run seed is everyone's): each makes its share of the lines, and together the
    files one process makes with that seed, byte for byte, in one manifest."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(TXT)
    out = tmp_path / "out"
    argv = ["--prompts", prompts, "--output-dir", out, "--model", small_checkpoint]
    result = _launch("txt2audio.py", *argv, *STEPS)
    assert result.returncode == 0, result.stderr[-2000:]
    (seed,) = {int(w.split()[2]) for w in result.stdout.splitlines() if "Seed" in w}
    assert result.stdout.count("3 audio(s) for this process") == 2
    made = records(out)
    assert [r["line"] for r in made] == LINES
    assert {r["run_seed"] for r in made} == {seed}
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".jsonl") == [
        "manifest.jsonl"
    ]  # the parts merged
    one = tmp_path / "one"
    code, _, _ = run(*argv[:3], one, *argv[4:], *STEPS, "--seed", seed)
    assert code == 0
    assert contents(out) == contents(one)
    assert batch.share(list("abcde"), 1, 2) == ["b", "d"]  # prompt i: rank i mod 2


def test_silent_audio_is_named(small_checkpoint, tmp_path):
    """A model whose decoder outputs zeros (its last convolution's gains zero): a
    single run and a batch warn in one line naming each silent file, and the manifest
    records no level; the ordinary model's outputs warn of nothing."""
    silent = tmp_path / "silent model"
    shutil.copytree(small_checkpoint, silent)
    tensors = load_file(silent / "model.safetensors")
    decoder = "pretransform.model.decoder.layers."
    last = max(int(k[len(decoder) :].split(".")[0]) for k in tensors if decoder in k)
    tensors[f"{decoder}{last}.weight_g"] *= 0
    save_file(tensors, str(silent / "model.safetensors"))
    argv = ["--model", silent, *STEPS, "--seed", 1]
    code, stdout, _ = run("hush", *argv, "--output", tmp_path / "hush.wav")
    assert code == 0
    warnings = [line for line in stdout.splitlines() if "[WARNING]" in line]
    assert warnings == [
        f"[WARNING] {tmp_path / 'hush.wav'} is silent: the generated audio peaks at"
        " -inf dBFS (below -60 dBFS)."
    ]
    assert not sf.read(tmp_path / "hush.wav")[0].any()
    (tmp_path / "p.txt").write_text("hush\nquiet\n")
    out = tmp_path / "out"
    code, stdout, _ = run("--prompts", tmp_path / "p.txt", "--output-dir", out, *argv)
    assert code == 0
    named = [line.split()[1] for line in stdout.splitlines() if "[WARNING]" in line]
    assert named == [str(out / r["file"]) for r in records(out)]
    assert [r["peak_dbfs"] for r in records(out)] == [None, None]
    code, stdout, _ = run("loud", *argv[2:], "--model", small_checkpoint)
    assert code == 0 and "[WARNING]" not in stdout
    # the levels: silence below -60 dBFS, NaN named too
    assert batch.level_warning("a.wav", np.full((2, 9), 1e-4)) is not None
    assert batch.level_warning("a.wav", np.full((2, 9), 1e-2)) is None
    assert "NaN or Inf" in batch.level_warning("a.wav", np.array([[0.5, np.nan]]))


def test_generate_many(small_pipe):
    """The Python API: Settings or dicts, each checked before any work, yielded in
    order with their resolved settings, each audio what generate makes."""
    items = [Settings(prompt="a", steps=3, seed=1), {"prompt": "b", "steps": 2}]
    steps = []
    made = list(
        generate_many(small_pipe, items, progress=lambda d, t: steps.append((d, t)))
    )
    assert [s.prompt for s, _ in made] == ["a", "b"] and made[1][0].seed is not None
    assert steps == [(1, 3), (2, 3), (3, 3), (1, 2), (2, 2)]
    for s, audio in made:
        expected = small_pipe.generate(settings=s)
        assert np.array_equal(np.array(audio), np.array(expected))
    for bad, phrase in [({"prompt": "b", "steps": 0}, "steps"), ({"sed": 1}, "'sed'")]:
        with pytest.raises(ArgumentError, match=f"Settings 1: .*{phrase}"):
            generate_many(small_pipe, [items[0], bad], progress=_refuse)

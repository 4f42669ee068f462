"""Tier 1, files: nothing lost, spliced or stranded. Two processes writing one name at
once; outputs that are inputs; convert --force beside a person's files; the umask; an
unwritable output refused before any work; a continuation too long for its settings
refused before encoding, reading no more than it uses; a full disk (a real one, on a
small tmpfs, where the test can mount one); SIGTERM and SIGHUP; pipes."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

import convert
import txt2audio
from conftest import HERE, _listing, _main, _script, full_disk
from stable_audio import ArgumentError, Settings, StableAudio
from stable_audio import audio as audio_io
from stable_audio import files, load_config, model_io

TONE = (0.5 * np.sin(np.arange(44100 * 2) / 20)).astype(np.float32)

# ---------------------------------------------------------------- tier 1: files


@pytest.fixture
def no_loading(monkeypatch):
    """The weights must not be read: every check comes before them."""

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(StableAudio, "from_pretrained", refuse)
    monkeypatch.setattr(model_io, "load", refuse)


WRITER = """
import sys, time
import mlx.core as mx
import numpy as np
from stable_audio.audio import write_audio
from stable_audio.model_io import write_safetensors
import mlx.core as mx
folder, value, start = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
audio = np.full((2, 44100 * 2), value, np.float32)
tensors = {"x": mx.full((256, 1024), value)}
while time.time() < start:  # both begin together
    pass
for _ in range(40):
    write_audio(folder + "/out.wav", audio, 44100)
    write_safetensors(folder + "/out.safetensors", tensors, {})
"""


def test_two_writers_never_splice_one_file(tmp_path):
    """Two processes writing the same names at once: each file is whole, one writer's,
    and both succeed (a shared temporary name interleaved them, then failed a
    rename)."""
    start = str(time.time() + 3)
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), value, start],
            cwd=HERE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for value in ("0.25", "-0.5")
    ]
    for run in runs:
        assert run.wait(120) == 0, run.stderr.read()
    audio, _ = sf.read(tmp_path / "out.wav", dtype="float32")
    assert len(np.unique(audio)) == 1 and audio.size == 2 * 44100 * 2
    tensor = model_io.read_safetensors(tmp_path / "out.safetensors", (mx.float32,))
    assert len(np.unique(np.array(tensor["x"]))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "out.wav"]


def test_an_output_is_never_an_input(small_checkpoint, tmp_path, no_loading):
    song = tmp_path / "song.wav"
    sf.write(song, TONE[:4000], 44100)
    (tmp_path / "link.wav").symlink_to(song)
    sf.write(tmp_path / "take_1.wav", TONE[:4000], 44100)
    before = _listing(tmp_path)
    model = str(small_checkpoint)
    for args in (
        ["--inpaint-audio", song, "--inpaint-range", "0:0.005", "--output", song],
        ["--init-audio", song, "--output", tmp_path / "link.wav"],
        ["--continue", song, "--seconds-total", "1", "--output", song],
        [
            "--continue",
            tmp_path / "take_1.wav",
            "--seconds-total",
            "1",
            "--n-audios",
            "2",
            "--output",
            tmp_path / "take.wav",
        ],
    ):
        argv = ["a tone", "--model", model, "--steps", "1", *map(str, args)]
        assert "is the input" in _main(txt2audio, argv)
    assert _listing(tmp_path) == before


def test_convert_force_keeps_a_persons_files(small_checkpoint, tmp_path):
    out = tmp_path / "out"
    convert.convert(str(small_checkpoint), str(out), "float32")
    (out / "notes.txt").write_text("mine")
    before = _listing(out)
    with pytest.raises(ValueError, match="did not write \\(notes.txt\\)"):
        convert.convert(str(small_checkpoint), str(out), "float16", force=True)
    assert _listing(out) == before


UMASKED = """
import os, sys
os.umask(0o027)
model, out = sys.argv[1:]
sys.argv = ["convert.py", "--hf-path", model, "--mlx-path", out + "/model"]
import mlx.core as mx
import numpy as np
import convert
from stable_audio.audio import write_audio
from stable_audio.spectrogram import write_spectrogram
convert.main()
write_audio(out + "/a.wav", np.zeros((2, 100), np.float32), 44100)
write_spectrogram(out + "/a.png", np.zeros((2, 4000), np.float32), 44100)
"""


def test_files_follow_the_umask(small_checkpoint, tmp_path):
    """Under umask 027, every file is 0640 and the converted folder 0750 (mkstemp's
    0600 and mkdtemp's 0700 kept other accounts out)."""
    run = subprocess.run(
        [sys.executable, "-c", UMASKED, str(small_checkpoint), str(tmp_path)],
        cwd=HERE,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    modes = {
        str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777
        for p in tmp_path.rglob("*")
    }
    assert modes.pop("model") == 0o750
    assert len(modes) == 8 and set(modes.values()) == {0o640}, sorted(modes.items())


def test_unwritable_outputs_are_refused_before_any_work(
    small_checkpoint, tmp_path, no_loading
):
    model = str(small_checkpoint)
    (tmp_path / "out_2.wav").mkdir()
    long_name = "x" * 240 + ".wav"  # fits; its temporary name does not
    for args, phrase in (
        (["--n-audios", "3", "--output", tmp_path / "out.wav"], "is a folder"),
        (["--output", tmp_path / long_name], "File name too long"),
        (["--output", tmp_path / "a.wav", "--spectrogram", "--n-audios", "3"], ""),
    ):
        (tmp_path / "a_1.svg").mkdir(exist_ok=True)
        message = _main(txt2audio, ["tone", "--model", model, *map(str, args)])
        assert phrase in message and message, message
    with pytest.raises(OSError, match="File name too long"):
        convert.convert(model, str(tmp_path / ("m" * 245)))
    if os.geteuid() != 0:  # the superuser writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        message = _main(
            txt2audio, ["x", "--model", model, "--output", f"{locked}/a.wav"]
        )
        assert "Permission denied" in message
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == []


def test_a_continuation_is_checked_before_encoding(
    small_checkpoint, tmp_path, no_loading
):
    """A source not shorter than seconds_total is refused by the settings' check, which
    reads only as much of the file as it could use (seconds_total and a second)."""
    source = tmp_path / "long.wav"
    sf.write(source, np.zeros(8000 * 60, np.float32), 8000)  # a minute at 8 kHz
    config = load_config(str(small_checkpoint))
    decoded = []
    read = audio_io._read_frames
    audio_io._read_frames = lambda f, frames: decoded.append(read(f, frames)) or (
        decoded[-1]
    )
    try:
        with pytest.raises(ArgumentError, match="longer than the audio it continues"):
            Settings(continue_audio=str(source), seconds_total=5).check(config)
        message = _main(
            txt2audio,
            ["x", "--model", str(small_checkpoint), "--continue", str(source)]
            + ["--seconds-total", "5", "--output", str(tmp_path / "o.wav")],
        )
    finally:
        audio_io._read_frames = read
    assert "longer than the audio it continues (6.00 s)" in message
    assert [len(d) for d in decoded] == [6 * 8000] * 2
    rate, samples = audio_io.read_audio(str(source))
    with pytest.raises(ArgumentError, match="longer than the audio it continues"):
        Settings(continue_audio=(rate, samples), seconds_total=59.9).check(config)


def test_a_full_disk_is_named(small_checkpoint, tmp_path, monkeypatch):
    """On a full disk, txt2audio and convert say which file and why, leaving nothing;
    where no tmpfs can be mounted, libsndfile's and MLX's failures are simulated as
    they come (a RuntimeError "System error" with no space left)."""
    with full_disk(tmp_path) as disk:
        if disk is None:
            disk = tmp_path / "disk"
            real = shutil.disk_usage
            monkeypatch.setattr(
                shutil, "disk_usage", lambda p: real(p)._replace(free=4096)
            )

            def fail(*args, **kwargs):
                raise RuntimeError("Error : System error.")

            monkeypatch.setattr(sf, "write", fail)
            monkeypatch.setattr(convert.mx, "save_safetensors", fail)
        before = _listing(disk)
        model = str(small_checkpoint)
        out = disk / "a.wav"
        message = _main(txt2audio, ["x", "--model", model, "--output", str(out)])
        assert (
            message
            == f"error: Cannot write {out}: the disk is full. Free some space and retry."
        )
        message = _main(convert, ["--hf-path", model, "--mlx-path", f"{disk}/m"])
        assert message.startswith(f"error: Cannot write {disk}/m: the disk is full")
        assert _listing(disk) == before


def test_an_error_with_space_left_is_not_a_full_disk(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("Error : unsupported.")

    monkeypatch.setattr(sf, "write", fail)
    with pytest.raises(RuntimeError, match="unsupported"):
        audio_io.write_audio(tmp_path / "a.wav", TONE[None], 44100)
    enospc = OSError(errno.ENOSPC, "No space left on device")
    assert "disk is full" in str(files.full_disk(tmp_path / "b", enospc))
    assert list(tmp_path.iterdir()) == []


PAUSED = (  # the write in progress waits, to be interrupted
    "import time, {module}; {target} = lambda *a, **k: (print('PAUSED', flush=True),"
    " time.sleep(60))"
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize(
    "script, module, target, args",
    [
        (
            "convert.py",
            "mlx.core",
            "mlx.core.save_safetensors",
            ["--mlx-path", "{out}/m"],
        ),
        (
            "txt2audio.py",
            "soundfile",
            "soundfile.write",
            ["x", "--steps", "1", "--output", "{out}/a.wav"],
        ),
    ],
)
def test_signals_clean_up_as_ctrl_c(
    small_checkpoint, tmp_path, signum, script, module, target, args
):
    """SIGTERM or SIGHUP while a file is being written: the script says so in one line
    and leaves no temporary file (convert.py left a hidden folder per interruption)."""
    model = ["--hf-path" if script == "convert.py" else "--model", small_checkpoint]
    prelude = PAUSED.format(module=module, target=target)
    args = [a.format(out=tmp_path) for a in args]
    run = subprocess.Popen(
        _script(script, *args, *model, prelude=prelude),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in run.stdout:
        if line.startswith("PAUSED"):
            break
    assert any(p.name.startswith(".") for p in tmp_path.iterdir())
    run.send_signal(signum)
    assert run.wait(60) != 0
    assert run.stderr.read().strip().splitlines()[-1].startswith("Interrupted")
    assert list(tmp_path.iterdir()) == []


def test_audio_is_read_once_from_a_pipe(tmp_path):
    """A pipe or a FIFO is read whole, in one pass (reading its header first, then
    opening it again, failed or waited forever)."""
    sf.write(tmp_path / "a.wav", TONE, 44100)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code = (
        "import sys; from stable_audio.audio import read_audio;"
        " print(read_audio(sys.argv[1])[1].shape)"
    )
    for source in (fifo, "/dev/stdin"):
        with open(tmp_path / "a.wav", "rb") as wav:
            run = subprocess.Popen(
                [sys.executable, "-c", code, str(source)],
                cwd=HERE,
                stdin=wav if source == "/dev/stdin" else None,
                stdout=subprocess.PIPE,
                text=True,
            )
            if source == fifo:
                fifo.write_bytes(wav.read())
            assert run.communicate(timeout=60)[0].strip() == f"(1, {len(TONE)})"


def test_what_cannot_fit_in_memory_is_refused_with_the_figure(
    small_checkpoint, monkeypatch
):
    """MLX on Linux crashes when memory runs out, so what is computable is refused up
    front: here, 64 audios of 512 s on a machine of 1 GB (2 copies x 4 bytes x 64 x 2
    channels x 512 s x 44100 Hz = 23.1 GB)."""
    from stable_audio import settings

    config = load_config(str(small_checkpoint))
    monkeypatch.setattr(settings, "physical_memory", lambda: 2**30)
    with pytest.raises(
        ArgumentError, match="need at least 23.1 GB; this machine has 1.1 GB"
    ):
        Settings(seconds_total=512, batch_size=64).check(config)
    Settings(seconds_total=512, batch_size=1).check(config)

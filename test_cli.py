"""Tests of the command line: convert.py and txt2audio.py run as users run them (what
they write, its formats, levels and spectrograms, audio to audio, each bad input refused
in one line), and a smoke test of benchmark.py. No PyTorch."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import HERE, _txt2audio, small_configs
from stable_audio import hub, model_io


def test_convert_cli(small_checkpoint, tmp_path):
    out = tmp_path / "out"
    run = lambda *args: subprocess.run(
        [sys.executable, str(HERE / "convert.py"), *args],
        capture_output=True,
        text=True,
    )
    result = run(
        "--hf-path", str(small_checkpoint), "--mlx-path", str(out), "--dtype", "float32"
    )
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file()
    # refusing to overwrite, a missing source and a bad dtype: one line, no traceback
    for args in (
        ("--hf-path", str(small_checkpoint), "--mlx-path", str(out)),
        ("--hf-path", str(tmp_path / "nowhere"), "--mlx-path", str(tmp_path / "x")),
        ("--hf-path", str(small_checkpoint), "--mlx-path", str(tmp_path / "no" / "x")),
        (
            "--hf-path",
            str(small_checkpoint),
            "--mlx-path",
            str(tmp_path / "x"),
            "--dtype",
            "int8",
        ),
    ):
        result = run(*args)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert (
            "error: " in result.stderr.strip().splitlines()[-1]
        )  # after argparse's usage, if any
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written


def test_convert_from_a_hub_repo_id(small_checkpoint, tmp_path):
    """The newcomer's command, `convert.py --hf-path <repo id>`, through huggingface_hub's
    real download code, answered offline from a local cache that holds the repo."""
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--stabilityai--stable-audio-open-1.0"
    snapshot = repo / "snapshots" / revision
    for file in hub.RELEASED_FILES.values():
        (snapshot / file).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / file).write_bytes((small_checkpoint / file).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    out = tmp_path / "mlx_model"
    result = subprocess.run(
        [sys.executable, str(HERE / "convert.py"), "--mlx-path", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(hub.CONVERTED_FILES)


def test_output_formats_levels_and_spectrograms(small_converted, tmp_path):
    """wav, flac and mp3 come back at the model's rate, channels and length; --normalize
    peak / clamp / none against the decoder's own float output (--raw); --spectrogram
    writes an SVG holding a raster of the stated size (its axes: test_spectrogram.py);
    and a tone's spectrogram is brightest at its pitch.
    """
    import soundfile as sf

    from stable_audio import spectrogram
    from test_spectrogram import Picture

    common = [
        "warm pads",
        "--model",
        str(small_converted),
        "--steps",
        "4",
        "--seconds-total",
        "0.01",
        "--seed",
        "3",
    ]
    assert (
        _txt2audio(*common, "--raw", "--output", str(tmp_path / "raw.wav")).returncode
        == 0
    )
    raw, _ = sf.read(tmp_path / "raw.wav", dtype="float32")
    for suffix, subtype in (
        (".wav", "PCM_16"),
        (".flac", "PCM_16"),
        (".mp3", "MPEG_LAYER_III"),
    ):
        for level in ("peak", "clamp", "none"):
            out = tmp_path / f"{level}{suffix}"
            result = _txt2audio(
                *common, "--normalize", level, "--output", str(out), "--spectrogram"
            )
            assert result.returncode == 0, result.stderr
            info = sf.info(out)
            assert (info.samplerate, info.channels, info.frames, info.subtype) == (
                44100,
                2,
                441,
                subtype,
            ), (out, info)
            audio, _ = sf.read(out, dtype="float32")
            if suffix != ".mp3":  # lossless: the level is exact to 16 bits
                expected = (
                    raw / np.abs(raw).max() if level == "peak" else np.clip(raw, -1, 1)
                )
                assert np.abs(audio - expected).max() < 1.5 / 2**15, (level, suffix)
            pixels = Picture(out.with_suffix(".svg")).pixels
            assert pixels.shape == (spectrogram.HEIGHT, spectrogram.WIDTH, 3)
    rate = 44100
    tone = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(2 * rate) / rate)
    pixels = spectrogram.image(np.stack([tone, tone]), rate).astype(int).sum(axis=-1)
    rows = np.geomspace(20.0, rate / 2, spectrogram.HEIGHT)[::-1]
    assert (
        abs(np.log2(rows[pixels.mean(axis=1).argmax()] / 1000)) < 0.05
    )  # within a semitone's fraction


def test_txt2audio_writes_the_requested_audio(small_converted, tmp_path):
    import soundfile as sf

    common = [
        "warm pads",
        "--model",
        str(small_converted),
        "--steps",
        "4",
        "--seconds-total",
        "0.01",
    ]
    first, second = tmp_path / "a.wav", tmp_path / "b.wav"
    for out in (first, second):
        result = _txt2audio(*common, "--seed", "0", "--output", str(out))
        assert result.returncode == 0, result.stderr
        assert "Seed 0" in result.stdout
    audio, rate = sf.read(first)
    assert rate == 44100 and audio.shape == (441, 2)
    assert np.abs(audio).max() == pytest.approx(1.0, abs=1e-4)  # peak-normalized
    assert first.read_bytes() == second.read_bytes()  # same seed, same file

    result = _txt2audio(
        *common, "--n-audios", "2", "--output", str(tmp_path / "x.flac"), "--raw"
    )
    assert result.returncode != 0 and "FLAC" in result.stderr
    result = _txt2audio(
        *common,
        "--n-audios",
        "2",
        "--output",
        str(tmp_path / "x.flac"),
        "-v",
        "--negative-prompt",
        "hiss",
    )
    assert result.returncode == 0, result.stderr
    assert "Seed " in result.stdout and "peak memory" in result.stdout
    for name in ("x_0.flac", "x_1.flac"):
        audio, rate = sf.read(tmp_path / name)
        assert rate == 44100 and audio.shape == (441, 2)
    result = _txt2audio(
        *common, "--raw", "--output", str(tmp_path / "raw.wav"), "--sampler", "dpmpp-2m"
    )
    assert result.returncode == 0, result.stderr
    assert sf.info(str(tmp_path / "raw.wav")).subtype == "FLOAT"
    # quantized and compiled, in bfloat16 with a float16 decoder
    extra = [
        "--quantize",
        "8",
        "--compile",
        "--low-memory",
        "--dtype",
        "bfloat16",
        "--vae-dtype",
        "float16",
        "-v",
    ]
    result = _txt2audio(*common, *extra, "--output", str(tmp_path / "q.wav"))
    assert result.returncode == 0, result.stderr
    assert "First step (with compilation)" in result.stdout
    assert sf.read(tmp_path / "q.wav")[0].shape == (441, 2)
    names = ["a.wav", "b.wav", "q.wav", "raw.wav", "x_0.flac", "x_1.flac"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_txt2audio_init_and_inpaint_audio(small_converted, audio_files, tmp_path):
    import soundfile as sf

    common = [
        "warm pads",
        "--model",
        str(small_converted),
        "--steps",
        "4",
        "--seed",
        "0",
    ]
    result = _txt2audio(
        *common,
        "--init-audio",
        str(audio_files / "mono 48k.wav"),
        "--init-noise-level",
        "3",
        "--output",
        str(tmp_path / "variation.wav"),
    )
    assert result.returncode == 0, result.stderr
    result = _txt2audio(
        *common,
        "--inpaint-audio",
        str(audio_files / "stereo.flac"),
        "--inpaint-range",
        "0:0.002",
        "--inpaint-range",
        "0.008:0.01",
        "--raw",
        "-v",
        "--output",
        str(tmp_path / "inpainted.wav"),
    )
    assert result.returncode == 0, result.stderr
    assert "Audio encoding" in result.stdout
    for name in ("variation.wav", "inpainted.wav"):
        assert sf.read(tmp_path / name)[0].shape == (512, 2)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [
                "--init-audio",
                "{audio}/mono 48k.wav",
                "--inpaint-audio",
                "{audio}/stereo.flac",
                "--inpaint-range",
                "0:0.001",
            ],
            "not both",
        ),
        (["--inpaint-range", "0:0.001"], "go together"),
        (["--inpaint-audio", "{audio}/stereo.flac"], "go together"),
        (
            ["--inpaint-audio", "{audio}/stereo.flac", "--inpaint-range", "1-2"],
            "START:END",
        ),
        (
            ["--inpaint-audio", "{audio}/stereo.flac", "--inpaint-range", "0:5"],
            "inpaint ranges",
        ),
        (["--init-audio", "{audio}/broken.wav"], "Cannot read audio"),
        (["--init-audio", "{tmp}/none.wav"], "Cannot read audio"),
        (
            ["--init-audio", "{audio}/mono 48k.wav", "--init-noise-level", "0.1"],
            "noise levels",
        ),
        (["--seconds-total", "0"], "seconds_total"),
        (["--seconds-total", "513"], "seconds_total"),
        (["--seconds-start", "-1"], "seconds_start"),
        (["--steps", "0"], "steps"),
        (["--sampler", "ddim"], "sampler"),
        (["--dtype", "int8"], "dtype"),
        (["--vae-dtype", "float64"], "dtype"),
        (["--quantize", "3"], "invalid choice"),
        (["--n-audios", "0"], "audios"),
        (["--output", "{tmp}/missing/out.wav"], "does not exist"),
        (["--output", "{tmp}/out.ogg"], "must end in .wav, .flac or .mp3"),
        (["--seconds-total", "600"], "seconds_total must be in"),
        (["--seconds-total", "0.00005"], "seconds_total must be in"),
        (
            ["--continue", "{audio}/broken.wav", "--seconds-total", "1"],
            "Cannot read audio",
        ),
        (["--continue", "{tmp}/none.wav", "--seconds-total", "1"], "Cannot read audio"),
        (["--continue", "{audio}/stereo.flac"], "--continue needs --seconds-total"),
        (
            [
                "--continue",
                "{audio}/stereo.flac",
                "--seconds-total",
                "1",
                "--init-audio",
                "{audio}/stereo.flac",
            ],
            "--continue takes neither",
        ),
        (
            ["--seconds-total", "0.05", "--init-audio", "{audio}/stereo.flac"],
            "work within one window",
        ),
        (["--seconds-total", "0.005", "--overlap", "0.001"], "--overlap applies to"),
        (["--seconds-total", "0.05", "--overlap", "0.02"], "overlap must be in"),
        (
            ["--seconds-total", "0.05", "--seconds-start", "1"],
            "seconds_start applies within one window",
        ),
        (["--bpm", "120", "--bars", "1"], "--bpm and --bars go together, with --loop"),
        (["--loop", "--bpm", "120"], "--bpm and --bars go together"),
        (["--loop", "--bpm", "10", "--bars", "1"], "tempo must be in"),
        (["--loop", "--bpm", "120", "--bars", "0"], "Bars must be in"),
        (
            ["--loop", "--bpm", "120", "--bars", "1", "--seconds-total", "0.01"],
            "not both",
        ),
        (["--loop", "--bpm", "120", "--bars", "4"], "A loop is made within one window"),
        (
            ["--loop", "--continue", "{audio}/stereo.flac", "--seconds-total", "1"],
            "--loop makes a clip from the prompt alone",
        ),
        (["--output", "{tmp}/out.mp3", "--raw"], "--raw writes 32-bit float samples"),
        (["--normalize", "loud"], "invalid choice"),
        (["--steps", "many"], "invalid int"),
        (["--model", "{tmp}/nowhere"], "neither"),
    ],
)
def test_txt2audio_refuses_bad_input(
    small_converted, audio_files, tmp_path, args, message
):
    args = [
        a.replace("{tmp}", str(tmp_path)).replace("{audio}", str(audio_files))
        for a in args
    ]
    result = _txt2audio(
        "piano",
        "--model",
        str(small_converted),
        "--output",
        str(tmp_path / "out.wav"),
        *args,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_benchmark_runs():
    """A smoke check of benchmark.py on the small model (its timings mean nothing here)."""
    import benchmark

    config = model_io.parse_config(*small_configs())
    result = benchmark.measure(
        "float32", True, steps=2, runs=1, batch_size=2, config=config, low_memory=True
    )
    keys = {
        "text",
        "sampling",
        "decode",
        "end to end",
        "first",
        "runs",
        "peak",
        "peaks",
    }
    assert set(result) == keys
    assert result["peak"] == max(result["peaks"].values()) > 0
    assert result["first"] > 0 and result["runs"] == [result["end to end"]]
    assert all(result[k] > 0 for k in ("text", "sampling", "decode", "end to end"))
    assert benchmark.random_pipeline("4-bit", config).dit.layers[0].ff.proj.bits == 4
    piece = benchmark.measure_piece("float32", 4.5 * 512 / 44100, 2, config)
    assert (
        piece["windows"] == 5 and piece["sampling"] > 0 and piece["peak"] > 0
    )  # the default overlap, whole seconds, is 0 here
    assert len(piece["each window"]) == 5 and min(piece["each window"]) > 0
    # float32: the CPU's float16 matmuls are slow loops
    for adapter in ("static", "gated"):
        assert (
            benchmark.measure(
                "float32",
                True,
                steps=2,
                runs=1,
                batch_size=1,
                config=config,
                adapter=adapter,
            )["sampling"]
            > 0
        )
    for checkpoint in (False, True):
        result = benchmark.measure_training(
            "float32", checkpoint, steps=1, config=config, latents=64
        )
        assert result["step"] > 0 and result["peak"] > 0

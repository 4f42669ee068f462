"""Tier 1: both scripts' command lines under property-based fuzzing (hypothesis): numbers
out of range or not numbers, empty, huge and odd Unicode prompts, paths with spaces. Every
run writes what it should, or exits with one line and leaves its folder as it was."""

import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import app
import benchmark
import convert
import finetune
import txt2audio
from conftest import _copy_folder, _listing, _main
from stable_audio import hub, model_io
from stable_audio import sampler as sampler_lib
from stable_audio.cli import number, parse_interval, parse_range

# ---------------------------------------------------------------- tier 1: the command line under fuzzing

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# numbers as a user may type them: in and out of range, not finite, not numbers at all
INTEGERS = st.one_of(
    st.integers(-3, 4), st.sampled_from([10_001, 2**63, 2**64, -(2**63)])
).map(str)
NUMBERS = st.one_of(
    INTEGERS,
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["", " ", "1e309", "-0", "0x10", "1_0", "abc", "١٢", "0.005", "1e-320", "3:4"]
    ),
)
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "\x00",
            "\udcff surrogate",
            "🎹" * 300,
            "a" * 100_000,
            "\u202eleft",
            "--steps",
            "-",
        ]
    ),
)


def _is_number_in(text: str, low: float, high: float) -> bool:
    try:
        return low < float(text) <= high
    except ValueError:
        return False


@pytest.fixture(scope="session")
def fuzz_model(small_converted, tmp_path_factory):
    return _copy_folder(small_converted, tmp_path_factory.mktemp("fuzz") / "a model ü")


@pytest.fixture
def new_room(tmp_path):
    """Makes an empty folder for each fuzzed example and removes the one before it (a
    convert example holds a model's copy: a few hundred of them would fill a disk)."""
    rooms = []

    def new() -> Path:
        while rooms:
            shutil.rmtree(rooms.pop())
        rooms.append(Path(tempfile.mkdtemp(dir=tmp_path / "fuzz room")))
        return rooms[-1]

    (tmp_path / "fuzz room").mkdir()
    return new


@pytest.mark.filterwarnings("ignore:Prompt longer than")
def test_txt2audio_under_fuzzing(fuzz_model, audio_files, new_room, monkeypatch):
    """Runs of txt2audio.py with every flag either valid or wild (out of range, not finite,
    not a number, odd text, paths that cannot be written): each run writes its files, or
    stops with one line and leaves the folder as it was."""
    import soundfile as sf
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # repo ids answer at once
    memory_limit = mx.set_memory_limit(
        mx.set_memory_limit(1 << 40)
    )  # --low-memory changes it
    files = [str(audio_files / name) for name in ("mono 48k.wav", "stereo.flac")]
    wild_files = [
        str(audio_files / "broken.wav"),
        str(audio_files / "none.wav"),
        str(audio_files),
        "",
    ]
    window = 512 / 44100  # the small model's
    seconds = st.floats(1e-4, window).map(repr)
    options = {  # flag: (valid values, wild values)
        "--negative-prompt": (st.text(max_size=20), TEXT),
        "--seconds-start": (st.floats(0, 512).map(repr), NUMBERS),
        # (a length beyond the window is valid, but thousands of this model's windows)
        "--seconds-total": (
            seconds,
            NUMBERS.filter(lambda v: not _is_number_in(v, window, 512)),
        ),
        "--steps": (st.sampled_from(["1", "2", "3"]), INTEGERS),
        "--cfg-scale": (st.floats(-10, 10).map(repr), NUMBERS),
        "--sampler": (
            st.sampled_from(list(sampler_lib.SAMPLERS)),
            st.sampled_from(["pingpong", "", "DPMPP-2M"]),
        ),
        "--sigma-min": (st.floats(0.01, 1).map(repr), NUMBERS),
        "--sigma-max": (st.floats(2, 1000).map(repr), NUMBERS),
        "--init-audio": (st.sampled_from(files), st.sampled_from(wild_files)),
        "--init-noise-level": (st.floats(2, 100).map(repr), NUMBERS),
        "--inpaint-audio": (st.sampled_from(files), st.sampled_from(wild_files)),
        "--inpaint-range": (
            st.tuples(st.just("0"), seconds).map(":".join),
            st.one_of(st.tuples(NUMBERS, NUMBERS).map(":".join), TEXT),
        ),
        "--seed": (st.integers(0, 2**64 - 1).map(str), INTEGERS),
        "--n-audios": (st.sampled_from(["1", "2"]), INTEGERS),
        "--dtype": (
            st.sampled_from(["float32", "bfloat16", "float16"]),
            st.sampled_from(["float64", "", "fp16"]),
        ),
        "--vae-dtype": (
            st.sampled_from(["float32", "float16"]),
            st.sampled_from(["int8", "double"]),
        ),
        "--quantize": (st.sampled_from(["8", "4"]), st.sampled_from(["3", "x", ""])),
        "--model": (
            st.just(str(fuzz_model)),
            st.sampled_from(
                ["someone/a-model", str(audio_files), "no such folder", ""]
            ),
        ),
        "--output": (
            st.sampled_from(["out.wav", "a b ü.flac", "x.WAV", "y.mp3"]),
            st.sampled_from(["x.ogg", "noext", "missing/x.wav", "", "taken.wav"]),
        ),
    }
    switches = ["--compile", "--low-memory", "--raw", "-v"]
    successes = []

    @FUZZ
    @given(st.data())
    def run(data):
        room = new_room()
        (room / "taken.wav").mkdir()  # an output path that is a folder
        wild = set(
            data.draw(
                st.lists(st.sampled_from(list(options)), max_size=2), "wild flags"
            )
        )
        given = {"--model", "--output", "--steps"} | {
            f for f in options if data.draw(st.integers(0, 3), f) == 0
        }
        if "--inpaint-audio" in given or "--inpaint-range" in given:
            given |= {"--inpaint-audio", "--inpaint-range"}
        argv = [data.draw(TEXT if "prompt" in wild else st.text(max_size=40), "prompt")]
        for flag in sorted(given | wild):
            value = data.draw(options[flag][flag in wild], flag)
            value = str(room / value) if flag == "--output" else value
            argv += [f"{flag}={value}"]  # with "=", values may begin with "-"
        argv += [s for s in switches if data.draw(st.integers(0, 3), s) == 0]
        before = _listing(room)
        try:
            message = _main(txt2audio, argv)
        finally:
            mx.set_memory_limit(memory_limit)
        after = _listing(room)
        if message:
            assert after == before, (
                argv,
                message,
            )  # nothing written, nothing half-written
            return
        output = next(a.split("=", 1)[1] for a in argv if a.startswith("--output="))
        n = next((int(a.split("=")[1]) for a in argv if a.startswith("--n-audios=")), 1)
        written = txt2audio.output_paths(output, n)
        assert set(after) - set(before) == {
            str(p.relative_to(room)) for p in written
        }, argv
        assert all(sf.info(str(p)).frames > 0 for p in written)
        successes.append(argv)

    run()
    assert len(successes) >= 8  # the valid runs were run, not only the refusals


def test_convert_under_fuzzing(
    small_checkpoint, small_converted, audio_files, new_room, monkeypatch
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sources = [
        str(small_checkpoint),
        str(small_converted),
        "someone/a-model",
        str(audio_files),
        "nowhere",
        "",
    ]
    targets = [
        "new model",
        "ünï cödé",
        "converted",
        "notes",
        "file.txt",
        "missing/x",
        "",
        ".",
    ]
    options = {
        "--dtype": st.sampled_from(
            ["float16", "bfloat16", "float32", "float64", "half"]
        ),
        "--q-bits": st.one_of(INTEGERS, st.sampled_from(["8"])),
        "--q-group-size": st.one_of(INTEGERS, st.sampled_from(["32", "128"])),
    }

    @FUZZ
    @given(st.data())
    def run(data):
        room = new_room()
        shutil.copytree(small_converted, room / "converted")
        (room / "notes").mkdir()
        (room / "notes" / "todo.txt").write_text("mine")
        (room / "file.txt").write_text("mine")
        target = data.draw(st.sampled_from(targets), "target")
        argv = [
            "--hf-path",
            data.draw(st.sampled_from(sources), "source"),
            "--mlx-path",
            str(room / target),
        ]
        for flag, values in options.items():
            if data.draw(st.integers(0, 2), flag) == 0:
                argv += [flag, data.draw(values)]
        argv += [
            s
            for s in ("-q", "--force", "--allow-pickle")
            if data.draw(st.booleans(), s)
        ]
        before = _listing(room)
        message = _main(convert, argv)
        after = _listing(room)
        if message:
            assert after == before, (argv, message)
        else:
            written = {k for k in after if k.startswith(target + os.sep)}
            assert written == {
                os.path.join(target, f) for f in hub.CONVERTED_FILES
            }, argv
            assert {k for k in after if k not in written and k != target} == {
                k for k in before if not k.startswith(target + os.sep) and k != target
            }
            model_io.load_config(str(room / target))

    run()


@pytest.mark.parametrize("script", [txt2audio, finetune, app, benchmark])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_every_float_flag_refuses_what_is_not_finite(script, value, capsys):
    """Every float flag of every script (and every range) is read by cli.number or
    parse_range, which refuse non-finite numbers while parsing, before anything loads;
    no flag reads a plain float."""
    parser = script.arguments()
    actions = [a for a in parser._actions if a.option_strings]
    assert not [a.dest for a in actions if a.type is float]
    numeric = [a for a in actions if a.type in (number, parse_range, parse_interval)]
    assert numeric
    for action in numeric:
        text = value if action.type is number else f"0:{value}"
        with pytest.raises(SystemExit) as exit:
            parser.parse_args([action.option_strings[-1], text])
        assert exit.value.code.startswith(
            f"error: argument {'/'.join(action.option_strings)}: expected"
        ), exit.value.code
        assert "\n" not in exit.value.code

"""Tier 1, hardening: a failed conversion leaves nothing; damaged and wrong files are
refused by name; a local fake Hub (the real download code against it, and each of its
failures); pickles (a malicious one included; PyTorch writes them); convert's --force;
and NaN or Inf by stage. Each is checked for its one line and for nothing written."""

import json
import os
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

import convert
from conftest import _cli, _copy_folder, _refused
from stable_audio import hub as checkpoints
from stable_audio import model_io

# ---------------------------------------------------------------- tier 1: hardening


def test_failed_conversion_leaves_nothing(small_checkpoint, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", fail)
    with pytest.raises(OSError):
        convert.convert(str(small_checkpoint), str(tmp_path / "out"), "float16")
    assert list(tmp_path.iterdir()) == []


def _damaged_copy(src: Path, dst: Path, edit):
    from safetensors.numpy import load_file

    folder = _copy_folder(src, dst / "damaged")
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop("model.model.transformer.layers.1.ff.ff.2.bias"),
            "layers.1.ff.out.bias",
        ),
        (
            lambda t: t.update({"model.model.extra.weight": np.zeros(3, np.float32)}),
            "model.model.extra.weight",
        ),
        (
            lambda t: t.update(
                {
                    "model.model.transformer.project_in.weight": np.zeros(
                        (3, 3), np.float32
                    )
                }
            ),
            "project_in.weight",
        ),
        (
            lambda t: t.pop("pretransform.model.decoder.layers.0.weight_g"),
            "decoder.layers.0.weight_v",
        ),
        (
            lambda t: t.update(
                {
                    "model.model.transformer.rotary_pos_emb.inv_freq": np.ones(
                        16, np.float32
                    )
                }
            ),
            "RoPE",
        ),
    ],
)
def test_loader_refuses_damaged_checkpoints(small_checkpoint, tmp_path, edit, message):
    folder = _damaged_copy(small_checkpoint, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        model_io.load(str(folder))


def test_resolve_refuses_what_is_neither_folder_nor_repo(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    for bad in (
        str(tmp_path / "file.txt"),
        "not a repo id",
        str(tmp_path / "a" / "b" / "c"),
    ):
        with pytest.raises(ValueError, match="neither"):
            checkpoints.resolve(bad)
    with pytest.raises(
        ValueError, match="neither model_config.json .* nor config.json"
    ):
        model_io.load(str(tmp_path))


class FakeHub:
    """A local stand-in for huggingface.co: it serves `folder` as any model repo through
    the real download code, or fails as the Hub does (`mode`)."""

    FAILURES = (
        {  # mode -> (status, X-Error-Code, X-Error-Message) of the file downloads
            "missing": (401, "RepoNotFound", "Repository not found"),
            "gated": (401, "GatedRepo", "Access to model is restricted"),
            "token": (401, None, "Invalid credentials in Authorization header"),
            "forbidden": (403, None, "Forbidden"),
            "down": (503, None, "Service unavailable"),
        }
    )

    def __init__(self, folder: Path, mode: str = "serve"):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub, self.authorizations = self, []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                hub.authorizations.append(self.headers.get("Authorization"))
                path = self.path.split("?")[0]
                api = path.startswith("/api/models/")
                # a gated or forbidden repo's listing is public; only its files are refused
                if mode in hub.FAILURES and not (
                    api and mode in ("gated", "forbidden")
                ):
                    status, code, message = hub.FAILURES[mode]
                    return self.reply(
                        status, b"", {"X-Error-Code": code, "X-Error-Message": message}
                    )
                if api:
                    files = sorted(
                        str(p.relative_to(folder))
                        for p in folder.rglob("*")
                        if p.is_file()
                    )
                    if (
                        "/tree/" in path
                    ):  # huggingface_hub >= 1 lists the files of a commit
                        entry = lambda f: {
                            "type": "file",
                            "path": f,
                            "size": (folder / f).stat().st_size,
                            "oid": "b" * 40,
                        }
                        return self.reply(
                            200, json.dumps([entry(f) for f in files]).encode()
                        )
                    listing = {
                        "id": "repo",
                        "sha": "a" * 40,
                        "siblings": [{"rfilename": f} for f in files],
                    }
                    return self.reply(200, json.dumps(listing).encode())
                data = (
                    folder / path.split("/resolve/", 1)[1].split("/", 1)[1]
                ).read_bytes()
                headers = {"X-Repo-Commit": "a" * 40, "ETag": f'"{hash(data)}"'}
                # "cut": the connection drops before the body (huggingface_hub retries, then fails)
                self.reply(
                    200, b"" if mode == "cut" else data, headers, len(data), body
                )

            def reply(self, status, data, headers=None, length=None, body=True):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    if value:
                        self.send_header(key, value)
                self.send_header(
                    "Content-Length", str(len(data) if length is None else length)
                )
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


TOKEN = "hf_NotARealTokenButSecret"


def _hub_env(tmp_path, url, **extra):
    env = dict(
        os.environ,
        HF_ENDPOINT=url,
        HF_HOME=str(tmp_path / "hf home"),
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return {k: v for k, v in {**env, **extra}.items() if v is not None}


def test_download_through_a_fake_hub(small_checkpoint, tmp_path):
    """convert.py with a repo id: huggingface_hub's real download code, against a local
    Hub that serves the small checkpoint; the result equals converting the folder."""
    hub = FakeHub(small_checkpoint)
    try:
        result = _cli(
            "convert.py",
            "--hf-path",
            "someone/a-model",
            "--mlx-path",
            str(tmp_path / "from hub"),
            env=_hub_env(tmp_path, hub.url),
        )
    finally:
        hub.close()
    assert result.returncode == 0, result.stderr
    assert set(hub.authorizations) == {f"Bearer {TOKEN}"}  # the token was used, ...
    assert TOKEN not in result.stdout + result.stderr  # ... never shown
    convert.convert(str(small_checkpoint), str(tmp_path / "local"))
    for file in checkpoints.CONVERTED_FILES:
        assert (tmp_path / "from hub" / file).read_bytes() == (
            tmp_path / "local" / file
        ).read_bytes(), file


@pytest.mark.parametrize(
    "mode, env, phrases",
    [
        (
            "missing",
            {},
            [
                "is not on the Hugging Face Hub",
                "hf auth login",
                "HF_TOKEN",
                "--hf-path",
            ],
        ),
        (
            "gated",
            {},
            [
                "is gated",
                "accept its licence on https://huggingface.co/someone/a-model",
                "hf auth login",
                "HF_TOKEN",
                "--hf-path",
            ],
        ),
        (
            "gated",
            {"HF_TOKEN": None},
            [
                "is gated",
                "accept its licence",
                "hf auth login",
                "HF_TOKEN",
                "--hf-path",
            ],
        ),
        ("token", {}, ["refused access", "HTTP 401", "hf auth login", "--hf-path"]),
        ("forbidden", {}, ["refused access", "HTTP 403", "licence", "--hf-path"]),
        ("down", {}, ["failed to serve", "HTTP 503", "try again later"]),
        ("cut", {}, ["Downloading someone/a-model failed", "run again to resume"]),
        (
            "no network",
            {},
            ["the Hub cannot be reached", "check the connection", "--hf-path"],
        ),
        (
            "no network",
            {"HF_HUB_OFFLINE": "1"},
            ["downloads are off (HF_HUB_OFFLINE is set)", "--hf-path"],
        ),
    ],
)
def test_hub_failures_say_what_to_do(small_checkpoint, tmp_path, mode, env, phrases):
    hub = FakeHub(small_checkpoint, mode)
    url = hub.url
    if mode == "no network":
        hub.close()  # nothing listens there any more
    try:
        out = tmp_path / "out"
        result = _cli(
            "convert.py",
            "--hf-path",
            "someone/a-model",
            "--mlx-path",
            str(out),
            env=_hub_env(tmp_path, url, **env),
        )
    finally:
        if mode != "no network":
            hub.close()
    _refused(result, *phrases)
    assert TOKEN not in result.stdout + result.stderr
    assert set(hub.authorizations) <= {None if "HF_TOKEN" in env else f"Bearer {TOKEN}"}
    assert {p.name for p in tmp_path.iterdir()} <= {
        "hf home"
    }  # no output, not even a temporary one


def test_an_incomplete_offline_cache_is_named(small_checkpoint, tmp_path):
    """A cache that holds only the configs (txt2audio read them, then the network went
    away): the missing weights are named instead of a path inside the cache."""
    snapshot = tmp_path / "hub" / "models--someone--a-model" / "snapshots" / ("0" * 40)
    for file in ("model_config.json", "text_encoder/config.json"):
        (snapshot / file).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / file).write_bytes((small_checkpoint / file).read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    result = _cli(
        "txt2audio.py",
        "piano",
        "--model",
        "someone/a-model",
        "--output",
        str(tmp_path / "a.wav"),
        env=env,
    )
    _refused(
        result,
        "someone/a-model lacks model.safetensors (and 2 more of its files)",
        "not in the local cache",
    )
    assert not (tmp_path / "a.wav").exists()


def _edit_json(path: Path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set(path: tuple, value):
    def edit(config):
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


DIT = ("model", "diffusion", "config")
DECODER = ("model", "pretransform", "config", "decoder", "config")


@pytest.mark.parametrize(
    "damage, message, early",  # early: refused from the layout and configs, before any model is built
    [
        ("truncate model.safetensors", "model.safetensors is damaged (Tensor '", False),
        (
            "garbage model.safetensors",
            "model.safetensors is damaged (Invalid json header length",
            False,
        ),
        (
            "empty text_encoder/model.safetensors",
            "text_encoder/model.safetensors is damaged",
            False,
        ),
        (
            "delete text_encoder/model.safetensors",
            "lacks text_encoder/model.safetensors: copy or download it again",
            True,
        ),
        ("delete tokenizer/spiece.model", "lacks tokenizer/spiece.model", True),
        (
            "garbage tokenizer/spiece.model",
            "spiece.model is damaged: it is not a SentencePiece model",
            True,
        ),
        (
            "garbage model_config.json",
            "model_config.json is damaged: it is not valid JSON",
            True,
        ),
        (
            "list model_config.json",
            "model_config.json is damaged: it holds a JSON list",
            True,
        ),
        (
            "int32 tensor",
            (
                "Tensor model.safetensors: model.model.transformer.project_in.weight"
                " has dtype int32"
            ),
            False,
        ),
        (
            "float64 tensor",
            (
                "text_encoder/model.safetensors holds tensors of a type MLX cannot load"
                " (unsupported dtype F64)"
            ),
            False,
        ),
        (
            "NaN tensor",
            (
                "Tensor model.safetensors:"
                " model.model.transformer.layers.1.ff.ff.2.bias holds NaN or Inf"
            ),
            False,
        ),
        (
            "Inf weight_v",
            (
                "Tensor model.safetensors: pretransform.model.decoder.layers.0.weight_v"
                " holds NaN or Inf"
            ),
            False,
        ),
        (
            _set(DIT + ("embed_dim",), "256"),
            "Unsupported DiT embed_dim '256' (expected a positive int)",
            True,
        ),
        (_set(DIT + ("depth",), -2), "Unsupported DiT depth -2", True),
        (_set(DIT + ("depth",), 3), "no tensor for dit parameter layers.2", False),
        (
            _set(DIT + ("project_cond_tokens",), "yes"),
            "project_cond_tokens 'yes'",
            True,
        ),
        (_set(DECODER + ("final_tanh",), 1), "final_tanh 1", True),
        (_set(DECODER + ("c_mults",), "ab"), "c_mults='ab'", True),
        (
            _set(("model", "conditioning", "configs"), {"id": "prompt"}),
            "model_config.json or config.json holds a value we cannot read",
            True,
        ),
        (
            _set(("model", "conditioning", "configs", 1, "config", "max_val"), "512"),
            "seconds_start min_val, max_val (0, '512')",
            True,
        ),
        (_set(("model", "pretransform"), None), "pretransform type None", True),
        (
            _set(("model_type",), "diffusion_prior"),
            "Unsupported model_type 'diffusion_prior'",
            True,
        ),
        ("t5 vocab 50", "tokens, more than T5's vocab_size 50", True),
        (_set(("sample_size",), 10**11), "sample_size 100000000000 must be", True),
        (_set(("sample_size",), 7), "a multiple of the autoencoder's", True),
        (_set(("sample_rate",), 10**12), "sample_rate 1000000000000 is not in", True),
        (
            _set(("model", "conditioning", "configs", 2, "config", "max_val"), 1e9),
            "The seconds_total condition's range [0, 1000000000.0] is beyond",
            True,
        ),
    ],
)
def test_damaged_or_wrong_files_are_refused_by_name(
    small_checkpoint, tmp_path, monkeypatch, damage, message, early
):
    from safetensors.numpy import load_file

    folder = _copy_folder(small_checkpoint, tmp_path / "model")
    if callable(damage):
        _edit_json(folder / "model_config.json", damage)
    elif damage == "t5 vocab 50":
        _edit_json(folder / "text_encoder" / "config.json", _set(("vocab_size",), 50))
    elif damage.split()[0] in ("truncate", "garbage", "empty", "delete", "list"):
        how, file = damage.split()
        data = (folder / file).read_bytes()
        new = {
            "truncate": data[: len(data) // 2],
            "garbage": b"\x17" * 64,
            "empty": b"",
            "list": b"[1, 2]",
        }
        (
            (folder / file).unlink()
            if how == "delete"
            else (folder / file).write_bytes(new[how])
        )
    else:
        file = (
            "text_encoder/model.safetensors"
            if "float64" in damage
            else "model.safetensors"
        )
        tensors = load_file(str(folder / file))
        if damage == "int32 tensor":
            key = "model.model.transformer.project_in.weight"
            tensors[key] = tensors[key].astype(np.int32)
        elif damage == "float64 tensor":
            tensors["shared.weight"] = tensors["shared.weight"].astype(np.float64)
        elif damage == "NaN tensor":
            tensors["model.model.transformer.layers.1.ff.ff.2.bias"][3] = np.nan
        else:
            tensors["pretransform.model.decoder.layers.0.weight_v"][0, 0, 0] = np.inf
        save_file(tensors, str(folder / file))
    if early:
        monkeypatch.setattr(
            model_io, "build", lambda config: pytest.fail("built a model first")
        )
    with pytest.raises(ValueError, match=re.escape(message)):
        model_io.load(str(folder))


def test_converted_files_are_checked_too(small_converted, tmp_path):
    folder = _copy_folder(small_converted, tmp_path / "model")
    data = (folder / "dit.safetensors").read_bytes()
    (folder / "dit.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="dit.safetensors is damaged"):
        model_io.load(str(folder))
    (folder / "dit.safetensors").write_bytes(data)
    _edit_json(folder / "config.json", _set(("model_type",), "llama"))
    with pytest.raises(ValueError, match="not a config written by convert.py"):
        model_io.load(str(folder))
    (folder / "config.json").unlink()  # now a folder of neither layout
    with pytest.raises(ValueError, match="neither model_config.json"):
        model_io.load(str(folder))


def _pickled_checkpoint(small_checkpoint, folder: Path, payload=None) -> Path:
    """The small checkpoint with model.ckpt (a Lightning-style {"state_dict": ...}) in
    place of model.safetensors; `payload`, if given, is pickled beside the tensors."""
    import torch
    from safetensors.torch import load_file

    folder = _copy_folder(small_checkpoint, folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(
        {"state_dict": state, **({"extra": payload} if payload else {})},
        folder / "model.ckpt",
    )
    return folder


class _Exploit:
    """A pickle that, when loaded without weights_only, creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_only_when_asked(small_checkpoint, tmp_path):
    folder = _pickled_checkpoint(small_checkpoint, tmp_path / "ckpt model")
    out = tmp_path / "out"
    hide_torch = "sys.modules['torch'] = None"  # as on a machine without torch
    # the default reads only safetensors, and says how to read the pickle
    result = _cli(
        "convert.py",
        "--hf-path",
        str(folder),
        "--mlx-path",
        str(out),
        prelude=hide_torch,
    )
    _refused(
        result,
        "has no model.safetensors, only the pickled model.ckpt",
        "--allow-pickle",
    )
    result = _cli(
        "txt2audio.py",
        "piano",
        "--model",
        str(folder),
        "--output",
        str(tmp_path / "a.wav"),
        prelude=hide_torch,
    )
    _refused(result, "--allow-pickle")
    result = _cli(
        "convert.py",
        "--hf-path",
        str(folder),
        "--mlx-path",
        str(out),
        "--allow-pickle",
        prelude=hide_torch,
    )
    _refused(result, "needs torch")
    assert not out.exists()
    # with torch and the flag it converts, exactly as from model.safetensors
    result = _cli(
        "convert.py", "--hf-path", str(folder), "--mlx-path", str(out), "--allow-pickle"
    )
    assert result.returncode == 0, result.stderr
    # and from a Hub repo that holds only the pickle (fetched only with the flag)
    hub = FakeHub(folder)
    try:
        args = [
            "--hf-path",
            "someone/a-model",
            "--mlx-path",
            str(tmp_path / "from hub"),
        ]
        result = _cli("convert.py", *args, env=_hub_env(tmp_path, hub.url))
        _refused(result, "someone/a-model lacks model.safetensors")
        assert not (tmp_path / "from hub").exists()
        result = _cli(
            "convert.py", *args, "--allow-pickle", env=_hub_env(tmp_path, hub.url)
        )
        assert result.returncode == 0, result.stderr
    finally:
        hub.close()
    convert.convert(str(small_checkpoint), str(tmp_path / "reference"))
    for file in checkpoints.CONVERTED_FILES:
        assert (out / file).read_bytes() == (
            tmp_path / "reference" / file
        ).read_bytes(), file
        assert (tmp_path / "from hub" / file).read_bytes() == (
            out / file
        ).read_bytes(), file


def test_a_malicious_pickle_is_refused(small_checkpoint, tmp_path):
    import pickle

    marker = tmp_path / "exploited"
    pickle.loads(
        pickle.dumps(_Exploit(marker))
    )  # the payload works when unpickled freely
    assert marker.exists()
    marker.unlink()
    folder = _pickled_checkpoint(
        small_checkpoint, tmp_path / "model", payload=_Exploit(marker)
    )
    with pytest.raises(
        ValueError, match=r"model.ckpt was refused by torch.load\(weights_only=True\)"
    ):
        model_io.load(str(folder), read_pickle=convert.read_pickled)
    assert not marker.exists()


def test_convert_force_replaces_only_its_own_folders(small_checkpoint, tmp_path):
    out = tmp_path / "out"
    convert.convert(str(small_checkpoint), str(out), "float32")
    before = (out / "dit.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already exists.*--force"):
        convert.convert(str(small_checkpoint), str(out), "float16")
    assert (out / "dit.safetensors").read_bytes() == before
    convert.convert(str(small_checkpoint), str(out), "float16", force=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    (tmp_path / "empty").mkdir()
    convert.convert(str(small_checkpoint), str(tmp_path / "empty"), force=True)
    # a failed conversion over an old one keeps the old one
    with pytest.raises(ValueError, match="Unsupported quantization"):
        convert.convert(
            str(small_checkpoint),
            str(out),
            "float32",
            {"group_size": 64, "bits": 3},
            force=True,
        )
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine")
    for target, refusal in (
        ("notes", "holds files convert.py did not write \\(todo.txt\\)"),
        ("file.txt", "not a folder written by convert.py"),
        (str(small_checkpoint), "did not write \\(model.safetensors, model_config"),
    ):
        with pytest.raises(ValueError, match=refusal):
            convert.convert(str(small_checkpoint), str(tmp_path / target), force=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine" and (
        tmp_path / "file.txt"
    ).read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "empty",
        "file.txt",
        "notes",
        "out",
    ]


@pytest.mark.parametrize(
    "prefix, suffix, args, stage",
    [
        ("encoder.block.", "wo.weight", [], "Text encoding"),
        ("model.model.transformer.project_out.", "weight", [], "Sampling"),
        ("pretransform.model.decoder.", "weight_g", [], "Decoding"),
        (
            "pretransform.model.encoder.",
            "weight_g",
            ["--init-audio", "{audio}/stereo.flac"],
            "Audio encoding",
        ),
    ],
)
def test_numerical_faults_are_named_by_stage(
    small_checkpoint, audio_files, tmp_path, prefix, suffix, args, stage
):
    """Finite weights so large (1e38) that a stage overflows to Inf or NaN: the run names
    the stage and writes nothing."""
    from safetensors.numpy import load_file

    folder = _copy_folder(small_checkpoint, tmp_path / "model")
    file = folder / (
        "text_encoder/model.safetensors"
        if prefix.startswith("encoder.")
        else "model.safetensors"
    )
    tensors = load_file(str(file))
    for key in [k for k in tensors if k.startswith(prefix) and k.endswith(suffix)]:
        tensors[key] = np.full_like(tensors[key], 1e38)
    save_file(tensors, str(file))
    args = [a.replace("{audio}", str(audio_files)) for a in args]
    out = tmp_path / "out.wav"
    result = _cli(
        "txt2audio.py",
        "piano",
        "--model",
        str(folder),
        "--steps",
        "2",
        "--output",
        str(out),
        *args,
    )
    _refused(result, f"{stage} produced NaN or Inf values; nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

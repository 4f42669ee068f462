"""Fixtures and helpers shared by the test files.

The small random-weight checkpoints (in the released layout, converted, and loaded as
pipelines), audio and data files, runners of the scripts, and, for the parity tests, the
PyTorch reference (stable-audio-tools 0.0.20 and transformers) with checkpoints of
identical random weights. Test files import the helpers that are not fixtures with
`from conftest import ...`.
"""

import contextlib
import copy
import importlib.machinery
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import sentencepiece as spm
from safetensors.numpy import save_file

import convert
from stable_audio import StableAudio, model_io
from stable_audio.guidance import guide

HERE = Path(__file__).parent
DATA = HERE / "test_data"  # copies of the official release's config and key manifests
SAO1_CONFIG = json.loads((DATA / "sao1_model_config.json").read_text())
# Stable Audio Open Small's config, reconstructed from its published description
SAOS_CONFIG = json.loads((DATA / "saos_model_config.RECONSTRUCTED.json").read_text())
T5_BASE_CONFIG = json.loads((DATA / "t5_config.json").read_text())

# float32 parity bound on ||ours - reference|| / ||reference||, per module
PARITY_RTOL = 1e-5


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="session", autouse=True)
def _cache_folder(tmp_path_factory):
    """$STABLE_AUDIO_CACHE (the -xs SVD bases' cache) in a temporary folder for the
    whole session, for the scripts it runs too: nothing is written to the user's cache,
    and tests share the bases they compute."""
    before = os.environ.get("STABLE_AUDIO_CACHE")
    os.environ["STABLE_AUDIO_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        del os.environ["STABLE_AUDIO_CACHE"]
    else:
        os.environ["STABLE_AUDIO_CACHE"] = before


# ---------------------------------------------------------------- test checkpoints


def small_configs():
    """A small model of the same family: model_config.json and T5 config.json dicts. T5
    keeps t5-base's width, which the reference's T5 conditioner assumes; the DiT projects
    the context tokens, so its 4 heads need not match T5's 12."""
    config = copy.deepcopy(SAO1_CONFIG)
    config["sample_size"] = 8 * 64
    model = config["model"]
    model["io_channels"] = 8
    model["diffusion"]["config"].update(
        io_channels=8, embed_dim=256, depth=2, num_heads=4, project_cond_tokens=True
    )
    pretransform = model["pretransform"]["config"]
    pretransform.update(latent_dim=8, downsampling_ratio=8)
    for part, latent in (("encoder", 16), ("decoder", 8)):
        pretransform[part]["config"].update(
            channels=8, c_mults=[1, 2], strides=[2, 4], latent_dim=latent
        )
    t5 = dict(T5_BASE_CONFIG, vocab_size=512, d_ff=256, num_layers=2)
    return config, t5


def small_flow_configs():
    """A small model of the SAO Small family: rectified flow, qk LayerNorm, 2 heads of 128
    (RoPE on 64 dims), 64 T5 tokens, seconds_total only."""
    config, t5 = small_configs()
    model = config["model"]
    model["diffusion"].update(
        diffusion_objective="rf_denoiser",
        cross_attention_cond_ids=["prompt", "seconds_total"],
        global_cond_ids=["seconds_total"],
    )
    model["diffusion"]["config"].update(
        num_heads=2, global_cond_dim=768, attn_kwargs={"qk_norm": "ln"}
    )
    model["conditioning"]["configs"] = [
        {
            "id": "prompt",
            "type": "t5",
            "config": {"t5_model_name": "t5-base", "max_length": 64},
        },
        {
            "id": "seconds_total",
            "type": "number",
            "config": {"min_val": 0, "max_val": 256},
        },
    ]
    return config, t5


def released_layout(model_config: dict, t5_config: dict) -> dict:
    """{name: shape} of the released files (model.safetensors + text_encoder) for a config."""
    model = model_config["model"]
    d = model["diffusion"]["config"]
    dim, io, cond = d["embed_dim"], d["io_channels"], d["cond_token_dim"]
    ctx = dim if d.get("project_cond_tokens", True) else cond
    p = "model.model."
    keys = {
        p + "timestep_features.weight": (128, 1),
        p + "to_timestep_embed.0.weight": (dim, 256),
        p + "to_timestep_embed.0.bias": (dim,),
        p + "to_timestep_embed.2.weight": (dim, dim),
        p + "to_timestep_embed.2.bias": (dim,),
        p + "to_cond_embed.0.weight": (ctx, cond),
        p + "to_cond_embed.2.weight": (ctx, ctx),
        p + "to_global_embed.0.weight": (dim, d["global_cond_dim"]),
        p + "to_global_embed.2.weight": (dim, dim),
        p + "preprocess_conv.weight": (io, io, 1),
        p + "postprocess_conv.weight": (io, io, 1),
        p + "transformer.project_in.weight": (dim, io),
        p + "transformer.project_out.weight": (io, dim),
        p
        + "transformer.rotary_pos_emb.inv_freq": (
            max(dim // d["num_heads"] // 2, 32) // 2,
        ),
    }
    for i in range(d["depth"]):
        l = f"{p}transformer.layers.{i}."
        for norm in ("pre_norm", "cross_attend_norm", "ff_norm"):
            keys[l + norm + ".gamma"] = keys[l + norm + ".beta"] = (dim,)
        keys[l + "self_attn.to_qkv.weight"] = (3 * dim, dim)
        keys[l + "cross_attn.to_q.weight"] = (dim, dim)
        keys[l + "cross_attn.to_kv.weight"] = (2 * ctx, ctx)
        for attn in ("self_attn", "cross_attn"):
            keys[l + attn + ".to_out.weight"] = (dim, dim)
        if d.get("attn_kwargs", {}).get("qk_norm") == "ln":
            for name in (
                "self_attn.q_norm",
                "self_attn.k_norm",
                "cross_attn.q_norm",
                "cross_attn.k_norm",
            ):
                keys[l + name + ".weight"] = keys[l + name + ".bias"] = (
                    dim // d["num_heads"],
                )
        keys[l + "ff.ff.0.proj.weight"], keys[l + "ff.ff.0.proj.bias"] = (
            8 * dim,
            dim,
        ), (8 * dim,)
        keys[l + "ff.ff.2.weight"], keys[l + "ff.ff.2.bias"] = (dim, 4 * dim), (dim,)
    for c in model["conditioning"]["configs"]:
        if c["type"] == "number":
            e = f"conditioner.conditioners.{c['id']}.embedder.embedding."
            cd = model["conditioning"]["cond_dim"]
            keys.update(
                {
                    e + "0.weights": (128,),
                    e + "1.weight": (cd, 257),
                    e + "1.bias": (cd,),
                }
            )

    def conv(name, c_out, c_in, k, bias=True, transposed=False):
        keys[name + ".weight_g"] = (c_in if transposed else c_out, 1, 1)
        keys[name + ".weight_v"] = (c_in, c_out, k) if transposed else (c_out, c_in, k)
        if bias:
            keys[name + ".bias"] = (c_out,)

    def snake(name, c):
        keys[name + ".alpha"] = keys[name + ".beta"] = (c,)

    def residual_units(name, c, first):
        for j in range(3):
            u = f"{name}.layers.{first + j}.layers"
            snake(u + ".0", c), conv(u + ".1", c, c, 7), snake(u + ".2", c), conv(
                u + ".3", c, c, 1
            )

    vae = model["pretransform"]["config"]
    e, dc = vae["encoder"]["config"], vae["decoder"]["config"]
    w = [e["channels"] * m for m in [1] + e["c_mults"]]
    v = "pretransform.model."
    conv(v + "encoder.layers.0", w[0], e["in_channels"], 7)
    for i, s in enumerate(e["strides"]):
        b = f"{v}encoder.layers.{i + 1}"
        residual_units(b, w[i], 0), snake(b + ".layers.3", w[i])
        conv(b + ".layers.4", w[i + 1], w[i], 2 * s)
    snake(f"{v}encoder.layers.{len(w)}", w[-1])
    conv(f"{v}encoder.layers.{len(w) + 1}", e["latent_dim"], w[-1], 3)
    conv(v + "decoder.layers.0", w[-1], dc["latent_dim"], 7)
    for n, i in enumerate(reversed(range(len(dc["strides"])))):
        b = f"{v}decoder.layers.{n + 1}"
        snake(b + ".layers.0", w[i + 1])
        conv(b + ".layers.1", w[i], w[i + 1], 2 * dc["strides"][i], transposed=True)
        residual_units(b, w[i], 2)
    snake(f"{v}decoder.layers.{len(w)}", w[0])
    conv(f"{v}decoder.layers.{len(w) + 1}", dc["out_channels"], w[0], 7, bias=False)

    t = t5_config
    inner = t["num_heads"] * t["d_kv"]
    keys["shared.weight"] = (t["vocab_size"], t["d_model"])
    keys["encoder.final_layer_norm.weight"] = (t["d_model"],)
    keys["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        t["relative_attention_num_buckets"],
        t["num_heads"],
    )
    for i in range(t["num_layers"]):
        b = f"encoder.block.{i}.layer."
        for proj in "qkv":
            keys[f"{b}0.SelfAttention.{proj}.weight"] = (inner, t["d_model"])
        keys[f"{b}0.SelfAttention.o.weight"] = (t["d_model"], inner)
        keys[f"{b}0.layer_norm.weight"] = keys[f"{b}1.layer_norm.weight"] = (
            t["d_model"],
        )
        keys[f"{b}1.DenseReluDense.wi.weight"] = (t["d_ff"], t["d_model"])
        keys[f"{b}1.DenseReluDense.wo.weight"] = (t["d_model"], t["d_ff"])
    return keys


def random_tensor(rng, name: str, shape) -> np.ndarray:
    """Random weights of a sensible scale; every tensor differs from its initial value."""
    if name.endswith("inv_freq"):  # a constant of the architecture, not a weight
        dims = 2 * shape[0]
        return (1.0 / 10000 ** (np.arange(0, dims, 2) / dims)).astype(np.float32)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 4
    x = rng.standard_normal(shape) / math.sqrt(fan_in)
    if name.endswith("weight_g"):
        # Positive gains below 1, as in a trained VAE. With unit-scale gains the 15 residual
        # units amplify rounding chaotically: PyTorch alone then differs by 5e-3 between
        # float32 and float64; with these, by 1e-6.
        x = 0.5 * np.abs(x)
    return x.astype(np.float32)


def write_released(
    folder: Path, model_config, t5_config, spiece: Path, sao=None, t5=None, seed=0
):
    """A checkpoint folder in the released file layout; random tensors unless given."""
    rng = np.random.default_rng(seed)
    layout = released_layout(model_config, t5_config)
    if sao is None or t5 is None:
        tensors = {k: random_tensor(rng, k, s) for k, s in layout.items()}
        sao = {
            k: v
            for k, v in tensors.items()
            if k.startswith(("model.", "conditioner.", "pretransform."))
        }
        t5 = {k: v for k, v in tensors.items() if k not in sao}
    (folder / "text_encoder").mkdir(parents=True)
    (folder / "tokenizer").mkdir()
    (folder / "model_config.json").write_text(json.dumps(model_config, indent=4))
    (folder / "text_encoder" / "config.json").write_text(
        json.dumps(t5_config, indent=2)
    )
    (folder / "tokenizer" / "spiece.model").write_bytes(spiece.read_bytes())
    save_file(sao, str(folder / "model.safetensors"))
    save_file(t5, str(folder / "text_encoder" / "model.safetensors"))
    return folder


WORDS = (
    "ambient drum bass piano guitar synth techno house loop beat kick snare hat chord"
    " melody warm deep bright dark slow fast bpm 120 128 174 orchestral strings violin"
    " cello brass choir rain thunder birds forest city night jazz funk soul hip hop"
    " lofi vinyl crackle reverb delay distorted clean acoustic electric sub wobble"
    " riser"
).split()


@pytest.fixture(scope="session")
def spiece(tmp_path_factory) -> Path:
    """A small SentencePiece model with T5's special ids: <pad>=0, </s>=1, <unk>=2."""
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(2000)]
    path = tmp_path_factory.mktemp("spiece") / "spiece.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=f,
            vocab_size=200,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    return path


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory, spiece) -> Path:
    model_config, t5_config = small_configs()
    return write_released(
        tmp_path_factory.mktemp("small") / "released", model_config, t5_config, spiece
    )


@pytest.fixture(scope="session")
def small_pipe(small_checkpoint):
    return StableAudio.from_pretrained(str(small_checkpoint), dtype=mx.float32)


@pytest.fixture(scope="session")
def small_flow_pipe(spiece, tmp_path_factory):
    folder = write_released(
        tmp_path_factory.mktemp("flow") / "released", *small_flow_configs(), spiece
    )
    return StableAudio.from_pretrained(str(folder), dtype=mx.float32)


@pytest.fixture(scope="session")
def small_converted(small_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "mlx_model"
    convert.convert(str(small_checkpoint), str(out), "float32")
    return out


# ---------------------------------------------------------------- audio files and running the scripts


@pytest.fixture(scope="session")
def audio_files(tmp_path_factory):
    import soundfile as sf

    folder = tmp_path_factory.mktemp("audio files")  # a space in the path
    rng = np.random.default_rng(5)
    sf.write(
        folder / "mono 48k.wav",
        (rng.standard_normal(960) * 0.3).astype(np.float32),
        48000,
    )
    sf.write(
        folder / "stereo.flac",
        (rng.standard_normal((600, 2)) * 0.3).astype(np.float32),
        44100,
    )
    (folder / "broken.wav").write_bytes(b"RIFF, but not audio")
    return folder


@pytest.fixture(scope="session")
def tone_data(tmp_path_factory):
    """Two pitches, captioned "low tone" and "high tone", two files each (stereo and mono,
    at two rates), long enough for several of the small model's windows."""
    import soundfile as sf

    folder = tmp_path_factory.mktemp("tones")
    for i, (name, hz) in enumerate([("low", 220), ("high", 1760)] * 2):
        rate = (44100, 22050)[i // 2]
        tone = 0.5 * np.sin(2 * np.pi * hz * np.arange(rate // 10) / rate).astype(
            np.float32
        )
        sf.write(
            folder / f"{name}{i}.wav",
            tone if i // 2 else np.stack([tone, 0.8 * tone], 1),
            rate,
        )
        (folder / f"{name}{i}.txt").write_text(f"{name} tone")
    return folder


def _copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _txt2audio(*args):
    return subprocess.run(
        [sys.executable, str(HERE / "txt2audio.py"), *args],
        capture_output=True,
        text=True,
    )


def _script(script: str, *args, prelude="pass") -> list:
    """The command that runs one of our scripts as a user would, `prelude` first (to
    hide torch, say)."""
    code = (
        f"import os, runpy, sys; {prelude}; sys.argv = sys.argv[1:]; sys.path.insert(0,"
        " os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0],"
        " run_name='__main__')"
    )
    return [sys.executable, "-c", code, str(HERE / script), *map(str, args)]


def _cli(script: str, *args, env=None, cwd=None, prelude="pass"):
    """Run one of our scripts as a user would, to its end."""
    return subprocess.run(
        _script(script, *args, prelude=prelude),
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )


def _launch(script: str, *args, processes: int = 2):
    """Run one of our scripts under mlx.launch: `processes` processes of the ring
    backend over loopback, to their end."""
    launch = shutil.which(
        "mlx.launch", path=str(Path(sys.executable).parent)
    ) or shutil.which("mlx.launch")
    with socket.socket() as s:  # a free port for the ring
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [launch, "-n", str(processes), "--backend", "ring"]
    command += ["--starting-port", str(port), sys.executable, str(HERE / script)]
    return subprocess.run(
        command + list(map(str, args)), capture_output=True, text=True, timeout=600
    )


def _refused(result, *phrases):
    """A run that failed as a user must see it: non-zero, one error line, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in last, last
    return last


@contextlib.contextmanager
def full_disk(tmp_path):
    """A folder on a full 1 MiB tmpfs where the tests may mount one; else None (then a
    test simulates the failures a full disk gives)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = (
        sys.platform == "linux"
        and shutil.which("mount")
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        if mounted:
            with contextlib.suppress(OSError), open(folder / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def _main(module, argv: list) -> str:
    """Run a script's main() in this process; returns "" on success, else its exit message,
    which must be one line beginning "error: ". Any other exception would be a traceback.
    """
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(
        io.StringIO()
    ):
        try:
            module.main(argv)
        except SystemExit as e:
            if e.code in (None, 0):
                return ""
            assert (
                isinstance(e.code, str)
                and e.code.startswith("error: ")
                and "\n" not in e.code
            ), e.code
            return e.code
    return ""


def _listing(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
    }


# ---------------------------------------------------------------- tier 2: the PyTorch reference


class _Stub(types.ModuleType):
    """An importable module whose every attribute refuses to be used."""

    def __init__(self, name):
        super().__init__(name)
        self.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is a test stand-in")

        return unavailable


@pytest.fixture(scope="session")
def reference():
    """stable-audio-tools 0.0.20 (k-diffusion vendored in it) and transformers. Its imports
    of torchaudio (whose wheel does not load with this torch), pytorch_lightning (imported
    by its LoRA callbacks) and pywt (wavelet pretransforms) are never used on the
    text-to-audio path, so import-only stand-ins replace them."""
    import torch
    import transformers

    for name in (
        "torchaudio",
        "torchaudio.transforms",
        "pywt",
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
    ):
        sys.modules.setdefault(name, _Stub(name))
    lightning = sys.modules[
        "pytorch_lightning"
    ]  # its callbacks are subclassed at import
    lightning.callbacks = sys.modules["pytorch_lightning.callbacks"]
    lightning.Callback = lightning.callbacks.ModelCheckpoint = type(
        "Unavailable", (), {}
    )
    from stable_audio_tools.models.factory import create_model_from_config

    torch.set_num_threads(2)
    return types.SimpleNamespace(
        torch=torch, transformers=transformers, create=create_model_from_config
    )


@contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def reference_checkpoint(
    reference, spiece, folder: Path, model_config, t5_config, seed=0
):
    """The reference model for a config with every tensor re-randomized (several are
    zero-initialised), written in the released layout and loaded by our loader."""
    torch, tf = reference.torch, reference.transformers
    torch.manual_seed(seed)
    t5 = tf.T5EncoderModel(tf.T5Config(**t5_config)).eval()
    tokenizer = tf.T5Tokenizer.from_pretrained(
        str(spiece.parent), legacy=True
    )  # converted from spiece.model
    # the reference downloads t5-base; hand it ours instead
    with _patched(tf.T5EncoderModel, "from_pretrained", lambda *a, **k: t5), _patched(
        tf.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer
    ):
        model = reference.create(model_config).eval()
    t5.float()  # the reference casts T5 to float16; compare in float32
    rng = np.random.default_rng(seed + 1)
    with torch.no_grad():
        for module in (model, t5):
            for name, tensor in module.state_dict(keep_vars=True).items():
                if not name.endswith(
                    "encoder.embed_tokens.weight"
                ):  # tied to shared.weight
                    tensor.copy_(
                        torch.from_numpy(random_tensor(rng, name, tuple(tensor.shape)))
                    )
    sao_tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    t5_tensors = {
        k: v.numpy()
        for k, v in t5.state_dict().items()
        if k != "encoder.embed_tokens.weight"
    }
    write_released(
        folder, model_config, t5_config, spiece, sao=sao_tensors, t5=t5_tensors
    )
    del sao_tensors, t5_tensors
    ours = model_io.load(str(folder), dtype=mx.float32)
    return types.SimpleNamespace(
        model=model, t5=t5, tokenizer=tokenizer, ours=ours, folder=folder
    )


@pytest.fixture(scope="session")
def sao(reference, spiece, tmp_path_factory):
    """The full Stable Audio Open 1.0 config."""
    folder = tmp_path_factory.mktemp("sao1") / "released"
    yield reference_checkpoint(reference, spiece, folder, SAO1_CONFIG, T5_BASE_CONFIG)
    shutil.rmtree(folder)  # 5 GB, not kept even when a test failed


@pytest.fixture(scope="session")
def small(reference, spiece, tmp_path_factory):
    folder = tmp_path_factory.mktemp("small_ref") / "released"
    return reference_checkpoint(reference, spiece, folder, *small_configs(), seed=10)


@pytest.fixture(scope="session")
def small_flow(reference, spiece, tmp_path_factory):
    folder = tmp_path_factory.mktemp("small_flow_ref") / "released"
    return reference_checkpoint(
        reference, spiece, folder, *small_flow_configs(), seed=20
    )


PROMPTS = [
    "warm piano loop 120 bpm",
    "",
    "deep techno kick with rain and thunder at night",
]
NEGATIVE = ["distorted crackle", "low quality", "vinyl"]


def _reference_conditioning(sao, prompts, starts, totals, negative=False):
    meta = [
        {"prompt": p, "seconds_start": s, "seconds_total": t}
        for p, s, t in zip(prompts, starts, totals)
    ]
    with sys.modules["torch"].no_grad():
        tensors = sao.model.conditioner(meta, "cpu")
        return sao.model.get_conditioning_inputs(tensors, negative=negative)


def _our_conditioning(sao, prompts, starts, totals):
    ours = sao.ours
    tokens, mask = ours.tokenizer(prompts)
    return ours.conditioner(
        ours.t5(tokens, mask), mask, seconds_start=starts, seconds_total=totals
    )


def _noise_source(torch, shape, n, seed):
    """Per-step N(0, 1) draws, replayed identically to both sides."""
    gen = torch.Generator().manual_seed(seed)
    draws = [torch.randn(shape, generator=gen) for _ in range(n)]
    theirs, ours = iter(draws), iter(draws)
    to_mlx = lambda t: mx.array(t.numpy()).transpose(0, 2, 1)
    return (lambda s, s_next: next(theirs)), (lambda s, s_next: to_mlx(next(ours)))


# Every kind of layer an adapter changes, but 2 of the 24 blocks: for the tests whose
# cost grows with the layers (SVDs, dense weights formed on both sides)
SOME_LAYERS = [
    "layers.[0-1].",
    "to_timestep_embed",
    "to_cond_embed",
    "to_global_embed",
    "preprocess_conv",
    "postprocess_conv",
    "project_",
    "seconds_",
]


def _reference_layers(model) -> dict:
    """{name: (weight as an (out, in) matrix)} of every layer stable-audio-tools 0.0.20
    adapts (each Linear and Conv1d of the DiT wrapper and of the conditioner), named as
    its adapter files name them. Read from the reference model, not from our code."""
    nn = sys.modules["torch"].nn
    layers = {}
    for root in (model.model, model.conditioner):
        for name, module in root.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                w = (
                    module.parametrizations.weight.original
                    if hasattr(module, "parametrizations")
                    else module.weight
                )
                layers[name] = w.detach().reshape(w.shape[0], -1).numpy()
    return layers


def _our_bases(model, path: Path, rank: int, include=None) -> Path:
    """Our -xs bases of the reference `model`'s layers (those matching `include`, None:
    all), as 0.0.20's svd_bases_path file: the reference then uses the bases ours
    computes (two float32 SVDs, LAPACK's and PyTorch's, differ by about 1e-5 where
    singular values are close: 5e-5 to 8e-5 on the DiT's output at cfg 1; the SVD itself
    is test_svd_bases_...'s)."""
    from stable_audio import bases
    from stable_audio.lora import matches

    torch = sys.modules["torch"]
    found = {}
    for name, w in _reference_layers(model).items():
        if include is None or matches(name, include):
            u, v = bases.cached_bases(mx.array(w), rank)
            root = "conditioner." if name.startswith("conditioners.") else "model."
            found[f"{root}{name}.weight"] = {
                "U": torch.from_numpy(np.array(u)),
                "V": torch.from_numpy(np.array(v)),
            }
    torch.save(found, path)
    return path


@contextmanager
def _with_adapters(ref, entries, svd_bases=None):
    """The reference (load_and_apply_loras, strengths as its gradio sets them) and our
    model (lora.apply_adapter) with the adapters `entries` = [(file, strength, interval,
    layer_filter)], both restored afterwards; `svd_bases`, a .pt file of -xs bases for
    the reference (its svd_bases_path)."""
    from stable_audio_tools.models.lora import load_and_apply_loras, set_lora_strength
    from torch.nn.utils import parametrize

    from stable_audio import lora

    ours = ref.ours
    saved = (
        ours.dit.leaf_modules(),
        ours.dit.parameters(),
        ours.conditioner.parameters(),
    )
    try:
        load_and_apply_loras(
            ref.model, [str(e[0]) for e in entries], "diffusion_cond", svd_bases
        )
        for i, (_, strength, *_) in enumerate(entries):
            set_lora_strength(ref.model.model, strength, i)
            set_lora_strength(ref.model.conditioner, strength, i)
        for path, strength, interval, layer_filter in entries:
            adapter = lora.read_adapter(path, ours.dit, ours.conditioner)
            lora.apply_adapter(
                ours.dit, ours.conditioner, adapter, strength, interval, layer_filter
            )
        yield [
            {
                "lora_index": i,
                "interval": interval or (0, 1),
                "layer_filter": layer_filter,
            }
            for i, (_, _, interval, layer_filter) in enumerate(entries)
        ]
    finally:
        for root in (
            ref.model.model,
            ref.model.conditioner,
        ):  # 0.0.20's remove_lora fails on its own dict
            for module in root.modules():
                if parametrize.is_parametrized(module, "weight"):
                    parametrize.remove_parametrizations(
                        module, "weight", leave_parametrized=False
                    )
        ours.dit.update_modules(saved[0])
        ours.dit.update(saved[1])
        ours.conditioner.update(saved[2])
        ours.dit.gated_adapters = False
        ours.dit.merged_adapters = ours.conditioner.merged_adapters = set()


def _adapted_dit_error(ref, cfg_scale, lora_configs=None) -> tuple:
    """Our DiT against the reference's on the same inputs, each side conditioned by its
    own (adapted) conditioner: the relative error, and the reference's output."""
    torch = sys.modules["torch"]
    starts, totals = [0, 12.5], [47, 30]
    cond = _reference_conditioning(ref, PROMPTS[:2], starts, totals)
    cross, global_cond = _our_conditioning(ref, PROMPTS[:2], starts, totals)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, ref.ours.config.dit.io_channels, 32, generator=gen)
    t = torch.rand(2, generator=gen)
    with torch.no_grad():
        expected = ref.model.model(
            x,
            t,
            cross_attn_cond=cond["cross_attn_cond"],
            cross_attn_mask=cond["cross_attn_mask"],
            global_cond=cond["global_cond"],
            cfg_scale=cfg_scale,
            apg_scale=0.0,
            lora_configs=lora_configs,
        )
    dit = ref.ours.dit
    v, _ = guide(
        dit,
        mx.array(x.numpy()).transpose(0, 2, 1),
        mx.array(t.numpy()),
        dit.prepare_conditioning(cross, global_cond),
        cfg_scale,
    )
    return rel_err(v.transpose(0, 2, 1), expected), expected

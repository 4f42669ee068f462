"""LoRA adapters. Without PyTorch: merged by convert.py against kept beside the weights
(and quantized), the options of txt2audio.py, and damaged adapter files refused by name.
Tier 2: each adapter type, stacked and interval-gated adapters on the full-width model, and
the layer patterns, against stable-audio-tools 0.0.20."""

import json
import math
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import convert
from conftest import (
    NEGATIVE,
    PARITY_RTOL,
    PROMPTS,
    SOME_LAYERS,
    _adapted_dit_error,
    _listing,
    _main,
    _noise_source,
    _our_bases,
    _patched,
    _reference_layers,
    _with_adapters,
    rel_err,
)
from stable_audio import StableAudio, bases, lora
from stable_audio import pipeline as pipeline_module
from stable_audio.guidance import guide

# ---------------------------------------------------------------- LoRA adapters, without PyTorch


def _our_adapter(
    model,
    path: Path,
    kind="lora",
    rank=4,
    alpha=4,
    seed=0,
    include=None,
    exclude=None,
    edit=None,
) -> Path:
    """A random adapter file for our model (a Components or a pipeline), by our writer,
    on the layers that `include`/`exclude` pick; `edit(layers, lora_config)` may damage it.
    """
    from stable_audio import lora

    rng = np.random.default_rng(seed)
    shapes = {
        c: dict(tree_flatten(getattr(model, c).parameters()))
        for c in ("dit", "conditioner")
    }
    layers = {}
    for name, (component, module) in lora.official_layers(
        len(model.dit.layers), model.conditioner.numbers
    ).items():
        if (include is not None and not lora.matches(name, include)) or (
            exclude is not None and lora.matches(name, exclude)
        ):
            continue
        w = shapes[component][f"{module}.weight"]
        out_dim, in_dim = w.shape[0], math.prod(w.shape[1:])
        layers[name] = {
            "lora_A": mx.array(
                rng.uniform(-1, 1, (rank, in_dim)) / math.sqrt(in_dim), dtype=mx.float32
            ),
            "lora_B": mx.array(
                rng.standard_normal((out_dim, rank)) * 0.05, dtype=mx.float32
            ),
        }
        if kind.endswith("-xs"):
            m = rng.standard_normal((rank, rank)) * 0.05
            layers[name] = {"M_xs": mx.array(m, dtype=mx.float32)}
        w2d = w.astype(mx.float32).reshape(out_dim, -1)
        rows, cols = mx.linalg.norm(w2d, axis=1), mx.linalg.norm(w2d, axis=0)
        for tensor, norms in (
            ("magnitude", cols if kind.startswith("dora-cols") else rows),
            ("magnitude_r", rows),
            ("magnitude_c", cols),
        ):
            if tensor in lora.TENSORS[kind]:
                factors = rng.uniform(0.5, 1.5, norms.shape[0])
                layers[name][tensor] = norms * mx.array(factors, dtype=mx.float32)
    lora_config = {"rank": rank, "alpha": alpha, "adapter_type": kind}
    lora_config.update(
        {k: v for k, v in (("include", include), ("exclude", exclude)) if v is not None}
    )
    if edit is not None:
        edit(layers, lora_config)
    lora.save_adapter(path, layers, lora_config)
    return path


def _guided(model, cfg_scale=7.0) -> mx.array:
    """A model's guided DiT output on fixed inputs, conditioned by its own conditioner."""
    pipe = model if isinstance(model, StableAudio) else StableAudio(model)
    cond = pipe.condition(PROMPTS[0], NEGATIVE[0], seconds_start=1, seconds_total=0.01)
    x, t = mx.random.normal((1, 16, 8), key=mx.random.key(1)), mx.array([0.4])
    return guide(pipe.dit, x, t, pipe.dit.prepare_conditioning(*cond), cfg_scale)[0]


@pytest.mark.parametrize("kinds", [("lora", "dora-rows"), ("dora-cols-xs", "bora")])
def test_lora_merged_unmerged_and_quantized(small_checkpoint, tmp_path, kinds):
    """convert.py --lora (merged) against the same adapters kept beside the weights (as
    interval-gated ones are; the interval holds the noise level of t = 0.4), one adapter
    over another (a DoRA over a LoRA; a BoRA over a DoRA-cols-XS); then merged and
    quantized to 8 bits, and kept beside 8-bit layers, each within the error 8 bits give
    the plain model."""
    from stable_audio import lora

    plain = StableAudio.from_pretrained(str(small_checkpoint), dtype=mx.float32)
    first = _our_adapter(plain, tmp_path / "first.safetensors", kinds[0], 4, 8, seed=1)
    second = _our_adapter(
        plain,
        tmp_path / "second.safetensors",
        kinds[1],
        2,
        2,
        seed=2,
        include=["layers.1.", "to_global_embed", "seconds_total"],
        exclude=["to_kv"],
    )
    loras = [(str(first), 0.7), (str(second), 1.3)]
    convert.convert(
        str(small_checkpoint), str(tmp_path / "merged"), "float32", loras=loras
    )
    stored = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert [
        (e["file"], e["adapter_type"], e["rank"], e["alpha"], e["strength"])
        for e in stored["loras_merged"]
    ] == [
        ("first.safetensors", kinds[0], 4, 8, 0.7),
        ("second.safetensors", kinds[1], 2, 2, 1.3),
    ]
    merged = _guided(StableAudio.from_pretrained(str(tmp_path / "merged")))

    unmerged = StableAudio.from_pretrained(str(small_checkpoint), dtype=mx.float32)
    for path, strength in loras:
        unmerged.load_lora(path, strength, interval=(0.5, 1.0))
    ff = unmerged.dit.layers[1].ff.proj
    assert (
        isinstance(ff, lora.LoRALinear)
        and isinstance(ff.base, lora.LoRALinear)
        and type(ff.base.base) is nn.Linear
    )
    err = rel_err(_guided(unmerged), merged)
    print(f"{' + '.join(kinds)} merged vs beside the weights: rel. error {err:.2e}")
    assert err < PARITY_RTOL
    assert rel_err(merged, _guided(plain)) > 0.1  # the adapters matter
    off = StableAudio.from_pretrained(str(small_checkpoint), dtype=mx.float32)
    for (
        path,
        strength,
    ) in loras:  # outside its interval an adapter is absent (the conditioner's stays)
        off.load_lora(path, strength, interval=(0.6, 1.0))
    with_conditioner = StableAudio.from_pretrained(
        str(small_checkpoint), dtype=mx.float32
    )
    for path, strength in loras:
        with_conditioner.load_lora(
            path, strength, layer_filter="transformer, to_,conv"
        )  # every DiT layer filtered out
    assert rel_err(_guided(off), _guided(with_conditioner)) < PARITY_RTOL

    q8 = {"group_size": 64, "bits": 8}
    convert.convert(str(small_checkpoint), str(tmp_path / "plain_q8"), "float32", q8)
    bound = rel_err(
        _guided(StableAudio.from_pretrained(str(tmp_path / "plain_q8"))), _guided(plain)
    )
    convert.convert(
        str(small_checkpoint), str(tmp_path / "merged_q8"), "float32", q8, loras=loras
    )
    merged_q8 = rel_err(
        _guided(StableAudio.from_pretrained(str(tmp_path / "merged_q8"))), merged
    )
    beside_q8 = StableAudio.from_pretrained(str(tmp_path / "plain_q8"))
    for path, strength in loras:
        beside_q8.load_lora(path, strength)
    assert isinstance(beside_q8.dit.layers[1].ff.proj.base.base, nn.QuantizedLinear)
    assert (
        type(beside_q8.dit.project_in) is nn.Linear
    )  # float layers take the adapter in
    beside = rel_err(_guided(beside_q8), merged)
    print(
        f"8 bits: plain {bound:.2e}, merged {merged_q8:.2e}, adapters beside 8-bit"
        f" layers {beside:.2e}"
    )
    assert 0 < merged_q8 < 1.5 * bound and 0 < beside < 1.5 * bound


def test_lora_options_through_txt2audio(small_converted, small_checkpoint, tmp_path):
    """--lora FILE:STRENGTH (twice), --lora-interval and --lora-layer-filter reach the
    pipeline, and the result is that of the API with the same settings."""
    import soundfile as sf

    import txt2audio

    plain = StableAudio.from_pretrained(str(small_converted))
    adapter = _our_adapter(
        plain, tmp_path / "style.safetensors", "dora-rows", 4, 4, seed=3
    )
    common = [
        "warm pads",
        "--model",
        str(small_converted),
        "--steps",
        "3",
        "--seconds-total",
        "0.01",
        "--seed",
        "5",
        "--raw",
    ]
    lora_args = [
        "--lora",
        f"{adapter}:0.6",
        "--lora",
        str(adapter),
        "--lora-interval",
        "0.2:0.9",
        "--lora-interval",
        "0:1",
        "--lora-layer-filter",
        "transformer.layers.[0-0].,to_cond_embed",
    ]
    assert (
        _main(txt2audio, [*common, "--output", str(tmp_path / "a.wav"), *lora_args])
        == ""
    )
    assert _main(txt2audio, [*common, "--output", str(tmp_path / "plain.wav")]) == ""
    pipe = StableAudio.from_pretrained(str(small_converted))
    pipe.load_lora(adapter, 0.6, (0.2, 0.9), "transformer.layers.[0-0].,to_cond_embed")
    pipe.load_lora(adapter, 1.0, (0.0, 1.0), "transformer.layers.[0-0].,to_cond_embed")
    expected = np.array(
        pipe.generate("warm pads", steps=3, seconds_total=0.01, seed=5)
    )[0].T
    written, plain_audio = (
        sf.read(tmp_path / "a.wav")[0],
        sf.read(tmp_path / "plain.wav")[0],
    )
    assert np.abs(written - expected).max() < 1e-6
    assert np.abs(written - plain_audio).max() > 1e-3


def _damage_adapter(kind: str):
    """(edit of the layers and lora_config, or of the written file) for each damage."""

    def drop_b(layers, config):
        del layers["model.transformer.layers.1.cross_attn.to_out"]["lora_B"]

    def wrong_rank(layers, config):
        a = layers["model.to_cond_embed.2"]["lora_A"]
        layers["model.to_cond_embed.2"]["lora_A"] = a[:2]

    def another_model(layers, config):
        layers["model.transformer.layers.7.self_attn.to_qkv"] = layers[
            "model.transformer.layers.0.self_attn.to_qkv"
        ]

    def unknown(layers, config):
        layers["model.transformer.layers.0.self_attn.to_qkv"]["lora_C"] = layers[
            "model.transformer.layers.0.self_attn.to_qkv"
        ]["lora_A"]

    def excluded(layers, config):
        config["exclude"] = ["self_attn.to_out"]

    def nan(layers, config):
        layers["model.preprocess_conv"]["lora_B"] = layers["model.preprocess_conv"][
            "lora_B"
        ] * float("nan")

    def settings(**changes):
        return lambda layers, config: config.update(changes)

    def bora_without_c(layers, config):
        config["adapter_type"] = "bora"
        for tensors in layers.values():
            tensors["magnitude_r"] = mx.ones(tensors["lora_B"].shape[0])

    def xs(rank, odd=None):
        def edit(layers, config):
            config.update(adapter_type="lora-xs", rank=rank)
            for name, tensors in layers.items():
                tensors.clear()
                tensors["M_xs"] = mx.zeros((rank + (name == odd), rank))

        return edit

    return {
        "missing tensor": (
            drop_b,
            (
                "has no tensor"
                " model.transformer.layers.1.cross_attn.to_out.parametrizations.weight.0.lora_B"
            ),
        ),
        "wrong rank": (
            wrong_rank,
            (
                "tensor model.to_cond_embed.2.parametrizations.weight.0.lora_A has"
                " shape (2, 256)"
            ),
        ),
        "another model": (
            another_model,
            "unexpected tensor model.transformer.layers.7.self_attn.to_qkv",
        ),
        "unknown key": (
            unknown,
            (
                "unexpected tensor"
                " model.transformer.layers.0.self_attn.to_qkv.parametrizations.weight.0.lora_C"
            ),
        ),
        "excluded layer": (excluded, "include/exclude leave out"),
        "NaN": (
            nan,
            "model.preprocess_conv.parametrizations.weight.0.lora_B holds NaN",
        ),
        "bora without magnitude_c": (
            bora_without_c,
            "has no tensor model.to_timestep_embed.0.parametrizations.weight.0"
            ".magnitude_c",
        ),
        "M_xs of the wrong size": (
            xs(4, "model.to_cond_embed.2"),
            "tensor model.to_cond_embed.2.parametrizations.weight.0.M_xs has shape"
            " (5, 4); this model, at the file's rank 4, expects (4, 4)",
        ),
        "an -xs rank beyond a layer": (
            xs(9),
            "M_xs is of rank 9, beyond the smaller side of its 8 x 256 layer",
        ),
        "unknown type": (settings(adapter_type="loha"), "unknown adapter_type 'loha'"),
        "rank": (settings(rank=0), "rank 0 is not a positive integer"),
        "include": (settings(include="layers"), "include is not a list of strings"),
    }[kind]


@pytest.mark.parametrize(
    "damage",
    [
        "missing tensor",
        "wrong rank",
        "another model",
        "unknown key",
        "excluded layer",
        "NaN",
        "bora without magnitude_c",
        "M_xs of the wrong size",
        "an -xs rank beyond a layer",
        "unknown type",
        "rank",
        "include",
        "not JSON",
        "truncated",
        "pickle",
        "absent",
    ],
)
def test_bad_adapter_files_are_refused_by_name(
    small_converted, small_checkpoint, tmp_path, damage
):
    """Each damage: one line naming the file and the key, from txt2audio.py and from
    convert.py, and nothing written."""
    import txt2audio

    files = tmp_path / "files"
    files.mkdir()
    path = files / "style.safetensors"
    model = StableAudio.from_pretrained(str(small_converted))
    if damage in ("not JSON", "truncated"):
        _our_adapter(model, path)
        data = path.read_bytes()
        if damage == "truncated":
            path.write_bytes(data[: len(data) // 2])
        else:
            header = data[8 : 8 + int.from_bytes(data[:8], "little")].replace(
                b'{\\"rank', b'{\\"ran\\"k'
            )
            path.write_bytes(
                len(header).to_bytes(8, "little")
                + header
                + data[8 + int.from_bytes(data[:8], "little") :]
            )
        message = {
            "truncated": "is damaged",
            "not JSON": "lora_config metadata is not valid JSON",
        }[damage]
    elif damage == "pickle":
        path = files / "style.ckpt"
        path.write_bytes(b"not read")
        message = "is a pickled checkpoint"
    elif damage == "absent":
        path, message = files / "nowhere.safetensors", "does not exist"
    else:
        edit, message = _damage_adapter(damage)
        _our_adapter(model, path, edit=edit)
    before = _listing(tmp_path)
    out = tmp_path / "out.wav"
    error = _main(
        txt2audio,
        [
            "piano",
            "--model",
            str(small_converted),
            "--steps",
            "2",
            "--output",
            str(out),
            "--lora",
            str(path),
        ],
    )
    assert message in error and str(path) in error, error
    error = _main(
        convert,
        [
            "--hf-path",
            str(small_checkpoint),
            "--mlx-path",
            str(tmp_path / "mlx"),
            "--lora",
            f"{path}:0.5",
        ],
    )
    assert message in error and str(path) in error, error
    assert _listing(tmp_path) == before  # nothing written


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora", "{a}:nan"], "strength must be a finite number"),
        (["--lora", "{a}", "--lora-interval", "0.5:2"], "interval must satisfy"),
        (
            [
                "--lora",
                "{a}",
                "--lora-interval",
                "0.1:0.2",
                "--lora-interval",
                "0.3:0.4",
            ],
            "once per --lora (1 times), not 2",
        ),
        (["--lora-layer-filter", "layers.0"], "--lora-layer-filter needs a --lora"),
        (["--lora", "{tmp}"], "is not a file"),
    ],
)
def test_lora_flags_are_checked(small_converted, tmp_path, args, message):
    import txt2audio

    adapter = _our_adapter(
        StableAudio.from_pretrained(str(small_converted)), tmp_path / "a.safetensors"
    )
    args = [
        a.replace("{a}", str(adapter)).replace("{tmp}", str(tmp_path)) for a in args
    ]
    error = _main(
        txt2audio,
        [
            "piano",
            "--model",
            str(small_converted),
            "--output",
            str(tmp_path / "out.wav"),
            *args,
        ],
    )
    assert message in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


# ---------------------------------------------------------------- tier 2: LoRA adapters against the reference


def _random_adapter(
    model, kind: str, rank: int, seed: int, include=None, exclude=None
) -> dict:
    """Random tensors of an adapter of type `kind` on the reference's layers, B (or M)
    non-zero (0.0.20 starts them at zero) and of a size that changes each weight by
    about 30%; magnitudes of 0.5 to 1.5 times the rows' (or columns') norms."""
    from stable_audio.lora import matches

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, w in _reference_layers(model).items():
        if (include is not None and not matches(name, include)) or (
            exclude is not None and matches(name, exclude)
        ):
            continue
        out_dim, in_dim = w.shape
        if kind.endswith("-xs"):  # ||U M V^T|| = ||M||: about 30% of ||W||
            m_std = 0.3 * np.linalg.norm(w) / rank
            layer = {"M_xs": rng.standard_normal((rank, rank)) * m_std}
        else:
            b_std = 0.3 * w.std() * math.sqrt(3 * in_dim / rank)
            layer = {
                "lora_A": rng.uniform(-1, 1, (rank, in_dim)) / math.sqrt(in_dim),
                "lora_B": rng.standard_normal((out_dim, rank)) * b_std,
            }
        rows, cols = np.linalg.norm(w, axis=1), np.linalg.norm(w, axis=0)
        for name_, norms in (
            ("magnitude", cols if kind.startswith("dora-cols") else rows),
            ("magnitude_r", rows),
            ("magnitude_c", cols),
        ):
            if name_ in lora.TENSORS[kind]:
                layer[name_] = norms * rng.uniform(0.5, 1.5, len(norms))
        tensors[name] = {k: v.astype(np.float32) for k, v in layer.items()}
    return tensors


def _write_adapter(
    model,
    path: Path,
    kind,
    rank,
    alpha,
    seed,
    writer="official",
    include=None,
    exclude=None,
) -> Path:
    """An adapter file written by 0.0.20's save_lora_safetensors or by ours."""
    tensors = _random_adapter(model, kind, rank, seed, include, exclude)
    lora_config = {"rank": rank, "alpha": alpha, "adapter_type": kind}
    lora_config.update(
        {k: v for k, v in (("include", include), ("exclude", exclude)) if v is not None}
    )
    if writer == "official":
        from stable_audio_tools.models.lora import save_lora_safetensors

        torch = sys.modules["torch"]
        flat = {
            f"{layer}.parametrizations.weight.0.{k}": torch.from_numpy(v)
            for layer, named in tensors.items()
            for k, v in named.items()
        }
        save_lora_safetensors(flat, lora_config, path)
    else:
        from stable_audio import lora

        lora.save_adapter(
            path,
            {
                layer: {k: mx.array(v) for k, v in named.items()}
                for layer, named in tensors.items()
            },
            lora_config,
        )
    return path


@pytest.mark.parametrize("kind", list(lora.TENSORS))
def test_adapters_match_reference(sao, tmp_path, kind):
    """Each of the eight adapter types on all 180 layers of the full-width SAO 1.0 DiT
    and conditioner (178 + the 2 seconds embedders), rank 8, alpha 16, strength 0.7,
    file written by 0.0.20: the DiT's output at cfg 1 and 7 against stable-audio-tools
    0.0.20's. The -xs types' reference is given our bases (its svd_bases_path): 180 SVDs,
    computed once (5 minutes here) and then read from the bases' cache by both sides."""
    path = _write_adapter(sao.model, tmp_path / "a.safetensors", kind, 8, 16, 5)
    xs = kind.endswith("-xs")
    bases = _our_bases(sao.model, tmp_path / "bases.pt", 8) if xs else None
    with _with_adapters(sao, [(path, 0.7, None, "")], bases):
        assert len(_reference_layers(sao.model)) == 180
        for cfg_scale in (1.0, 7.0):
            err, adapted = _adapted_dit_error(sao, cfg_scale)
            print(f"{kind} adapter, DiT cfg {cfg_scale}: rel. error {err:.2e}")
            assert err < PARITY_RTOL
    # the reference did take the adapter (its loader drops what it cannot place, silently)
    assert rel_err(adapted, _adapted_dit_error(sao, 7.0)[1]) > 0.1


def test_stacked_adapters_match_reference(sao, tmp_path):
    """Two adapters stacked at strengths 0.7 and 1.3 (a DoRA over a LoRA, on the layers
    its include/exclude pick), one file written by 0.0.20 and one by us, both read by
    both: the DiT's output at cfg 1 and 7. (The second's layers are among the first's:
    0.0.20 loses a later adapter's tensors on layers an earlier one leaves out.)"""
    first = _write_adapter(
        sao.model, tmp_path / "first.safetensors", "lora", 8, 8, seed=6
    )
    second = _write_adapter(
        sao.model,
        tmp_path / "second.safetensors",
        "dora-rows",
        4,
        8,
        seed=7,
        writer="ours",
        include=[
            "layers.[8-23].",
            "to_timestep_embed",
            "preprocess_conv",
            "project_out",
            "seconds_total",
        ],
        exclude=["cross_attn.to_q"],
    )
    with _with_adapters(sao, [(first, 0.7, None, "")]):
        first_only = _adapted_dit_error(sao, 7.0)[1]
    with _with_adapters(sao, [(first, 0.7, None, ""), (second, 1.3, None, "")]):
        for cfg_scale in (1.0, 7.0):
            err, adapted = _adapted_dit_error(sao, cfg_scale)
            print(f"stacked adapters, DiT cfg {cfg_scale}: rel. error {err:.2e}")
            assert err < PARITY_RTOL
    assert rel_err(adapted, first_only) > 0.1  # the second one counts


def test_stacked_new_types_match_reference(sao, tmp_path):
    """A bora-xs adapter at 0.7 under a dora-cols one at 1.3 (on some of its layers),
    files by 0.0.20's writer and ours: the DiT's output at cfg 1 and 7. The -xs one
    comes first: its bases are the original weights' (as in 0.0.20)."""
    first = _write_adapter(
        sao.model,
        tmp_path / "first.safetensors",
        "bora-xs",
        8,
        8,
        9,
        include=SOME_LAYERS,
    )
    subset = ["layers.[1-1].", "to_cond_embed", "postprocess_conv", "seconds_total"]
    second = _write_adapter(
        sao.model,
        tmp_path / "second.safetensors",
        "dora-cols",
        4,
        8,
        10,
        writer="ours",
        include=subset,
    )
    bases = _our_bases(sao.model, tmp_path / "bases.pt", 8, SOME_LAYERS)
    with _with_adapters(sao, [(first, 0.7, None, "")], bases):
        first_only = _adapted_dit_error(sao, 7.0)[1]
    both = [(first, 0.7, None, ""), (second, 1.3, None, "")]
    with _with_adapters(sao, both, bases):
        for cfg_scale in (1.0, 7.0):
            err, adapted = _adapted_dit_error(sao, cfg_scale)
            print(f"bora-xs + dora-cols, DiT cfg {cfg_scale}: rel. error {err:.2e}")
            assert err < PARITY_RTOL
    assert rel_err(adapted, first_only) > 0.1  # the second one counts


def test_xs_adapters_refuse_a_changed_weight(small_converted, tmp_path):
    """An -xs adapter over a layer that an adapter merged before it has changed (its
    bases are the original weight's) is refused in one line naming the file; the model
    is left as it was."""
    pipe = StableAudio.from_pretrained(str(small_converted))
    plain = _our_adapter(pipe, tmp_path / "plain.safetensors")
    xs = _our_adapter(pipe, tmp_path / "xs.safetensors", kind="lora-xs", rank=4)
    pipe.load_lora(xs)  # first: fine
    pipe.load_lora(plain)
    before = dict(tree_flatten(pipe.dit.parameters()))
    with pytest.raises(ValueError, match="xs.safetensors: its bases are the singular"):
        pipe.load_lora(xs)
    after = dict(tree_flatten(pipe.dit.parameters()))
    assert all(mx.array_equal(before[k], after[k]).item() for k in before)


@pytest.mark.parametrize(
    "model, first, second, blocks",
    [("sao", "lora", "dora-rows", "[0-5]"), ("small", "bora", "dora-cols", "0")],
)
def test_gated_adapters_match_reference(
    request, tmp_path, model, first, second, blocks
):
    """An 8-step generation (dpmpp-3m-sde, cfg 7) with an adapter active only at noise
    levels in [0.5, 0.995] (3 of the 8 evaluations) and kept off some layers by a layer
    filter, under an always-on one of a magnitude type (whose norms then depend on the
    first's state): the final latents against 0.0.20's generate_diffusion_cond with
    lora_configs. On the full-width SAO 1.0 model, and on the small one for the
    types that rescale columns (each case costs minutes at full width). Ours runs
    compiled, traced once for all 8 steps."""
    sao = request.getfixturevalue(model)
    torch = sys.modules["torch"]
    from stable_audio_tools.inference import generation, sampling

    gated = _write_adapter(
        sao.model, tmp_path / "gated.safetensors", first, 8, 8, seed=8
    )
    under = _write_adapter(
        sao.model, tmp_path / "dora.safetensors", second, 4, 4, seed=9
    )
    layer_filter = f"transformer.layers.{blocks}.,  TO_GLOBAL_EMBED"
    steps, seed, T = 8, 3, 32
    channels = sao.ours.config.dit.io_channels
    ratio = sao.ours.config.vae.downsampling_ratio
    theirs, ours = _noise_source(torch, (1, channels, T), steps, seed=11)
    sde = sampling.K.sampling.sample_dpmpp_3m_sde
    meta = [{"prompt": PROMPTS[0], "seconds_start": 1, "seconds_total": 20}]
    with _with_adapters(
        sao, [(gated, 1.0, (0.5, 0.995), layer_filter), (under, 0.8, None, "")]
    ) as lora_configs:
        with _patched(
            sampling.K.sampling,
            "sample_dpmpp_3m_sde",
            lambda *a, **k: sde(*a, **k, noise_sampler=theirs),
        ):
            with torch.no_grad():
                ref = generation.generate_diffusion_cond(
                    sao.model,
                    steps=steps,
                    cfg_scale=7.0,
                    conditioning=meta,
                    batch_size=1,
                    sample_size=T * ratio,
                    seed=seed,
                    device="cpu",
                    sampler_type="dpmpp-3m-sde",
                    sigma_min=0.3,
                    sigma_max=500,
                    apg_scale=0.0,
                    lora_configs=lora_configs,
                    return_latents=True,
                )
        torch.manual_seed(seed)
        noise = mx.array(torch.randn([1, channels, T]).numpy()).transpose(0, 2, 1)
        pipe = StableAudio(sao.ours)
        traces = []
        guide = pipeline_module.guide
        counted = lambda *args: traces.append(1) or guide(*args)
        with _patched(sao.ours.config, "sample_size", T * ratio), _patched(
            pipeline_module, "guide", counted
        ):
            conditioning = pipe.condition(PROMPTS[0], seconds_start=1, seconds_total=20)
            *_, latents = pipe.generate_latents(
                conditioning,
                steps=steps,
                cfg_scale=7.0,
                sampler="dpmpp-3m-sde",
                sigma_min=0.3,
                sigma_max=500,
                noise=noise,
                noise_sampler=ours,
                compile=True,
            )
    err = rel_err(latents.transpose(0, 2, 1), ref)
    print(
        f"gated {first} under a {second}, 8 steps: final latents rel. error {err:.2e},"
        f" {len(traces)} trace(s)"
    )
    assert err < 1e-4
    assert len(traces) == 1


def test_layer_patterns_match_reference(reference):
    """include/exclude and layer-filter patterns pick the layers 0.0.20's _matches_any and
    filter_lora_layers pick (brackets, reversed ranges, layers.1 matching layers.10, case
    and spaces in filters), on SAO 1.0's layer names."""
    from stable_audio_tools.models.lora.model import _expand, _matches_any

    from stable_audio import lora

    names = list(
        lora.official_layers(24, {"seconds_start": None, "seconds_total": None})
    )
    patterns = [
        ["layers.[0-5]."],
        ["layers[0-5]"],
        ["layers.1"],
        ["layers.[3-1].ff"],
        ["to_kv", "conditioners"],
        ["a[1-2]b[3-4]"],
        [" to_q "],
        [],
    ]
    for p in patterns:
        assert [n for n in names if lora.matches(n, p)] == [
            n for n in names if _matches_any(n, p)
        ], p
    for text in [
        "transformer.layers.[0-5].,  TO_GLOBAL_EMBED",
        "Self_Attn",
        "",
        "ff.ff.2,preprocess",
    ]:
        official = [x.lower().strip() for x in text.split(",") if len(x)]
        expected = [
            n
            for n in names
            if any(e in n[len("model.") :] for f in official for e in _expand(f))
        ]
        assert [
            n
            for n in names
            if lora.matches(n[len("model.") :], lora.filter_patterns(text))
        ] == expected, text


# ---------------------------------------------------------------- tier 2: the forms of all eight types


def _reference_form(reference, kind: str, weight, rank: int, alpha: float, seed: int):
    """0.0.20's LoRAParametrization of `kind` over `weight` (a Linear's (out, in) or a
    Conv1d's (out, in, k)), every trainable tensor made non-zero and the magnitudes
    moved off the weight's norms, at strength 0.7."""
    from stable_audio_tools.models.lora.model import LoRAParametrization

    torch = reference.torch
    torch.manual_seed(seed)
    w2d = weight.reshape(weight.shape[0], -1)
    form = LoRAParametrization(
        w2d.shape[1],
        w2d.shape[0],
        rank=rank,
        lora_alpha=alpha,
        adapter_type=kind,
        W0=w2d,
    )
    with torch.no_grad():
        for name, value in form.named_parameters():
            if name.startswith("magnitude"):
                value.mul_(1 + 0.3 * torch.rand_like(value))
            else:
                value.copy_(0.2 * torch.randn_like(value))
        form.lora_strength.fill_(0.7)
    return form


@pytest.mark.parametrize("kind", list(lora.TENSORS))
@pytest.mark.parametrize("shape", [(48, 32), (24, 16, 3)], ids=["linear", "conv1d"])
def test_every_form_matches_reference(reference, kind, shape):
    """Each of 0.0.20's eight adapter types as a function of the weight, float32, at
    strength 0.7 and alpha 6 over rank 4: ours (the -xs types with bases from our own
    SVD) within 1e-5 of LoRAParametrization's weight."""
    torch = reference.torch
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    form = _reference_form(reference, kind, weight, rank=4, alpha=6, seed=2)
    with torch.no_grad():
        theirs = form(weight).reshape(shape[0], -1).numpy()
    w2d = mx.array(weight.reshape(shape[0], -1).numpy())
    tensors = {
        name: mx.array(value.detach().numpy())
        for name, value in form.named_parameters()
    }
    if kind.endswith("-xs"):
        tensors["U"], tensors["V"] = bases.svd_bases(w2d, 4)
    ours = lora.adapted_weight(w2d, kind, tensors, 0.7 * 6 / 4)
    assert rel_err(ours, theirs) < 1e-5
    unchanged = lora.adapted_weight(w2d, kind, tensors, 0.0)  # strength 0
    assert rel_err(unchanged, weight.reshape(shape[0], -1).numpy()) < 1e-7


def test_svd_bases_follow_the_sign_convention(reference):
    """The -xs bases are 0.0.20's: the top singular vectors with each U column's
    largest-magnitude entry positive (V flipped with it). Without the convention the
    signs are LAPACK's, and some of the 4 x 16 columns here come out flipped."""
    from stable_audio_tools.models.lora.model import _canonicalize_svd_signs

    torch = reference.torch
    generator = torch.Generator().manual_seed(3)
    for shape in ((64, 40), (40, 64), (96, 96), (17, 50)):
        weight = torch.randn(shape, generator=generator)
        u, _, vh = torch.linalg.svd(weight, full_matrices=False)
        u, vh = _canonicalize_svd_signs(u, vh)
        ours_u, ours_v = map(np.array, bases.svd_bases(mx.array(weight.numpy()), 16))
        # column by column the same vectors, same signs (two float32 SVDs agree to
        # about 1e-5 where singular values are close; a flipped column gives -1)
        for ours, theirs in ((ours_u, u[:, :16].numpy()), (ours_v, vh[:16].T.numpy())):
            assert ((ours * theirs).sum(axis=0) > 0.9999).all()
        largest = np.abs(ours_u).argmax(axis=0)
        assert (ours_u[largest, np.arange(16)] > 0).all()


def _random_tensors(kind: str, weight, rng) -> dict:
    """An adapter's tensors for one layer, every one moved off its start."""
    (out_dim, in_dim), rank = weight.shape, 4
    shapes = {
        "lora_A": (rank, in_dim),
        "lora_B": (out_dim, rank),
        "M_xs": (rank, rank),
        "magnitude": (in_dim,) if kind.startswith("dora-cols") else (out_dim,),
        "magnitude_r": (out_dim,),
        "magnitude_c": (in_dim,),
    }
    tensors = {
        name: mx.array(
            (
                rng.uniform(0.5, 1.5, shapes[name])
                if name.startswith("magnitude")
                else rng.standard_normal(shapes[name])
            ),
            dtype=mx.float32,
        )
        for name in lora.TENSORS[kind]
    }
    if kind.endswith("-xs"):
        tensors["U"], tensors["V"] = bases.svd_bases(weight, rank)
    return tensors


@pytest.mark.parametrize("kind", lora.ADAPTER_TYPES)
def test_adapters_beside_a_layer_equal_merged_ones(kind):
    """Every type runs beside a layer (over a quantized weight, or gated) as merging
    gives it: rows and columns rescaled around the base layer, the bias left alone;
    gated, the base layer outside its interval."""
    rng = np.random.default_rng(0)
    layer = nn.Linear(24, 40)
    tensors = _random_tensors(kind, layer.weight, rng)
    x = mx.array(rng.standard_normal((3, 24)), dtype=mx.float32)
    merged = x @ lora.adapted_weight(layer.weight, kind, tensors, 0.3).T + layer.bias
    beside = lora.LoRALinear(layer, kind, tensors, 0.3)
    assert rel_err(beside(x), merged) < 1e-6
    gated = lora.LoRALinear(layer, kind, tensors, 0.3, interval=(0.2, 0.6))
    assert rel_err(gated(x, mx.array(0.4)), merged) < 1e-6
    assert mx.array_equal(gated(x, mx.array(0.8)), layer(x)).item()


@pytest.mark.parametrize(
    "inner, outer", [("bora", "dora-cols"), ("dora-cols-xs", "bora-xs")]
)
def test_stacked_beside_a_gated_adapter(inner, outer):
    """An adapter over a gated one follows the weight the gated one makes when it is
    on, and the original weight when it is off (its factors precomputed for both)."""
    rng = np.random.default_rng(1)
    layer = nn.Linear(24, 40)
    first = _random_tensors(inner, layer.weight, rng)
    second = _random_tensors(outer, layer.weight, rng)
    gated = lora.LoRALinear(layer, inner, first, 0.3, interval=(0.2, 0.6))
    stacked = lora.LoRALinear(gated, outer, second, 0.5)
    x = mx.array(rng.standard_normal((3, 24)), dtype=mx.float32)
    on = lora.adapted_weight(
        lora.adapted_weight(layer.weight, inner, first, 0.3), outer, second, 0.5
    )
    off = lora.adapted_weight(layer.weight, outer, second, 0.5)
    for level, weight in ((0.4, on), (0.8, off)):
        assert rel_err(stacked(x, mx.array(level)), x @ weight.T + layer.bias) < 1e-6


# ---------------------------------------------------------------- the -xs bases' cache on disk


def _bits(*arrays) -> list:
    """Arrays as (dtype, shape, bytes): equal only where equal bit for bit."""
    return [(np.asarray(a).dtype, np.shape(a), np.asarray(a).tobytes()) for a in arrays]


def _svd_weight(seed=0, shape=(48, 32)) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal(shape), mx.float32)


@pytest.fixture
def svd_calls(monkeypatch) -> list:
    """The shapes np.linalg.svd is called on, as they come."""
    calls, svd = [], np.linalg.svd

    def counted(a, *args, **kwargs):
        calls.append(np.shape(a))
        return svd(a, *args, **kwargs)

    monkeypatch.setattr(np.linalg, "svd", counted)
    return calls


def _stored_rank(folder: Path) -> list:
    """The rank of each entry in a bases cache folder."""
    return [mx.load(str(p))["U"].shape[1] for p in sorted(folder.glob("*.safetensors"))]


def test_svd_bases_cached_compute_nothing_the_second_time(tmp_path, monkeypatch):
    """The second request for a weight's bases (the same values, another array) reads
    them: no SVD, and bit for bit what svd_bases computes."""
    weight = _svd_weight()
    expected = _bits(*bases.svd_bases(weight, 8))
    assert _bits(*bases.cached_bases(weight, 8, tmp_path)) == expected

    def refused(*args, **kwargs):
        raise AssertionError("an SVD was computed")

    monkeypatch.setattr(np.linalg, "svd", refused)
    again = bases.cached_bases(mx.array(np.array(weight)), 8, tmp_path)
    assert _bits(*again) == expected


def test_svd_bases_cached_at_a_smaller_rank_are_the_first_columns(tmp_path, svd_calls):
    """A smaller rank is sliced from the entry, bit for bit svd_bases' at that rank (the
    sign fix is per column); the entry keeps its larger rank."""
    weight = _svd_weight(1, (40, 56))
    bases.cached_bases(weight, 8, tmp_path)
    for rank in (1, 3, 7):
        expected = _bits(*bases.svd_bases(weight, rank))
        assert _bits(*bases.cached_bases(weight, rank, tmp_path)) == expected
    assert len(svd_calls) == 1 + 3  # the first, and svd_bases' own here
    assert _stored_rank(tmp_path) == [8]


def test_svd_bases_cached_at_a_larger_rank_are_computed(tmp_path, svd_calls):
    """A larger rank than the entry holds is computed and replaces it; smaller ones are
    then read from it."""
    weight = _svd_weight(2)
    bases.cached_bases(weight, 3, tmp_path)
    larger = bases.cached_bases(weight, 8, tmp_path)
    assert len(svd_calls) == 2
    assert _stored_rank(tmp_path) == [8]
    assert _bits(*larger) == _bits(*bases.svd_bases(weight, 8))
    svd_calls.clear()
    bases.cached_bases(weight, 5, tmp_path)
    bases.cached_bases(weight, 8, tmp_path)
    assert svd_calls == []


@pytest.mark.parametrize(
    "damage", ["garbage", "cut short", "transposed", "no V", "float16", "empty"]
)
def test_svd_bases_cached_in_a_damaged_file_are_computed_again(
    tmp_path, svd_calls, damage
):
    """An entry that cannot be read, or holds the wrong tensors, is computed again and
    replaced; the load goes on."""
    weight = _svd_weight(3)
    u, v = bases.cached_bases(weight, 4, tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "cut short":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "transposed":  # each the other's shape
        mx.save_safetensors(str(path), {"U": v, "V": u})
    elif damage == "no V":
        mx.save_safetensors(str(path), {"U": u})
    elif damage == "float16":
        mx.save_safetensors(
            str(path), {"U": u.astype(mx.float16), "V": v.astype(mx.float16)}
        )
    else:
        path.write_bytes(b"")
    svd_calls.clear()
    again = bases.cached_bases(weight, 4, tmp_path)
    assert len(svd_calls) == 1
    assert _bits(*again) == _bits(u, v)
    svd_calls.clear()
    assert _bits(*bases.cached_bases(weight, 4, tmp_path)) == _bits(u, v)
    assert svd_calls == []  # replaced by a good entry


@pytest.mark.parametrize("where", ["under a file", "entry is a folder"])
def test_svd_bases_cached_in_an_unwritable_folder_are_still_returned(tmp_path, where):
    """A cache folder that cannot be made, or an entry that cannot be written (we run as
    root here, so the obstacle is a file or a folder in the way, not permissions), is
    skipped: the bases are returned all the same."""
    weight = _svd_weight(4)
    folder = tmp_path / "cache"
    if where == "under a file":
        (tmp_path / "a file").write_text("")
        folder = tmp_path / "a file" / "svd-bases"
    else:
        entry = bases.weight_digest(np.array(weight))
        (folder / f"{entry}.safetensors").mkdir(parents=True)
    got = bases.cached_bases(weight, 4, folder)
    assert _bits(*got) == _bits(*bases.svd_bases(weight, 4))
    assert not list(tmp_path.rglob("*.partial*"))  # no temporary left behind


def test_svd_bases_cached_per_weight_content(tmp_path, svd_calls):
    """Weights one ulp apart in one element, or of the same values in another shape,
    have entries of their own: the key is the whole float32 content and shape."""
    weight = np.array(_svd_weight(5))
    nudged = weight.copy()
    nudged[17, 9] = np.nextafter(nudged[17, 9], np.inf)
    reshaped = weight.reshape(32, 48)
    results = [
        bases.cached_bases(mx.array(w), 4, tmp_path) for w in (weight, nudged, reshaped)
    ]
    assert len(svd_calls) == 3
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    for w, got in zip((weight, nudged, reshaped), results):
        assert _bits(*got) == _bits(*bases.svd_bases(w, 4))


def test_svd_bases_cache_folder(tmp_path, monkeypatch):
    """The cache is svd-bases in $STABLE_AUDIO_CACHE, else in stable-audio-mlx of
    $XDG_CACHE_HOME or ~/.cache; the tests' own is a temporary folder (conftest)."""
    assert not bases.cache_folder().is_relative_to(Path.home() / ".cache")
    monkeypatch.setenv("STABLE_AUDIO_CACHE", str(tmp_path / "ours"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bases.cache_folder() == tmp_path / "ours" / "svd-bases"
    bases.cached_bases(_svd_weight(6), 2)
    assert len(list((tmp_path / "ours" / "svd-bases").glob("*.safetensors"))) == 1
    monkeypatch.delenv("STABLE_AUDIO_CACHE")
    assert bases.cache_folder() == tmp_path / "xdg" / "stable-audio-mlx" / "svd-bases"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "stable-audio-mlx" / "svd-bases"
    assert bases.cache_folder() == expected

"""Fine-tuning (finetune.py, stable_audio.trainer and stable_audio.datasets): the training
loss and its gradients, the data preparation and the timestep samplers against
stable-audio-tools 0.0.20; data folders and their captions, chunked encoding, random
windows, the latent cache, gradient accumulation and processes, previews, learning,
gradient checkpointing, resuming and refusals; and a trained adapter in the reference.
"""

import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import convert
import stable_audio
from conftest import (
    HERE,
    PARITY_RTOL,
    PROMPTS,
    SOME_LAYERS,
    _adapted_dit_error,
    _copy_folder,
    _launch,
    _listing,
    _main,
    _our_bases,
    _Stub,
    _with_adapters,
    rel_err,
)
from stable_audio import StableAudio, lora, model_io

# ---------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="session")
def reference_training(reference):
    """0.0.20's training loss helpers; their module imports logging and plotting packages
    (lightning's loggers, wandb, matplotlib, PIL) that the loss never uses: stand-ins.
    """
    for name in (
        "pytorch_lightning.loggers",
        "wandb",
        "matplotlib",
        "matplotlib.backends",
        "matplotlib.backends.backend_agg",
        "matplotlib.cm",
        "matplotlib.colors",
        "matplotlib.figure",
        "matplotlib.ticker",
        "PIL",
        "PIL.Image",
    ):
        sys.modules.setdefault(name, _Stub(name))
    from stable_audio_tools.training import utils

    return utils


@pytest.mark.parametrize("kind", lora.ADAPTER_TYPES)
def test_training_loss_and_gradients_match_reference(
    sao, reference_training, tmp_path, kind
):
    """The training loss of our FineTuned against 0.0.20's (its DiT forward at cfg 1 with
    adapters from load_and_apply_loras, compute_normalized_mse and compute_masked_loss at
    their defaults) on the full-width SAO 1.0 model, 16 latents, batch 2 with one sample
    padded after 11 latents and one cfg-dropped, the same t, noise and adapter values (B
    non-zero); then the gradient of every adapter tensor of the 180 layers against torch
    autograd's. The six types 0.0.20 added later train on SOME_LAYERS (26 layers of every
    kind; their dense weights and SVDs cost 3 minutes a type on all 180), the -xs ones'
    reference given our bases (its svd_bases_path)."""
    torch = sys.modules["torch"]
    from stable_audio_tools.models.lora import load_and_apply_loras
    from torch.nn.utils import parametrize

    from stable_audio import trainer

    ours = sao.ours
    saved = [
        (m, m.leaf_modules(), m.parameters()) for m in (ours.dit, ours.conditioner)
    ]
    try:
        model = trainer.FineTuned(
            ours.dit,
            ours.conditioner,
            "v",
            rank=4,
            alpha=8,
            adapter_type=kind,
            include=None if kind in ("lora", "dora-rows") else SOME_LAYERS,
            key=mx.random.key(1),
        )
        _move_adapters(model, np.random.default_rng(2))
        path = tmp_path / "adapter.safetensors"
        lora.save_adapter(path, model.adapter_tensors(), model.lora_config)
        for p in sao.model.parameters():
            p.requires_grad_(False)
        bases = (
            _our_bases(sao.model, tmp_path / "bases.pt", 4, SOME_LAYERS)
            if "xs" in kind
            else None
        )
        load_and_apply_loras(sao.model, [str(path)], "diffusion_cond", bases)
        theirs = {}
        for name in model._layer_names.values():
            root = (
                sao.model.conditioner
                if name.startswith("conditioners.")
                else sao.model.model
            )
            theirs[name] = root.get_submodule(name).parametrizations.weight[0]
            for tensor in theirs[name].parameters():
                tensor.requires_grad_(True)

        B, T = 2, 16
        gen = torch.Generator().manual_seed(5)
        x0, noise = torch.randn(B, 64, T, generator=gen), torch.randn(
            B, 64, T, generator=gen
        )
        t = torch.rand(B, generator=gen)
        loss_mask = torch.arange(T)[None] < torch.tensor([T, 11])[:, None]
        dropped = torch.tensor([False, True])
        prompts, starts, totals = PROMPTS[:2], [3, 0], [40, 12]
        meta = [
            {"prompt": p, "seconds_start": s, "seconds_total": tt}
            for p, s, tt in zip(prompts, starts, totals)
        ]
        inputs = sao.model.get_conditioning_inputs(sao.model.conditioner(meta, "cpu"))
        cross = torch.where(
            dropped[:, None, None],
            torch.zeros_like(inputs["cross_attn_cond"]),
            inputs["cross_attn_cond"],
        )
        alpha, sigma = (
            torch.cos(t * math.pi / 2)[:, None, None],
            torch.sin(t * math.pi / 2)[:, None, None],
        )
        out = sao.model.model(
            x0 * alpha + noise * sigma,
            t,
            cross_attn_cond=cross,
            cross_attn_mask=inputs["cross_attn_mask"],
            global_cond=inputs["global_cond"],
            cfg_dropout_prob=0.0,
        )
        mse = reference_training.compute_normalized_mse(
            out, noise * alpha - x0 * sigma, loss_mask, "none"
        )
        expected = reference_training.compute_masked_loss(mse, loss_mask, False, 0.0)[0]
        expected.backward()

        tokens, mask = ours.tokenizer(prompts)
        text = ours.t5(tokens, mask)
        to_mlx = lambda a: mx.array(a.numpy()).transpose(0, 2, 1)
        args = (
            to_mlx(x0),
            mx.array(t.numpy()),
            to_mlx(noise),
            text,
            mask,
            {"seconds_start": starts, "seconds_total": totals},
            mx.array(loss_mask.numpy()),
            mx.array(dropped.numpy()),
        )
        loss, grads = nn.value_and_grad(model, model.loss)(*args)
        err = abs(loss.item() - expected.item()) / expected.item()
        grads = dict(tree_flatten(grads))
        errors = {}
        for path, name in model._layer_names.items():
            for tensor in lora.TENSORS[kind]:
                errors[f"{name}.{tensor}"] = rel_err(
                    grads.pop(f"{path}.{tensor.lower()}"),
                    getattr(theirs[name], tensor).grad,
                )
        worst = max(errors, key=errors.get)
        print(
            f"{kind} training loss rel. error {err:.2e}; gradients of {len(errors)}"
            f" tensors: worst {errors[worst]:.2e} ({worst}), median"
            f" {np.median(list(errors.values())):.2e}"
        )
        layers = 180 if kind in ("lora", "dora-rows") else 26
        assert len(errors) == layers * len(lora.TENSORS[kind]) and not grads  # no U, V
        assert err < PARITY_RTOL and errors[worst] < 1e-4
    finally:
        for m, leaves, params in saved:
            m.update_modules(leaves)
            m.update(params)
            m.unfreeze()
        for root in (sao.model.model, sao.model.conditioner):
            for module in root.modules():
                if parametrize.is_parametrized(module, "weight"):
                    parametrize.remove_parametrizations(
                        module, "weight", leave_parametrized=False
                    )


def _move_adapters(model, rng):
    """Move a new adapter off its start, as training would (B, M non-zero, magnitudes
    changed), to float16 values, as files hold."""
    for path in model._layer_names:
        adapter = lora._module(model, path)
        for name in lora.TENSORS[adapter.kind]:
            value = np.array(adapter[name.lower()])
            if name in ("lora_B", "M_xs"):
                value = rng.standard_normal(value.shape) * 0.02
            elif name.startswith("magnitude"):
                value = value * rng.uniform(0.8, 1.2, value.shape)
            adapter[name.lower()] = mx.array(value.astype(np.float16), mx.float32)


def test_data_preparation_matches_reference(reference_training):
    """Crops, masks and seconds of 0.0.20's PadCrop_Normalized_T (its offset drawn by
    Python's random, replayed for ours), and latent masks of its resize_padding_mask."""
    import random

    torch = sys.modules["torch"]
    from stable_audio_tools.data.utils import PadCrop_Normalized_T

    from stable_audio import datasets

    rng = np.random.default_rng(0)
    rate = 100
    for n, window in [(1050, 300), (250, 1000), (1000, 1000), (4321, 999)]:
        audio = rng.standard_normal((2, n)).astype(np.float32)
        crop = PadCrop_Normalized_T(window, rate, randomize=True)
        for seed in range(4):
            random.seed(seed)
            chunk, _, _, seconds_start, seconds_total, mask = crop(
                torch.from_numpy(audio)
            )
            random.seed(seed)
            offset = random.randint(0, n - window) if n > window else 0
            ours = datasets.pad_crop(audio, window, rate, offset)
            assert np.array_equal(ours[0], chunk.numpy()) and np.array_equal(
                ours[1], mask.numpy().astype(bool)
            )
            assert (ours[2], ours[3]) == (seconds_start, seconds_total), (
                n,
                window,
                offset,
            )
    for valid, n, length in [
        (300, 1000, 16),
        (1000, 1000, 16),
        (1, 1000, 7),
        (999, 1000, 7),
        (0, 64, 4),
    ]:
        mask = np.arange(n)[None] < valid
        expected = reference_training.resize_padding_mask(
            torch.from_numpy(mask), length
        ).numpy()
        assert np.array_equal(datasets.latent_mask(mask, length), expected), (
            valid,
            n,
            length,
        )


def test_data_folders_and_their_captions(tmp_path):
    import soundfile as sf

    from stable_audio import datasets

    tone = (0.5 * np.sin(np.arange(4410) / 10)).astype(np.float32)
    folder = tmp_path / "data"
    folder.mkdir()
    sf.write(folder / "b.wav", tone, 22050)
    sf.write(folder / "a.flac", np.stack([tone, -tone], 1), 44100)
    (folder / "a.txt").write_text("low tone\n")
    (folder / "notes.md").write_text("not audio")
    with pytest.raises(ValueError, match=r"b.wav has no caption: add b.txt"):
        datasets.find_clips(folder)
    (folder / "metadata.jsonl").write_text('{"file": "b.wav", "prompt": "high tone"}\n')
    assert [(p.name, c) for p, c in datasets.find_clips(folder)] == [
        ("a.flac", "low tone"),
        ("b.wav", "high tone"),
    ]
    clip = datasets.load_clip(folder / "b.wav", 44100, 2)
    assert clip.shape == (2, 8820) and np.array_equal(
        clip[0], clip[1]
    )  # resampled, mono doubled
    assert datasets.load_clip(folder / "a.flac", 44100, 1).shape == (1, 4410)
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text('file,prompt\nb.wav,"high, clear tone"\n')
    assert datasets.find_clips(folder)[1][1] == "high, clear tone"
    (folder / "metadata.csv").write_text("name,caption\nb.wav,x\n")
    with pytest.raises(ValueError, match='row 1, lacks a "file" and a "prompt"'):
        datasets.find_clips(folder)
    for missing in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(ValueError, match="does not exist|holds no audio files"):
            datasets.find_clips(missing)
    assert datasets.is_silent(np.full((2, 10), 1e-4)) and not datasets.is_silent(
        np.full((2, 10), 1e-2)
    )


def test_chunked_encoding_equals_one_shot(small_converted, monkeypatch):
    """VAE.posterior a few latents at a time (with the encoder's receptive field on each
    side) equals encoding the whole file at once; with too little context it would not.
    """
    vae = model_io.load(str(small_converted)).vae
    ratio = vae.config.downsampling_ratio
    audio = (
        mx.random.normal(
            (1, 50 * ratio, vae.config.audio_channels), key=mx.random.key(3)
        )
        * 0.3
    )
    whole = vae.posterior(audio)
    chunked = vae.posterior(audio, chunk=4)
    errors = [rel_err(a, b) for a, b in zip(chunked, whole)]
    print(
        f"chunked encoding (4 latents a chunk, context {vae.config.encoder_context}):"
        f" mean {errors[0]:.1e}, std {errors[1]:.1e}"
    )
    assert max(errors) < 1e-6
    monkeypatch.setattr(type(vae.config), "encoder_context", property(lambda self: 1))
    assert rel_err(vae.posterior(audio, chunk=4)[0], whole[0]) > 1e-4


def test_random_windows_are_padcrop_on_the_latents(small_converted):
    """A long file (a silent stretch in it) and a short one: the offsets a window may take
    are every whole latent up to where the window ends with the file, less the silent
    windows; at each, batches_at gives the file's cached posterior there and the seconds
    and loss mask PadCrop_Normalized_T and resize_padding_mask give for that offset."""
    import finetune
    from stable_audio import datasets

    models = model_io.load(str(small_converted))
    config = models.config
    rate, ratio, window = (
        config.sample_rate,
        config.vae.downsampling_ratio,
        config.sample_size,
    )
    latents = window // ratio
    n = 3 * window + 1000
    audio = (0.5 * np.sin(np.arange(n) / 7)).astype(np.float32)[None].repeat(2, 0)
    audio[:, window + 5 * ratio : 2 * window + 9 * ratio] = (
        0  # the windows wholly inside are silent
    )
    peaks = datasets.block_peaks(audio, ratio, math.ceil(n / ratio))
    starts = datasets.crop_starts(peaks, n, ratio, latents)
    last = (n - window) // ratio
    silent = set(
        range(latents + 5, latents + 10)
    )  # latents [k, k + latents) lie wholly in the silence
    assert (
        list(starts) == [k for k in range(last + 1) if k not in silent]
        and len(starts) == last + 1 - 5
    )
    posterior = [
        (
            mx.array(
                np.random.default_rng(0).standard_normal(
                    (max(n // ratio + 1, latents), 64)
                ),
                dtype=mx.float32,
            ),
        )
        * 2
    ]
    short = 1500
    settings = _run_settings(batch_size=1)
    texts = {
        "c": (
            mx.zeros((config.conditioner.text_max_length, config.conditioner.cond_dim)),
            mx.ones(config.conditioner.text_max_length, dtype=mx.int32),
        )
    }
    for samples, start in [(n, 0), (n, 3), (n, int(starts[-1])), (short, 0)]:
        clip = datasets.Clip("f", "c", posterior, samples, peaks, ratio, window)
        clip.starts = np.array([start])
        [(mean, std, _, _, _, _, _, seconds_start, seconds_total, loss_mask, _)] = (
            finetune.batches_at([clip], texts, 1, settings, config, latents)
        )
        chunk, mask, expected_start, expected_total = datasets.pad_crop(
            np.zeros((2, samples)), window, rate, start * ratio
        )
        assert np.array_equal(
            np.array(mean[0]), np.array(posterior[0][0][start : start + latents])
        )
        assert (seconds_start.item(), seconds_total.item()) == (
            expected_start,
            expected_total,
        )
        assert np.array_equal(
            np.array(loss_mask[0]), datasets.latent_mask(mask, latents)
        ), (samples, start)


def test_latent_cache_is_reused_and_renewed(
    small_converted, tone_data, tmp_path, monkeypatch
):
    """A second preparation reads the posteriors back from the cache without encoding; a
    changed file is encoded again; the cache holds both polarities under --phase-flip, the
    flipped one the encoding of the inverted audio."""
    import shutil

    import finetune
    from stable_audio.vae import VAE

    data = _copy_folder(tone_data, tmp_path / "data")
    shutil.rmtree(data / ".stable-audio-cache", ignore_errors=True)
    models = model_io.load(str(small_converted))
    settings = _run_settings(phase_flip=True)
    cache = tmp_path / "cache"
    first, _ = _prepared(finetune, models, data, settings, cache=cache)
    assert len(list(cache.iterdir())) == 4
    encodings = []
    original = VAE.posterior
    monkeypatch.setattr(
        VAE,
        "posterior",
        lambda self, audio, chunk=None: encodings.append(chunk)
        or original(self, audio, chunk),
    )
    again, _ = _prepared(finetune, models, data, settings, cache=cache)
    assert encodings == []
    for a, b in zip(first, again):
        assert all(
            np.array_equal(np.array(x), np.array(y))
            for p, q in zip(a.posteriors, b.posteriors)
            for x, y in zip(p, q)
        )
        assert np.array_equal(a.starts, b.starts) and a.samples == b.samples
    ratio = models.config.vae.downsampling_ratio
    audio = stable_audio.datasets.load_clip(first[0].path, models.config.sample_rate, 2)
    padded = np.zeros(
        (max(math.ceil(audio.shape[1] / ratio) * ratio, models.config.sample_size), 2),
        dtype=np.float32,
    )
    padded[: audio.shape[1]] = audio.T
    flipped = original(models.vae, mx.array(-padded[None]))[0][0]
    assert (
        rel_err(first[0].posteriors[1][0], flipped) < 1e-6
        and rel_err(first[0].posteriors[0][0], flipped) > 1e-2
    )
    sf = pytest.importorskip("soundfile")
    sf.write(first[0].path, 0.3 * np.ones(ratio * 3, dtype=np.float32), 44100)
    _prepared(finetune, models, data, settings, cache=cache)
    assert (
        len([c for c in encodings if c]) == 2
    )  # both polarities of the changed file, nothing else


def test_timestep_samplers_match_reference(reference):
    """Each --timestep-sampler draws t as 0.0.20's does (20 000 draws each: the two samples'
    Kolmogorov-Smirnov distance); "uniform" (0.0.20's scrambled Sobol) is also stratified:
    every 2^k consecutive draws of a run put one in each 1/2^k of [0, 1]."""
    torch = sys.modules["torch"]
    from stable_audio_tools.inference.sampling import (
        sample_timesteps_logsnr,
        sample_timesteps_logsnr_uniform,
        truncated_logistic_normal_rescaled,
    )

    from stable_audio import trainer

    n = 20_000
    torch.manual_seed(0)
    theirs = {
        "uniform": torch.quasirandom.SobolEngine(1, scramble=True).draw(n)[:, 0],
        "logit_normal": torch.sigmoid(torch.randn(n)),
        "trunc_logit_normal": 1 - truncated_logistic_normal_rescaled(n),
        "log_snr": sample_timesteps_logsnr(n),
        "log_snr_uniform": sample_timesteps_logsnr_uniform(n),
    }
    for name in trainer.TIMESTEP_SAMPLERS:
        ours = np.sort(
            trainer.sample_timesteps(name, n, np.random.default_rng(1), 0, 12345)
        )
        ref = np.sort(theirs[name].double().numpy())
        grid = np.concatenate([ours, ref])
        distance = (
            np.abs(
                np.searchsorted(ours, grid, "right")
                - np.searchsorted(ref, grid, "right")
            ).max()
            / n
        )
        print(f"timestep sampler {name}: KS distance {distance:.4f}")
        assert distance < 0.02 and 0 <= ours.min() and ours.max() <= 1, name
    draws = trainer.sample_timesteps("uniform", 64, None, 64, 987654)
    for k in (1, 2, 4, 6):
        for block in draws.reshape(-1, 2**k):
            assert sorted(np.floor(block * 2**k).astype(int)) == list(range(2**k))


def test_accumulation_and_processes_match_a_larger_batch(
    small_converted, tone_data, tmp_path
):
    """Four steps of batch 2 in one process; of batch 1 with --grad-accumulate 2; and of
    batch 1 in each of two processes (mlx.launch, ring backend over loopback): the same
    adapters (the checkpoint's float32 values)."""
    import finetune

    common = [
        "--model",
        str(small_converted),
        "--data",
        str(tone_data),
        "--rank",
        "2",
        "--learning-rate",
        "1e-3",
        "--warmup",
        "2",
        "--steps",
        "4",
        "--seed",
        "7",
    ]
    outputs = {
        name: tmp_path / f"{name}.safetensors"
        for name in ("batch", "accumulated", "processes")
    }
    assert (
        _main(
            finetune, [*common, "--output", str(outputs["batch"]), "--batch-size", "2"]
        )
        == ""
    )
    assert (
        _main(
            finetune,
            [
                *common,
                "--output",
                str(outputs["accumulated"]),
                "--grad-accumulate",
                "2",
            ],
        )
        == ""
    )
    run = _launch("finetune.py", *common, "--output", outputs["processes"])
    assert run.returncode == 0, run.stderr[-2000:]
    adapters = {
        name: {
            k: np.array(v)
            for k, v in mx.load(str(finetune.checkpoint_path(str(path)))).items()
            if k.startswith("adapter.")
        }
        for name, path in outputs.items()
    }
    whole = lambda tensors: np.concatenate(
        [tensors[k].ravel() for k in sorted(tensors)]
    )
    expected = whole(adapters["batch"])
    for name in ("accumulated", "processes"):
        assert adapters[name].keys() == adapters["batch"].keys()
        worst = max(
            rel_err(adapters[name][k], adapters["batch"][k]) for k in adapters[name]
        )
        print(
            f"{name} vs one process with batch 2: the adapter's rel. error"
            f" {rel_err(whole(adapters[name]), expected):.1e} (worst tensor"
            f" {worst:.1e})"
        )
        assert rel_err(whole(adapters[name]), expected) < 1e-6
    assert rel_err(whole(adapters["processes"]), whole(adapters["accumulated"])) < 1e-7
    assert (
        rel_err(whole(adapters["batch"]), whole(adapters["batch"]) * 0 + 1) > 0
    )  # sanity: compared something


def test_finetune_skips_unreadable_files_and_writes_previews(
    small_converted, tone_data, tmp_path
):
    """A file soundfile cannot read is skipped (or, with --strict, refused by name); the
    latent cache is written into the data folder; --preview-prompt writes audio of the
    asked length at each --preview-every step."""
    import shutil

    import soundfile as sf

    import finetune

    data = _copy_folder(tone_data, tmp_path / "data")
    shutil.rmtree(data / ".stable-audio-cache", ignore_errors=True)
    (data / "broken.wav").write_bytes(b"RIFF not really")
    (data / "broken.txt").write_text("a broken file")
    out = tmp_path / "run" / "adapter.safetensors"
    out.parent.mkdir()
    args = [
        "--model",
        str(small_converted),
        "--data",
        str(data),
        "--output",
        str(out),
        "--steps",
        "2",
        "--rank",
        "2",
        "--preview-prompt",
        "low tone",
        "--preview-every",
        "1",
        "--preview-seconds",
        "0.01",
        "--preview-steps",
        "2",
    ]
    before = _listing(tmp_path)
    assert "Cannot read audio from" in _main(
        finetune, [*args, "--strict"]
    ) and "broken.wav" in _main(finetune, [*args, "--strict"])
    assert _listing(tmp_path) == before
    assert _main(finetune, args) == ""
    assert len(list((data / ".stable-audio-cache").iterdir())) == 4
    previews = sorted(out.parent.glob("adapter.preview-*.wav"))
    assert [p.name for p in previews] == [
        "adapter.preview-000001.wav",
        "adapter.preview-000002.wav",
    ]
    info = sf.info(previews[0])
    assert (info.samplerate, info.channels, info.frames) == (
        44100,
        2,
        round(0.01 * 44100),
    )


def _run_settings(**given):
    """finetune.py's arguments that batches_at and prepare_clips read, at their defaults."""
    import argparse

    settings = dict(
        batch_size=1,
        grad_accumulate=1,
        seed=0,
        phase_flip=False,
        timestep_sampler="uniform",
        strict=True,
    )
    return argparse.Namespace(**{**settings, **given})


def _prepared(finetune, models, folder, settings, window=None, cache=None):
    clips = finetune.prepare_clips(
        models,
        stable_audio.datasets.find_clips(folder),
        window or models.config.sample_size,
        settings,
        cache,
        "test",
        False,
    )
    return clips, finetune.encode_captions(models, [c.caption for c in clips])


def test_finetuning_learns(small_converted, tone_data, tmp_path):
    """finetune.py on the small model and the tones: 200 steps of a rank-4 DoRA lower the
    loss on fixed held-out draws (the same examples, t, noise and dropout) by a measured
    margin; the adapter file loads in the pipeline."""
    import finetune
    from stable_audio import trainer

    out = tmp_path / "tones.safetensors"
    args = [
        "--model",
        str(small_converted),
        "--data",
        str(tone_data),
        "--output",
        str(out),
        "--steps",
        "200",
        "--rank",
        "4",
        "--adapter-type",
        "dora-rows",
        "--learning-rate",
        "2e-3",
        "--warmup",
        "20",
        "--batch-size",
        "2",
    ]
    assert _main(finetune, args) == ""
    assert "already exists" in _main(finetune, args)  # and --force replaces it

    def held_out_loss(adapter=None):
        pipe = StableAudio.from_pretrained(str(small_converted))
        if adapter is not None:
            pipe.load_lora(adapter)
        models = model_io.load(str(small_converted))
        settings = _run_settings(batch_size=4, seed=1)
        clips, texts = _prepared(finetune, models, tone_data, settings)
        model = trainer.FineTuned(
            pipe.dit, pipe.conditioner, "v", rank=4
        )  # B = 0: the model as loaded
        losses = []
        for step in range(10_000, 10_032):
            [
                (
                    mean,
                    std,
                    eps,
                    t,
                    noise,
                    text,
                    mask,
                    starts,
                    totals,
                    loss_mask,
                    dropped,
                )
            ] = finetune.batches_at(
                clips,
                texts,
                step,
                settings,
                models.config,
                models.config.sample_size // models.config.vae.downsampling_ratio,
            )
            losses.append(
                model.loss(
                    mean + std * eps,
                    t,
                    noise,
                    text,
                    mask,
                    {"seconds_start": starts, "seconds_total": totals},
                    loss_mask,
                    dropped,
                ).item()
            )
        return float(np.mean(losses))

    before, after = held_out_loss(), held_out_loss(out)
    print(
        f"fine-tuning, 200 steps: held-out loss {before:.4f} -> {after:.4f}"
        f" ({1 - after / before:.0%} lower)"
    )
    assert after < 0.8 * before


def test_gradient_checkpointing_gives_the_same_gradients(small_converted):
    """With checkpoint_blocks (each block recomputed in the backward pass, after the
    gradient from above arrives) the loss and every adapter gradient are those of the
    plain backward pass."""
    from stable_audio import lora, trainer

    models = model_io.load(str(small_converted))
    model = trainer.FineTuned(
        models.dit,
        models.conditioner,
        "v",
        rank=2,
        adapter_type="dora-rows",
        key=mx.random.key(0),
    )
    for path in model._layer_names:
        adapter = lora._module(model, path)
        adapter.lora_b = (
            mx.random.normal(adapter.lora_b.shape, key=mx.random.key(len(path))) * 0.05
        )
    key = iter(mx.random.split(mx.random.key(1), 4))
    C, T = models.config.dit.io_channels, 16
    tokens, mask = models.tokenizer(["a", "b c"])
    args = (
        mx.random.normal((2, T, C), key=next(key)),
        mx.array([0.3, 0.8]),
        mx.random.normal((2, T, C), key=next(key)),
        models.t5(tokens, mask),
        mask,
        {"seconds_start": mx.array([0.0, 2.0]), "seconds_total": mx.array([5.0, 9.0])},
        mx.arange(T)[None] < mx.array([[T], [11]]),
        mx.array([False, True]),
    )
    results = []
    for checkpoint in (False, True):
        models.dit.checkpoint_blocks = checkpoint
        loss, grads = nn.value_and_grad(model, model.loss)(*args)
        results.append((loss.item(), dict(tree_flatten(grads))))
    models.dit.checkpoint_blocks = False
    (plain_loss, plain), (loss, checkpointed) = results
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    worst = max(rel_err(checkpointed[k], plain[k]) for k in plain)
    print(
        "gradient checkpointing: loss rel. error"
        f" {abs(loss - plain_loss) / plain_loss:.1e}, worst gradient {worst:.1e}"
    )
    assert abs(loss - plain_loss) / plain_loss < 1e-6 and worst < 1e-5


@pytest.mark.parametrize("kind", ["lora", "bora-xs"])
def test_finetuning_resumes_exactly(small_converted, tone_data, tmp_path, kind):
    """Interrupted after 6 of 12 steps (its checkpoint written at 6) and resumed, a run
    ends with the adapter file of an uninterrupted run, bit for bit; a checkpoint of other
    settings is refused. With --grad-checkpoint the same steps give the same adapter.
    (A bora-xs adapter too: its checkpoint holds M and both magnitudes, not the bases.)
    """
    from safetensors.numpy import load_file

    import finetune

    common = [
        "--model",
        str(small_converted),
        "--data",
        str(tone_data),
        "--rank",
        "2",
        "--learning-rate",
        "1e-3",
        "--warmup",
        "3",
        "--batch-size",
        "2",
        "--seed",
        "4",
        "--adapter-type",
        kind,
    ]
    whole, cut = tmp_path / "whole.safetensors", tmp_path / "cut.safetensors"
    assert _main(finetune, [*common, "--output", str(whole), "--steps", "12"]) == ""
    assert (
        _main(finetune, [*common, "--output", str(cut), "--steps", "6"]) == ""
    )  # as if stopped there
    stored = load_file(finetune.checkpoint_path(str(cut)))
    trained = {k.rsplit(".", 1)[1] for k in stored if k.startswith("adapter.")}
    assert trained == {n.lower() for n in lora.TENSORS[kind]}  # never U, V
    other = [
        a if a != "2" or common[i - 1] != "--rank" else "3"
        for i, a in enumerate(common)
    ]
    assert "is of another run: its rank is 2, not 3" in _main(
        finetune, [*other, "--output", str(cut), "--steps", "12", "--resume"]
    )
    assert (
        _main(finetune, [*common, "--output", str(cut), "--steps", "12", "--resume"])
        == ""
    )
    a, b = load_file(whole), load_file(cut)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    checkpointed = tmp_path / "checkpointed.safetensors"
    assert (
        _main(
            finetune,
            [
                *common,
                "--output",
                str(checkpointed),
                "--steps",
                "12",
                "--grad-checkpoint",
            ],
        )
        == ""
    )
    c = load_file(checkpointed)
    assert (
        max(np.abs(a[k].astype(np.float32) - c[k].astype(np.float32)).max() for k in a)
        < 1e-3
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/nowhere"], "does not exist"),
        (["--data", "{tmp}"], "holds no audio files"),
        (["--output", "{tmp}/adapter.bin"], "must end in .safetensors"),
        (["--output", "{tmp}/no/adapter.safetensors"], "does not exist"),
        (["--rank", "0"], "--rank must be >= 1"),
        (["--crop-seconds", "100"], "--crop-seconds must be in"),
        (["--resume"], "no checkpoint"),
        (["--adapter-type", "dora"], "invalid choice"),
        (["--include", "nothing-matches"], "leave no layer to adapt"),
        (["--data", "{silent}"], "Every clip is silent"),
        (
            ["--model", "{quantized}"],
            "is quantized (8 bits); fine-tuning reads the floating-point model",
        ),
        (["--grad-accumulate", "0"], "--grad-accumulate must be >= 1"),
        (["--timestep-sampler", "cosine"], "invalid choice"),
        (
            ["--preview-prompt", "x", "--preview-seconds", "0"],
            "--preview-seconds must be in",
        ),
    ],
)
def test_finetune_refuses_bad_input(
    small_converted, tone_data, tmp_path, args, message
):
    import soundfile as sf

    import finetune

    silent = tmp_path / "silent"
    silent.mkdir()
    sf.write(silent / "quiet.wav", np.zeros(4410, dtype=np.float32), 44100)
    (silent / "quiet.txt").write_text("nothing")
    out = tmp_path / "adapter.safetensors"
    base = [
        "--model",
        str(small_converted),
        "--data",
        str(tone_data),
        "--output",
        str(out),
        "--steps",
        "2",
    ]
    if "{quantized}" in args:
        quantized = tmp_path / "q8"
        convert.convert(
            str(small_converted),
            str(quantized),
            "float32",
            {"group_size": 64, "bits": 8},
        )
    args = [
        a.replace("{tmp}", str(tmp_path))
        .replace("{silent}", str(silent))
        .replace("{quantized}", str(tmp_path / "q8"))
        for a in args
    ]
    before = _listing(tmp_path)
    error = _main(finetune, [*base, *args])
    assert message in error, error
    assert _listing(tmp_path) == before  # nothing written


def test_a_lone_checkpoint_is_not_replaced_unasked(
    small_converted, tone_data, tmp_path
):
    """A checkpoint beside --output (its adapter file gone) is a run's state too: a new
    run refuses to replace it without --force or --resume."""
    import finetune

    out = tmp_path / "adapter.safetensors"
    finetune.checkpoint_path(str(out)).write_bytes(b"a run's state")
    argv = ["--model", str(small_converted), "--data", str(tone_data)]
    error = _main(finetune, [*argv, "--output", str(out), "--steps", "1"])
    assert error == (
        f"error: {finetune.checkpoint_path(str(out))} already exists; choose another"
        " --output, or replace it with --force."
    )
    assert finetune.checkpoint_path(str(out)).read_bytes() == b"a run's state"


@pytest.mark.parametrize("kind", lora.ADAPTER_TYPES)
def test_finetuned_adapter_loads_in_reference(small, tone_data, tmp_path, kind):
    """An adapter of each type trained by finetune.py (on the layers its include/exclude
    pick) loads in 0.0.20's load_and_apply_loras and gives there what it gives here: the
    DiT's output at cfg 7 on the small reference model (the -xs types' reference given
    our bases)."""
    import finetune

    out = tmp_path / "tones.safetensors"
    args = [
        "--model",
        str(small.folder),
        "--data",
        str(tone_data),
        "--output",
        str(out),
        "--steps",
        "12",
        "--rank",
        "4",
        "--adapter-type",
        kind,
        "--learning-rate",
        "5e-3",
        "--warmup",
        "5",
        "--include",
        "layers.1.",
        "--include",
        "seconds_total",
        "--exclude",
        "to_kv",
    ]
    assert _main(finetune, args) == ""
    include = ["layers.1.", "seconds_total"]
    bases = (
        _our_bases(small.model, tmp_path / "bases.pt", 4, include)
        if "xs" in kind
        else None
    )
    with _with_adapters(small, [(out, 1.0, None, "")], bases):
        err, adapted = _adapted_dit_error(small, 7.0)
    plain = _adapted_dit_error(small, 7.0)[1]
    print(
        f"finetune.py's {kind} in 0.0.20: DiT cfg 7 rel. error {err:.2e}; it moves the"
        f" output by {rel_err(adapted, plain):.1e}"
    )
    assert err < PARITY_RTOL and rel_err(adapted, plain) > 1e-3


# ---------------------------------------------------------------- nothing lost, spliced or stranded

FLOAT_FLAGS = (
    "--alpha",
    "--learning-rate",
    "--weight-decay",
    "--crop-seconds",
    "--preview-seconds",
)


@pytest.fixture
def no_loading(monkeypatch):
    """The model's weights may not load: a refusal must come before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(model_io, "load", refuse)


def _run_args(model, data, output, *more) -> list:
    """finetune.py's arguments for a short run of the small model."""
    return [
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(output),
        "--steps",
        "2",
        "--rank",
        "2",
        *more,
    ]


def _finetune_process(argv: list, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / "finetune.py"), *argv], text=True, **kwargs
    )


def test_finetune_files_follow_the_umask(small_converted, tone_data, tmp_path):
    """Under umask 022 the adapter, its checkpoint, the previews and the latent cache
    are 0644, as any program's files are (mkstemp made them 0600)."""
    out = tmp_path / "run" / "adapter.safetensors"
    out.parent.mkdir()
    cache = tmp_path / "cache"
    argv = _run_args(small_converted, tone_data, out, "--cache", str(cache))
    argv += ["--preview-prompt", "low tone", "--preview-seconds", "0.01"]
    process = _finetune_process(
        [*argv, "--preview-steps", "1"], stderr=subprocess.PIPE, umask=0o022
    )
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.parent.iterdir()}
    modes.update({p.name: oct(p.stat().st_mode & 0o777) for p in cache.iterdir()})
    assert len(modes) == 7 and set(modes.values()) == {"0o644"}, modes


@pytest.mark.parametrize("case", ["checkpoint", "preview", "long name", "read-only"])
def test_finetune_checks_every_output_before_work(
    small_converted, tone_data, tmp_path, no_loading, case
):
    """An output the run could not write (the checkpoint's or a preview's name taken by
    a folder, a name too long once the temporary suffix is added, a read-only folder) is
    refused in one line before the model loads, not after the training."""
    import os

    import finetune

    folder = tmp_path / "run"
    folder.mkdir()
    out = folder / ("a" * 220 if case == "long name" else "adapter")
    out = out.with_suffix(".safetensors")
    argv = _run_args(small_converted, tone_data, out)
    message = "is a folder"
    if case == "checkpoint":
        finetune.checkpoint_path(str(out)).mkdir()
    elif case == "preview":
        argv += ["--preview-prompt", "low tone", "--preview-every", "5"]
        finetune.preview_path(str(out), 2).mkdir()
    elif case == "long name":  # the adapter's temporary name fits; the checkpoint's not
        message = f"Cannot write {finetune.checkpoint_path(str(out))}: File name too"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        message = "Permission denied"
        folder.chmod(0o555)
    before = _listing(tmp_path)
    try:
        error = _main(finetune, argv)
    finally:
        folder.chmod(0o755)
    assert message in error, error
    assert _listing(tmp_path) == before


def test_finetune_names_a_full_disk(small_converted, tone_data, tmp_path, monkeypatch):
    """A write that fails for want of space (MLX says only "System error") names the
    file and the full disk, in one line, and leaves no partial file."""
    import shutil
    import types

    import finetune

    def full(path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[save_safetensors] System error.")

    monkeypatch.setattr(mx, "save_safetensors", full)
    free = types.SimpleNamespace(total=10**9, used=10**9, free=0)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free)
    out = tmp_path / "run" / "adapter.safetensors"
    out.parent.mkdir()
    argv = _run_args(small_converted, tone_data, out, "--no-cache", "--save-every", "1")
    assert _main(finetune, argv) == (
        f"error: Cannot write {out}: the disk is full. Free some space and retry."
    )
    assert list(out.parent.iterdir()) == []


def test_finetune_refuses_numbers_that_are_not_finite(
    small_converted, tone_data, tmp_path, no_loading
):
    """Every float flag of finetune.py refuses inf, -inf, nan and 1e400 in argparse's
    one line (--crop-seconds inf was a traceback, --weight-decay nan a diverged loss).
    """
    import finetune
    from stable_audio.cli import number

    actions = finetune.arguments()._actions
    typed = {a.option_strings[-1]: a.type for a in actions if a.type in (float, number)}
    assert typed == dict.fromkeys(FLOAT_FLAGS, number)
    argv = _run_args(small_converted, tone_data, tmp_path / "adapter.safetensors")
    for flag in FLOAT_FLAGS:
        for value in ("inf", "-inf", "nan", "1e400"):
            error = _main(finetune, [*argv, "--preview-prompt", "x", f"{flag}={value}"])
            assert error.startswith(
                f"error: argument {flag}: expected a finite number"
            ), error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--alpha", "0", "--alpha must be > 0."),
        ("--learning-rate", "-1e-4", "--learning-rate must be > 0."),
        ("--weight-decay", "-0.1", "--weight-decay must be >= 0."),
        ("--crop-seconds", "-1", "--crop-seconds must be > 0."),
        ("--crop-seconds", "1e308", "--crop-seconds must be in (0, 0.01]"),
        ("--preview-seconds", "0", "--preview-seconds must be in (0, 0.01]"),
        ("--preview-seconds", "1e308", "--preview-seconds must be in (0, 0.01]"),
        ("--seed", "-1", "--seed must be in [0, 2**64)."),
        ("--seed", str(2**64), "--seed must be in [0, 2**64)."),
    ],
)
def test_finetune_refuses_numbers_out_of_range(
    small_converted, tone_data, tmp_path, no_loading, flag, value, message
):
    import finetune

    argv = _run_args(small_converted, tone_data, tmp_path / "adapter.safetensors")
    error = _main(finetune, [*argv, "--preview-prompt", "x", f"{flag}={value}"])
    assert error.startswith(f"error: {message}"), error
    assert list(tmp_path.iterdir()) == []


def test_finetune_bounds_the_rank_and_its_memory(
    small_converted, tone_data, tmp_path, monkeypatch, no_loading
):
    """A rank beyond every adapted layer's smaller side is refused with the figure
    (--rank 100000 took 23.5 GB and was killed), and adapters whose training state would
    not fit in the machine's memory too, before the model loads."""
    import os

    import finetune

    argv = _run_args(small_converted, tone_data, tmp_path / "adapter.safetensors")
    assert _main(finetune, [*argv, "--rank", "100000"]) == (
        "error: --rank must be in [1, 257]: no layer adapted has a smaller side above"
        " that (conditioners.seconds_start.embedder.embedding.1 is 768 x 257)."
    )
    blocks = ["--include", "transformer.layers.0.", "--exclude", "to_kv"]
    assert "--rank must be in [1, 256]: no layer adapted" in _main(
        finetune, [*argv, *blocks, "--rank", "257"]
    )
    assert _main(finetune, [*argv, "--adapter-type", "bora-xs", "--rank", "9"]) == (
        "error: --rank must be in [1, 8]: an -xs adapter's bases are singular vectors,"
        " as many as each layer's smaller side, and model.preprocess_conv is 8 x 8."
    )  # the small model's 8 latent channels
    sysconf = os.sysconf
    pages = lambda name: 256 if name == "SC_PHYS_PAGES" else sysconf(name)
    monkeypatch.setattr(os, "sysconf", pages)
    assert _main(finetune, [*argv, "--rank", "8"]) == (
        f"error: --rank 8 needs 2.73 MB for the adapters' training state (170,384"
        f" parameters), more than this machine's {256 * sysconf('SC_PAGE_SIZE') / 1e6:.2f}"
        " MB; lower --rank or adapt fewer layers (--include, --exclude)."
    )
    monkeypatch.setattr(os, "sysconf", sysconf)
    with pytest.raises(AssertionError, match="loaded"):  # allowed: on to loading
        _main(finetune, [*argv, "--rank", "8"])


def test_captions_that_are_not_utf8_are_named(tmp_path):
    """A caption or metadata file that is not UTF-8 is refused naming the file (it was
    "'utf-8' codec can't decode byte 0xff ..."); a byte-order mark is not caption."""
    import soundfile as sf

    from stable_audio import datasets

    sf.write(tmp_path / "a.wav", np.full(4410, 0.5, dtype=np.float32), 44100)
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbflow tone\r\n")
    assert datasets.find_clips(tmp_path)[0][1] == "low tone"
    (tmp_path / "a.txt").write_bytes("low tone, café".encode("latin-1"))
    with pytest.raises(
        ValueError,
        match=r"a\.txt is not UTF-8 text \(byte 0xe9 at position 13\); save it as UTF-8",
    ):
        datasets.find_clips(tmp_path)
    for name, text in (("metadata.jsonl", '{"file": "a.wav"}'), ("metadata.csv", "")):
        (tmp_path / name).write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))
        with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text \(byte 0xff"):
            datasets.find_clips(tmp_path)
        (tmp_path / name).unlink()


def test_resume_knows_its_data_folder_however_named(
    small_converted, tone_data, tmp_path, monkeypatch
):
    """--resume compares the data folder as a folder, not as text: "data/", "./data" and
    the absolute path are one run (they were "another run"); another folder is not."""
    import finetune

    data = _copy_folder(tone_data, tmp_path / "data")
    out = tmp_path / "run" / "adapter.safetensors"
    out.parent.mkdir()
    argv = _run_args(small_converted, data, out)
    assert _main(finetune, argv) == ""
    monkeypatch.chdir(tmp_path)
    for steps, spelling in ((3, "data/"), (4, "./data")):
        resumed = [*argv, "--data", spelling, "--steps", str(steps), "--resume"]
        assert _main(finetune, resumed) == ""
    other = [*argv, "--data", str(tone_data), "--steps", "5", "--resume"]
    assert "is of another run: its data is" in _main(finetune, other)


def test_previews_are_kept_out_of_the_data(
    small_converted, tone_data, tmp_path, monkeypatch, no_loading
):
    """--preview-prompt with an --output in the data folder is refused before work: the
    previews would be taken for training files by the next run ("... has no caption").
    """
    import finetune

    data = _copy_folder(tone_data, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    argv = _run_args(small_converted, "data/", "./data/adapter.safetensors")
    before = _listing(tmp_path)
    assert _main(finetune, [*argv, "--preview-prompt", "low tone"]) == (
        "error: --preview-prompt would write its previews into the data folder data/,"
        " where the next run would take them for training files; choose an --output"
        " outside --data."
    )
    assert _listing(tmp_path) == before
    with pytest.raises(AssertionError, match="loaded"):  # without previews: allowed
        _main(finetune, argv)
    assert data.is_dir()


def test_an_interrupt_while_saving_waits_for_both_files(
    small_converted, tone_data, tmp_path, monkeypatch
):
    """Ctrl-C (SIGTERM, SIGHUP) while the adapter is written waits until the adapter and
    its checkpoint are whole, then stops the run: no adapter without the checkpoint of its
    step, nothing half-made; the run resumes."""
    import os
    import signal

    import finetune

    save = mx.save_safetensors

    def interrupted(path, *args, **kwargs):
        if not (tmp_path / "sent").exists():
            (tmp_path / "sent").touch()
            os.kill(os.getpid(), signal.SIGINT)
        save(path, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", interrupted)
    out = tmp_path / "run" / "adapter.safetensors"
    out.parent.mkdir()
    argv = _run_args(small_converted, tone_data, out, "--no-cache", "--save-every", "1")
    with pytest.raises(SystemExit) as stop:
        finetune.main([*argv, "--steps", "5"])
    assert stop.value.code == finetune.INTERRUPTED
    checkpoint = finetune.checkpoint_path(str(out))
    assert sorted(out.parent.iterdir()) == [checkpoint, out]
    assert mx.load(str(checkpoint), return_metadata=True)[1]["step"] == "1"
    monkeypatch.setattr(mx, "save_safetensors", save)
    assert _main(finetune, [*argv, "--steps", "2", "--resume"]) == ""


def test_sigterm_leaves_no_partial_files_and_the_run_resumes(
    small_converted, tone_data, tmp_path
):
    """SIGTERM to a training run writing a checkpoint every step: it stops with the
    Ctrl-C line, leaving the adapter and its checkpoint whole and nothing else, and the
    checkpoint resumes."""
    import signal
    import time

    import finetune

    out = tmp_path / "run" / "adapter.safetensors"
    out.parent.mkdir()
    argv = _run_args(small_converted, tone_data, out, "--no-cache", "--save-every", "1")
    checkpoint = finetune.checkpoint_path(str(out))
    with open(tmp_path / "log", "w") as log:
        process = _finetune_process(
            [*argv, "--steps", "100000"], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # some steps, and their writes, further
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
    output = (tmp_path / "log").read_text()
    assert process.returncode == 1 and output.rstrip().endswith(finetune.INTERRUPTED)
    assert sorted(p.name for p in out.parent.iterdir()) == [
        checkpoint.name,
        out.name,
    ]
    step = int(mx.load(str(checkpoint), return_metadata=True)[1]["step"])
    assert step >= 1
    assert _main(finetune, [*argv, "--steps", str(step + 1), "--resume"]) == ""

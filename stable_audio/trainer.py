"""LoRA fine-tuning: trainable adapters on the DiT and the seconds conditioners, and the
training objective of stable-audio-tools 0.0.20's DiffusionCondTrainingWrapper
(stable_audio_tools/training/diffusion.py, DiffusionCondTrainingWrapper) with its
defaults: cfg dropout of the cross-attention tokens, and the MSE over the valid
(unpadded) latent frames."""

import math
from functools import partial
from statistics import NormalDist

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from . import lora

TIMESTEP_SAMPLERS = (
    "uniform",
    "logit_normal",
    "trunc_logit_normal",
    "log_snr",
    "log_snr_uniform",
)


def sample_timesteps(
    sampler: str, count: int, rng: np.random.Generator, first: int = 0, shift: int = 0
) -> np.ndarray:
    """`count` diffusion times t in [0, 1] as 0.0.20's `timestep_sampler`s draw them
    (training/diffusion.py:584-600, inference/sampling.py:287-365, their default
    options). "uniform" is 0.0.20's scrambled Sobol sequence: in one dimension, the
    base-2 radical inverse of the draw's number, here scrambled by a digital shift (XOR
    with `shift`, one per run) and numbered from `first` (the draws the run made
    before), so each 2^k consecutive draws of a run are spread evenly over [0, 1]. The
    others draw from `rng`.
    """
    if sampler == "uniform":
        index = np.arange(first, first + count, dtype=np.uint64)
        reversed_bits = np.zeros(count, dtype=np.uint64)
        for bit in range(32):
            reversed_bits |= ((index >> np.uint64(bit)) & np.uint64(1)) << np.uint64(
                31 - bit
            )
        return (
            (reversed_bits ^ np.uint64(shift & 0xFFFFFFFF)).astype(np.float64) + 0.5
        ) / 2**32
    if sampler == "logit_normal":
        return 1 / (1 + np.exp(-rng.standard_normal(count)))
    if sampler == "trunc_logit_normal":
        # sigmoid(z), z ~ N(0, 1) truncated to its part above logit(0.075), rescaled and
        # flipped
        left = 0.075
        normal = NormalDist()
        lower = normal.cdf(math.log(left / (1 - left)))
        z = np.array(
            [normal.inv_cdf(lower + (1 - lower) * u) for u in rng.uniform(size=count)]
        )
        return 1 - (1 / (1 + np.exp(-z)) - left) / (1 - left)
    if sampler == "log_snr":
        return np.clip(
            1 / (1 + np.exp(rng.standard_normal(count) * 2.0 - 1.2)), 1e-4, 1 - 1e-4
        )
    if sampler == "log_snr_uniform":
        return np.clip(
            1 / (1 + np.exp(rng.uniform(size=count) * 11.0 - 6.0)), 1e-4, 1 - 1e-4
        )
    raise ValueError(
        f"Unknown timestep sampler {sampler!r}; choose from"
        f" {', '.join(TIMESTEP_SAMPLERS)}."
    )


class FineTuned(nn.Module):
    """The DiT and the conditioner with trainable adapters on the layers that
    `include`/`exclude` (0.0.20's patterns) pick, everything else frozen. The adapters,
    of any of 0.0.20's types, start as its do (lora.initial_tensors), so the model
    starts as the base model."""

    def __init__(
        self,
        dit,
        conditioner,
        objective: str,
        rank: int = 8,
        alpha: float = None,
        adapter_type: str = "lora",
        include=None,
        exclude=None,
        key=None,
    ):
        super().__init__()
        self.dit, self.conditioner = dit, conditioner
        self.objective = objective
        # "_" keeps these out of the parameter tree
        self._lora_config = {
            "rank": rank,
            "alpha": rank if alpha is None else alpha,
            "adapter_type": adapter_type,
        }
        self._lora_config.update(
            {
                k: v
                for k, v in (("include", include), ("exclude", exclude))
                if v is not None
            }
        )
        names = lora.official_layers(len(dit.layers), conditioner.numbers)
        tensors = lora.initial_tensors(
            dit, conditioner, rank, adapter_type, include, exclude, key
        )
        if not tensors:
            raise ValueError("The include/exclude patterns leave no layer to adapt.")
        self.freeze()
        modules = {"dit": dit, "conditioner": conditioner}
        wrapped = {"dit": [], "conditioner": []}
        self._layer_names = (
            {}
        )  # our path ("dit.layers.0.ff.proj") -> official layer name
        for name, t in tensors.items():
            component, path = names[name]
            layer = lora._module(modules[component], path)
            scale = self._lora_config["alpha"] / rank
            adapter = lora.LoRALinear(layer, adapter_type, t, scale, frozen=False)
            trained = [n.lower() for n in lora.TENSORS[adapter_type]]  # not U, V
            adapter.freeze(recurse=False).unfreeze(keys=trained, recurse=False)
            wrapped[component].append((path, adapter))
            self._layer_names[f"{component}.{path}"] = name
        for component, items in wrapped.items():
            if items:
                modules[component].update_modules(tree_unflatten(items))

    @property
    def lora_config(self) -> dict:
        """The adapter file's metadata, as 0.0.20's trainer writes it."""
        return dict(self._lora_config)

    def adapter_tensors(self) -> dict:
        """{official layer name: {tensor name: array}}, as lora.save_adapter writes
        them."""
        kind = self._lora_config["adapter_type"]
        return {
            name: {n: lora._module(self, path)[n.lower()] for n in lora.TENSORS[kind]}
            for path, name in self._layer_names.items()
        }

    def loss(
        self, latents, t, noise, text, text_mask, seconds: dict, loss_mask, dropped
    ) -> mx.array:
        """0.0.20's training loss for latents x0 (B, T, C) at times t (B,) with noise
        eps: x_t = alpha x0 + sigma eps and the target alpha eps - sigma x0
        (v: alpha, sigma = cos, sin of pi t / 2), or x_t = (1 - t) x0 + t eps and the
        target eps - x0 (flow). `text`/`text_mask` are T5's output and mask, `seconds`
        the number conditions; where `dropped` (B,) the cross-attention tokens are all
        zeros (cfg dropout; the global token is kept). Each sample's squared error is
        averaged over its valid latents (`loss_mask` (B, T)) and channels, then over the
        batch."""
        cross, global_cond = self.conditioner(text, text_mask, **seconds)
        cross = mx.where(dropped[:, None, None], mx.zeros_like(cross), cross)
        t = t.astype(mx.float32)
        if self.objective == "v":
            alpha, sigma = mx.cos(t * math.pi / 2), mx.sin(t * math.pi / 2)
        else:
            alpha, sigma = 1 - t, t
        alpha, sigma = alpha[:, None, None], sigma[:, None, None]
        noised = latents * alpha + noise * sigma
        target = (
            noise * alpha - latents * sigma
            if self.objective == "v"
            else noise - latents
        )
        output = self.dit(noised, t, self.dit.prepare_conditioning(cross, global_cond))
        squared = mx.where(loss_mask[:, :, None], (output - target) ** 2, 0.0)
        count = loss_mask.sum(axis=1) * latents.shape[-1]
        return mx.mean(squared.sum(axis=(1, 2)) / (count + 1e-8))


def training_step(model: FineTuned, optimizer):
    """The training step: `step(batches)` takes one tuple of step inputs per micro-batch
    (see `gradients`), sums their gradients, averages them over the processes under
    `mlx.launch` (nn.average_gradients: alone, a no-op) and updates the adapters. With
    one micro-batch the whole step (posterior sample, loss, gradients, update) is one
    compiled function; with several, each micro-batch's gradients are evaluated before
    the next, so memory stays that of one. Returns the loss, averaged over micro-batches
    and processes.
    """
    state = [model.state, optimizer.state]
    world = mx.distributed.init().size()

    def gradients(
        mean,
        std,
        posterior_noise,
        t,
        noise,
        text,
        text_mask,
        starts,
        totals,
        loss_mask,
        dropped,
    ):
        latents = (
            mean + std * posterior_noise
        )  # as 0.0.20's encoder samples its posterior
        numbers = {"seconds_start": starts, "seconds_total": totals}
        numbers = {k: v for k, v in numbers.items() if k in model.conditioner.numbers}
        return nn.value_and_grad(model, model.loss)(
            latents, t, noise, text, text_mask, numbers, loss_mask, dropped
        )

    def update(loss, grads):
        if world > 1:
            loss = mx.distributed.all_sum(loss) / world
        optimizer.update(model, nn.average_gradients(grads))
        return loss

    @partial(mx.compile, inputs=state, outputs=state)
    def fused(*batch):
        return update(*gradients(*batch))

    compiled_gradients = mx.compile(
        gradients, inputs=state, outputs=state
    )  # value_and_grad writes the model
    compiled_update = mx.compile(update, inputs=state, outputs=state)

    def step(batches):
        if len(batches) == 1:
            return fused(*batches[0])
        loss, grads = compiled_gradients(*batches[0])
        for batch in batches[1:]:
            mx.eval(loss, grads)
            more_loss, more = compiled_gradients(*batch)
            loss, grads = loss + more_loss, tree_map(mx.add, grads, more)
        return compiled_update(
            loss / len(batches), tree_map(lambda g: g / len(batches), grads)
        )

    return step

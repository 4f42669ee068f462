"""k-diffusion's samplers over a v-objective model, as stable-audio-tools runs them.

Noise levels are k-diffusion sigmas (0.3 to 500 by default). Each sampler is a generator
that yields the latents after every step; the step coefficients depend only on the
sigmas, so they are Python floats.
"""

import math

import mlx.core as mx
import numpy as np

SAMPLERS = ("dpmpp-3m-sde", "dpmpp-2m-sde", "dpmpp-2m", "euler")


def polyexponential_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0):
    """`steps` noise levels from sigma_max to sigma_min, log-linear for rho = 1, then 0."""
    ramp = np.linspace(1, 0, steps) ** rho
    sigmas = np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return [float(s) for s in sigmas] + [0.0]


def v_denoiser(model):
    """k-diffusion's VDenoiser: `model(x, t)` predicts v; returns the denoised estimate."""

    def denoise(x: mx.array, sigma: float) -> mx.array:
        c_skip = 1 / (sigma**2 + 1)
        c_out = -sigma / math.sqrt(sigma**2 + 1)
        c_in = 1 / math.sqrt(sigma**2 + 1)
        t = mx.full((x.shape[0],), math.atan(sigma) * 2 / math.pi)
        return model(x * c_in, t) * c_out + x * c_skip

    return denoise


def euler(denoise, x, sigmas, noise=None):
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        denoised = denoise(x, sigma)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
        yield x


def dpmpp_2m(denoise, x, sigmas, noise=None):
    """DPM-Solver++(2M)."""
    old_denoised = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            if old_denoised is not None:
                r = math.log(sigmas[i - 1] / sigma) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            else:
                denoised_d = denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
        old_denoised = denoised
        yield x


def dpmpp_2m_sde(denoise, x, sigmas, noise, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE, midpoint variant. `noise(sigma, sigma_next)` gives N(0, 1)."""
    old_denoised, h_last = None, None
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            eta_h = eta * h
            x = sigma_next / sigma * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                x = x - 0.5 * math.expm1(-h - eta_h) * (h / h_last) * (denoised - old_denoised)
            if eta:
                scale = sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
                x = x + noise(sigma, sigma_next) * scale
            h_last = h
        old_denoised = denoised
        yield x


def dpmpp_3m_sde(denoise, x, sigmas, noise, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE. `noise(sigma, sigma_next)` gives N(0, 1)."""
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                scale = sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
                x = x + noise(sigma, sigma_next) * scale
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = (h if sigma_next else None), h_1
        yield x


def sample(name: str, denoise, x, sigmas, noise):
    """Run sampler `name`, yielding the latents after each step."""
    samplers = {
        "dpmpp-3m-sde": dpmpp_3m_sde,
        "dpmpp-2m-sde": dpmpp_2m_sde,
        "dpmpp-2m": dpmpp_2m,
        "euler": euler,
    }
    if name not in samplers:
        raise ValueError(f"Unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    return samplers[name](denoise, x, sigmas, noise)

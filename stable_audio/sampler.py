"""k-diffusion's samplers over a v-objective model, as stable-audio-tools runs them.

Noise levels are k-diffusion sigmas (0.3 to 500 by default). Every sampler here is a
linear multistep method: with D the denoised estimate at this step and D1, D2 those of
the two steps before,

    x_next = A x + B0 D + B1 D1 + B2 D2 + S noise

where A, B0, B1, B2 and S depend only on the sigmas. They are computed in float64 on the
host, once per generation, so that one step function (compiled once, if asked) serves
every sampler and every step.
"""

import math

import mlx.core as mx
import numpy as np


def polyexponential_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0):
    """`steps` noise levels from sigma_max to sigma_min, log-linear for rho = 1, then 0."""
    ramp = np.linspace(1, 0, steps) ** rho
    sigmas = np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return [float(s) for s in sigmas] + [0.0]


def euler(sigmas):
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        yield sigma_next / sigma, 1 - sigma_next / sigma, 0.0, 0.0, 0.0


def dpmpp_2m(sigmas):
    """DPM-Solver++(2M)."""
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
        if sigma_next == 0:
            yield 0.0, 1.0, 0.0, 0.0, 0.0
            continue
        h = math.log(sigma / sigma_next)
        b = -math.expm1(-h)
        if i == 0:
            yield sigma_next / sigma, b, 0.0, 0.0, 0.0
        else:
            r = math.log(sigmas[i - 1] / sigma) / h
            yield sigma_next / sigma, b * (1 + 1 / (2 * r)), -b / (2 * r), 0.0, 0.0


def dpmpp_2m_sde(sigmas, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE, the midpoint variant (k-diffusion's default)."""
    h_last = None
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        if sigma_next == 0:
            yield 0.0, 1.0, 0.0, 0.0, 0.0
            continue
        h = math.log(sigma / sigma_next)
        b = -math.expm1(-h - eta * h)
        a, b0, b1 = sigma_next / sigma * math.exp(-eta * h), b, 0.0
        if h_last is not None:
            c = 0.5 * b * h / h_last
            b0, b1 = b0 + c, -c
        noise = sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
        yield a, b0, b1, 0.0, noise
        h_last = h


def dpmpp_3m_sde(sigmas, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE, stable-audio-tools' default."""
    h_1 = h_2 = None
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        if sigma_next == 0:
            yield 0.0, 1.0, 0.0, 0.0, 0.0
            continue
        h = math.log(sigma / sigma_next)
        h_eta = h * (eta + 1)
        a, b0, b1, b2 = math.exp(-h_eta), -math.expm1(-h_eta), 0.0, 0.0
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if h_2 is not None:
            # x += phi_2 d1 - phi_3 d2 (k-diffusion), expanded over D, D1 and D2
            r0, r1 = h_1 / h, h_2 / h
            phi_3 = phi_2 / h_eta - 0.5
            k = r0 / (r0 + r1)
            alpha = phi_2 * (1 + k) - phi_3 / (r0 + r1)
            beta = phi_2 * k - phi_3 / (r0 + r1)
            b0, b1, b2 = b0 + alpha / r0, -alpha / r0 - beta / r1, beta / r1
        elif h_1 is not None:
            b0, b1 = b0 + phi_2 * h / h_1, -phi_2 * h / h_1
        noise = sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        yield a, b0, b1, b2, noise
        h_1, h_2 = h, h_1


SAMPLERS = {
    "dpmpp-3m-sde": dpmpp_3m_sde,
    "dpmpp-2m-sde": dpmpp_2m_sde,
    "dpmpp-2m": dpmpp_2m,
    "euler": euler,
}


def step_coefficients(sampler: str, sigmas: list) -> list:
    """Per step: [c_in, c_skip, c_out, t, A, B0, B1, B2, S] as Python floats.

    The first four are k-diffusion's VDenoiser: the model sees c_in x at time
    t = atan(sigma) 2 / pi and D = c_skip x + c_out v."""
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    steps = []
    for sigma, update in zip(sigmas, SAMPLERS[sampler](sigmas)):
        denoiser = (
            1 / math.sqrt(sigma**2 + 1),
            1 / (sigma**2 + 1),
            -sigma / math.sqrt(sigma**2 + 1),
            math.atan(sigma) * 2 / math.pi,
        )
        steps.append(denoiser + tuple(update))
    return steps


def step(model, x, d1, d2, noise, k):
    """One sampler step. `model(x, t)` predicts v; `k` holds step_coefficients() for this
    step as an array. Returns the new latents and the history (D, D1)."""
    c_in, c_skip, c_out, t, a, b0, b1, b2, s = (k[i] for i in range(9))
    v = model(x * c_in, mx.broadcast_to(t, (x.shape[0],)))
    denoised = v * c_out + x * c_skip
    return a * x + b0 * denoised + b1 * d1 + b2 * d2 + s * noise, denoised, d1

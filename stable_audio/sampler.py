"""The samplers of stable-audio-tools: k-diffusion's over a v-objective model (SAO 1.0),
ping-pong over a rectified-flow model (SAO Small).

Noise levels are k-diffusion sigmas (0.3 to 500 by default) for v models and flow times
t in [0, 1] for rectified flow. Every sampler here is a linear multistep method: with D
the denoised estimate at this step and D1, D2 those of the two steps before,

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


def flow_times(steps: int, t_max: float = 1.0):
    """stable-audio-tools' ping-pong schedule: t = sigmoid(-logSNR), logSNR evenly spaced
    up to 2, starting at t_max and ending at 0."""
    logsnr_max = math.log((1 - t_max) / t_max + 1e-6) if t_max < 1 else -6.0
    t = 1 / (1 + np.exp(np.linspace(logsnr_max, 2, steps + 1)))
    return [t_max] + [float(v) for v in t[1:-1]] + [0.0]


def pingpong(times):
    """Denoise fully, then re-noise to the next time with fresh noise."""
    for t_next in times[1:]:
        yield 0.0, 1 - t_next, 0.0, 0.0, t_next


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
FLOW_SAMPLERS = {"pingpong": pingpong}


def schedule(objective: str, steps: int, sigma_min: float, sigma_max: float) -> list:
    """The noise levels of a generation, for the model's objective."""
    if objective == "v":
        return polyexponential_sigmas(steps, sigma_min, sigma_max)
    return flow_times(steps, min(sigma_max, 1.0))


def noised(objective: str, latents, noise, sigma):
    """Clean latents brought to noise level `sigma`, as the sampler sees them."""
    if objective == "v":
        return latents + sigma * noise
    return (1 - sigma) * latents + sigma * noise


def step_coefficients(sampler: str, sigmas: list, objective: str = "v") -> list:
    """Per step: [c_in, c_skip, c_out, t, A, B0, B1, B2, S] as Python floats.

    The first four are the denoiser: the model sees c_in x at time t, and D = c_skip x +
    c_out v. For v (k-diffusion's VDenoiser) t = atan(sigma) 2 / pi; for rectified flow
    the model sees x at t itself and D = x - t v."""
    samplers = SAMPLERS if objective == "v" else FLOW_SAMPLERS
    if sampler not in samplers:
        raise ValueError(f"Unknown sampler {sampler!r} for this model; choose one of {', '.join(samplers)}.")
    steps = []
    for sigma, update in zip(sigmas, samplers[sampler](sigmas)):
        if objective == "v":
            denoiser = (
                1 / math.sqrt(sigma**2 + 1),
                1 / (sigma**2 + 1),
                -sigma / math.sqrt(sigma**2 + 1),
                math.atan(sigma) * 2 / math.pi,
            )
        else:
            denoiser = (1.0, 1.0, -sigma, sigma)
        steps.append(denoiser + tuple(update))
    return steps


def step(model, x, d1, d2, noise, k):
    """One sampler step. `model(x, t)` predicts v; `k` holds step_coefficients() for this
    step as an array. Returns the new latents and the history (D, D1)."""
    c_in, c_skip, c_out, t, a, b0, b1, b2, s = (k[i] for i in range(9))
    v = model(x * c_in, mx.broadcast_to(t, (x.shape[0],)))
    denoised = v * c_out + x * c_skip
    return a * x + b0 * denoised + b1 * d1 + b2 * d2 + s * noise, denoised, d1

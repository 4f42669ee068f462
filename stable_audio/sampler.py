"""The samplers of stable-audio-tools 0.0.20 (with the k-diffusion math it vendors) and
their noise schedules, for v-objective models (SAO 1.0) and rectified flow (SAO Small).

Every sampler here is linear in the latents. A step is one or more model evaluations
(two for Heun, DPM-2 and DPM++(2S), four for RK4), and each evaluation is

    y = P . (x, h1, h2, h3)                         the point the model sees
    v = model(c_in y, t),  D = c_skip y + c_out v   its prediction and denoised estimate
    (x, h1, h2, h3) <- Q . (x, h1, h2, h3, D, v, vu, noise)

with x the latents, h1..h3 what the sampler keeps (earlier estimates or derivatives), vu
the unconditional prediction (v-DDIM-CFG++ uses it) and noise N(0, 1). P, Q and the
denoiser's c_in, c_skip, c_out and t depend only on the noise levels: they are computed
in float64 on the host, once per generation, so that one step function (compiled once,
if asked) serves every sampler and every step.

Each sampler works in a space, which fixes its denoiser and how latents are noised:
"k" (k-diffusion's, x = x0 + sigma eps, the model wrapped in a VDenoiser), "vp" (v-DDIM,
x = cos(pi t / 2) x0 + sin(pi t / 2) eps) and "flow" (x = (1 - t) x0 + t eps).
"""

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

STATE = ("x", "h1", "h2", "h3")
TERMS = STATE + ("D", "v", "vu", "noise")


@dataclass
class Evaluation:
    sigma: float  # the noise level the model is evaluated at, in the space's units
    at: dict  # the point evaluated, as {name in STATE: coefficient}
    update: dict  # the new x, as {name in TERMS: coefficient}
    keep: (
        tuple
    ) = ()  # the new h1, h2, ... (each as `update`); the others stay as they are


def _eval(sigma, update, keep=(), at=None) -> Evaluation:
    return Evaluation(sigma, at or {"x": 1.0}, update, keep)


def _pairs(sigmas):
    return zip(sigmas, sigmas[1:])


# ---------------------------------------------------------------- schedules


def polyexponential_sigmas(
    steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0
):
    """k-diffusion's: `steps` noise levels from sigma_max to sigma_min, log-linear for
    rho = 1, then 0."""
    ramp = np.linspace(1, 0, steps) ** rho
    sigmas = np.exp(
        ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)
    )
    return [float(s) for s in sigmas] + [0.0]


def linear_times(steps: int, t_max: float = 1.0):
    """v-DDIM's: times evenly spaced from t_max down to 0."""
    return [float(t) for t in np.linspace(t_max, 0, steps + 1)]


# The log-SNR grids of the flow and DDIM paths: 0.0.20's default LogSNRShift (rate 0, so
# independent of the length), and the grid of 0.0.19's flow sampler
LOGSNR_SCHEDULES = {"0.0.20": -6.2, "0.0.19": -6.0}
LOGSNR_END = 2.0


def logsnr_times(steps: int, t_max: float = 1.0, schedule: str = "0.0.20"):
    """Times t = sigmoid(-logSNR), logSNR evenly spaced from the schedule's start up
    to 2, beginning at t_max and ending at 0: for t_max = 1, 0.0.20's
    t = sigmoid(8.2 u - 2) on u evenly spaced from 1 to 0
    (stable_audio_tools/inference/sampling.py, LogSNRShift), or 0.0.19's grid.

    Below 1 (init audio) the grid starts at t_max's own log-SNR, as 0.0.19 did, so that
    the noise only falls; 0.0.20 maps its shortened u grid through the same curve, which
    re-noises above t_max at the second step. A t_max whose log-SNR is above 2 (t_max <
    0.12) stays there until the last step."""
    start = (
        LOGSNR_SCHEDULES[schedule]
        if t_max >= 1
        else math.log((1 - t_max) / t_max + 1e-6)
    )
    t = 1 / (1 + np.exp(np.linspace(start, max(start, LOGSNR_END), steps + 1)))
    return [t_max] + [float(v) for v in t[1:-1]] + [0.0]


# ---------------------------------------------------------------- k-diffusion, v models


def dpmpp_2m(sigmas):
    """DPM-Solver++(2M)."""
    for i, (sigma, sigma_next) in enumerate(_pairs(sigmas)):
        if sigma_next == 0:
            yield [_eval(sigma, {"D": 1.0})]
            continue
        h = math.log(sigma / sigma_next)
        b = -math.expm1(-h)
        update = {"x": sigma_next / sigma, "D": b}
        if i > 0:
            r = math.log(sigmas[i - 1] / sigma) / h
            update.update(D=b * (1 + 1 / (2 * r)), h1=-b / (2 * r))
        yield [_eval(sigma, update, keep=({"D": 1.0},))]


def dpmpp_2m_sde(sigmas, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE, the midpoint variant (k-diffusion's default)."""
    h_last = None
    for sigma, sigma_next in _pairs(sigmas):
        if sigma_next == 0:
            yield [_eval(sigma, {"D": 1.0})]
            continue
        h = math.log(sigma / sigma_next)
        b = -math.expm1(-h - eta * h)
        update = {"x": sigma_next / sigma * math.exp(-eta * h), "D": b}
        if h_last is not None:
            c = 0.5 * b * h / h_last
            update.update(D=b + c, h1=-c)
        update["noise"] = sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
        yield [_eval(sigma, update, keep=({"D": 1.0},))]
        h_last = h


def dpmpp_3m_sde(sigmas, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE, stable-audio-tools' default; h1, h2 hold the last two D."""
    h_1 = h_2 = None
    for sigma, sigma_next in _pairs(sigmas):
        if sigma_next == 0:
            yield [_eval(sigma, {"D": 1.0})]
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
        update = {"x": a, "D": b0, "h1": b1, "h2": b2, "noise": noise}
        yield [_eval(sigma, update, keep=({"D": 1.0}, {"h1": 1.0}))]
        h_1, h_2 = h, h_1


def _lms_coefficient(order: int, sigmas, i: int, j: int) -> float:
    """The integral from sigmas[i] to sigmas[i + 1] of the Lagrange basis polynomial of
    sigmas[i - j] over sigmas[i], ..., sigmas[i - order + 1]: k-diffusion integrates it
    numerically, we exactly."""
    basis = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis *= np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (
                sigmas[i - j] - sigmas[i - k]
            )
    integral = basis.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


def k_lms(sigmas, order=4):
    """Linear multistep on the derivatives d = (x - D) / sigma; h1..h3 hold the last
    three."""
    for i, (sigma, sigma_next) in enumerate(_pairs(sigmas)):
        c = [
            _lms_coefficient(min(i + 1, order), sigmas, i, j)
            for j in range(min(i + 1, order))
        ]
        update = {"x": 1 + c[0] / sigma, "D": -c[0] / sigma}
        update.update({f"h{j}": c[j] for j in range(1, len(c))})
        derivative = {"x": 1 / sigma, "D": -1 / sigma}
        yield [_eval(sigma, update, keep=(derivative, {"h1": 1.0}, {"h2": 1.0}))]


def k_heun(sigmas):
    """Heun's method (Karras et al.'s Algorithm 2 without churn): an Euler step to
    sigma_next, corrected by the derivative there; the last step (to 0) is Euler's."""
    for sigma, sigma_next in _pairs(sigmas):
        if sigma_next == 0:
            yield [_eval(sigma, {"D": 1.0})]
            continue
        dt = sigma_next - sigma
        derivative = {"x": 1 / sigma, "D": -1 / sigma}  # d, kept in h1
        # x + dt (d + d2) / 2, with d2 = (x + dt d - D2) / sigma_next
        update = {
            "x": 1 + dt / (2 * sigma_next),
            "h1": dt / 2 + dt**2 / (2 * sigma_next),
            "D": -dt / (2 * sigma_next),
        }
        yield [
            _eval(sigma, {"x": 1.0}, keep=(derivative,)),
            _eval(sigma_next, update, at={"x": 1.0, "h1": dt}),
        ]


def k_dpm_2(sigmas):
    """DPM-Solver-2 in Karras et al.'s form: the derivative at the log-midpoint of sigma
    and sigma_next carries the whole step; the last step (to 0) is Euler's."""
    for sigma, sigma_next in _pairs(sigmas):
        if sigma_next == 0:
            yield [_eval(sigma, {"D": 1.0})]
            continue
        sigma_mid = math.exp((math.log(sigma) + math.log(sigma_next)) / 2)
        dt_1, dt_2 = sigma_mid - sigma, sigma_next - sigma
        derivative = {"x": 1 / sigma, "D": -1 / sigma}
        # x + dt_2 d2, with d2 = (x + dt_1 d - D2) / sigma_mid
        update = {
            "x": 1 + dt_2 / sigma_mid,
            "h1": dt_2 * dt_1 / sigma_mid,
            "D": -dt_2 / sigma_mid,
        }
        yield [
            _eval(sigma, {"x": 1.0}, keep=(derivative,)),
            _eval(sigma_mid, update, at={"x": 1.0, "h1": dt_1}),
        ]


def k_dpmpp_2s_ancestral(sigmas, eta=1.0, s_noise=1.0):
    """Ancestral DPM-Solver++(2S): a second-order step down to sigma_down through its
    log-midpoint, then noise sigma_up back up to sigma_next."""
    for sigma, sigma_next in _pairs(sigmas):
        sigma_up = min(
            sigma_next,
            eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2),
        )
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        if sigma_down == 0:
            yield [_eval(sigma, {"D": 1.0})]
            continue
        h = math.log(sigma / sigma_down)
        sigma_mid = sigma * math.exp(-h / 2)
        midpoint = {"x": sigma_mid / sigma, "h1": -math.expm1(-h / 2)}
        update = {
            "x": sigma_down / sigma,
            "D": -math.expm1(-h),
            "noise": s_noise * sigma_up,
        }
        yield [
            _eval(sigma, {"x": 1.0}, keep=({"D": 1.0},)),
            _eval(sigma_mid, update, at=midpoint),
        ]


# ---------------------------------------------------------------- v-DDIM, v models


def _alpha_sigma(t):
    return math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)


def v_ddim(sigmas, cfg_pp=False):
    """DDIM (eta 0) on a v model: x_next = alpha' D + sigma' eps,
    eps = sigma x + alpha v; with `cfg_pp` (CFG++), eps is taken from the unconditional
    prediction. The last step (to t = 0) returns D."""
    for t, t_next in _pairs(sigmas):
        (alpha, sigma), (alpha_next, sigma_next) = _alpha_sigma(t), _alpha_sigma(
            t_next
        )  # (1, 0) at t = 0
        update = {
            "D": alpha_next,
            "x": sigma_next * sigma,
            "vu" if cfg_pp else "v": sigma_next * alpha,
        }
        yield [_eval(t, update)]


def v_ddim_cfgpp(sigmas):
    return v_ddim(sigmas, cfg_pp=True)


# ---------------------------------------------------------------- rectified flow


def pingpong(times):
    """Denoise fully, then re-noise to the next time with fresh noise."""
    for t, t_next in _pairs(times):
        yield [_eval(t, {"D": 1 - t_next, "noise": t_next})]


def flow_euler(times):
    for t, t_next in _pairs(times):
        yield [_eval(t, {"x": 1.0, "v": t_next - t})]


def rk4(times):
    """Classical Runge-Kutta on the velocity; h1..h3 hold the first three slopes, and
    the last is taken at max(t_next, 1e-5), as the reference does (the model is not
    trained at t = 0)."""
    for t, t_next in _pairs(times):
        dt = t_next - t
        slope = {"v": 1.0}
        update = {"x": 1.0, "h1": dt / 6, "h2": dt / 3, "h3": dt / 3, "v": dt / 6}
        yield [
            _eval(t, {"x": 1.0}, keep=(slope,)),
            _eval(
                t + dt / 2,
                {"x": 1.0},
                keep=({"h1": 1.0}, slope),
                at={"x": 1.0, "h1": dt / 2},
            ),
            _eval(
                t + dt / 2,
                {"x": 1.0},
                keep=({"h1": 1.0}, {"h2": 1.0}, slope),
                at={"x": 1.0, "h2": dt / 2},
            ),
            _eval(max(t_next, 1e-5), update, at={"x": 1.0, "h3": dt}),
        ]


def flow_dpmpp(times):
    """DPM-Solver++(2M) for rectified flow, in stable-audio-tools' form (its coefficient
    computed directly, its log-SNRs clamped as there); first order on the first and last
    steps."""
    log_snr = lambda t: math.log(max(1 - t, 1e-10) / max(t, 1e-10))
    for i, (t, t_next) in enumerate(_pairs(times)):
        b = -(t_next - t) / max(t, 1e-10)  # (1 - t_next) times the DPM++ coefficient
        update = {"x": t_next / max(t, 1e-10), "D": b}
        if i > 0 and t_next != 0:
            r = (log_snr(t) - log_snr(times[i - 1])) / (log_snr(t_next) - log_snr(t))
            update.update(D=b * (1 + 1 / (2 * r)), h1=-b / (2 * r))
        yield [_eval(t, update, keep=({"D": 1.0},))]


# ---------------------------------------------------------------- by name

# name: (space, schedule, steps); the official names (docs/reference.md). On a v model
# "euler" is 0.0.20's default DDIM path on the log-SNR grid (k-diffusion's Euler,
# 0.0.19's "euler", is gone from 0.0.20, and from here).
SAMPLERS = {
    "dpmpp-3m-sde": ("k", "polyexponential", dpmpp_3m_sde),
    "dpmpp-2m-sde": ("k", "polyexponential", dpmpp_2m_sde),
    "dpmpp-2m": ("k", "polyexponential", dpmpp_2m),
    "k-lms": ("k", "polyexponential", k_lms),
    "k-heun": ("k", "polyexponential", k_heun),
    "k-dpm-2": ("k", "polyexponential", k_dpm_2),
    "k-dpmpp-2s-ancestral": ("k", "polyexponential", k_dpmpp_2s_ancestral),
    "v-ddim": ("vp", "linear", v_ddim),
    "v-ddim-cfgpp": ("vp", "linear", v_ddim_cfgpp),
    "euler": ("vp", "logsnr", v_ddim),
}
FLOW_SAMPLERS = {
    "pingpong": ("flow", "logsnr", pingpong),
    "euler": ("flow", "logsnr", flow_euler),
    "rk4": ("flow", "logsnr", rk4),
    "dpmpp": ("flow", "logsnr", flow_dpmpp),
}
# Offered by the official page but not fixed-step: refused by name
UNSUPPORTED = {"k-dpm-fast", "k-dpm-adaptive"}


def samplers_for(objective: str) -> dict:
    return SAMPLERS if objective == "v" else FLOW_SAMPLERS


def uses_sigma_min(objective: str, sampler: str) -> bool:
    """Whether the sampler's schedule has a lowest noise level (k-diffusion's do), and
    its sigma_max may exceed 1 (the others count time, from at most 1)."""
    return samplers_for(objective)[sampler][0] == "k"


def schedule(
    objective: str,
    sampler: str,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    flow_schedule: str = "0.0.20",
):
    """The noise levels of a generation, ending at 0, and the sampler's space."""
    space, kind, _ = samplers_for(objective)[sampler]
    if kind == "polyexponential":
        return space, polyexponential_sigmas(steps, sigma_min, sigma_max)
    if kind == "linear":
        return space, linear_times(steps, sigma_max)
    return space, logsnr_times(
        steps, sigma_max, flow_schedule if space == "flow" else "0.0.20"
    )


def seeded_noise(shape: tuple, seed: int, steps: int) -> tuple:
    """The initial N(0, 1) latents and a noise_sampler(sigma, sigma_next) of N(0, 1)
    draws for the stochastic steps, both from `seed`."""
    init_key, step_key = mx.random.split(mx.random.key(seed))
    step_keys = iter(mx.random.split(step_key, steps))

    def noise_sampler(sigma, sigma_next):
        return mx.random.normal(shape, key=next(step_keys))

    return mx.random.normal(shape, key=init_key), noise_sampler


def noised(space: str, latents, noise, sigma: float):
    """Clean latents brought to noise level `sigma` of the space, as its sampler sees
    them: alpha x0 + sigma eps."""
    if space == "k":
        alpha, scale = 1.0, sigma
    elif space == "vp":
        alpha, scale = _alpha_sigma(sigma)
    else:
        alpha, scale = 1 - sigma, sigma
    return alpha * latents + scale * noise


def denoiser(space: str, sigma: float) -> tuple:
    """(c_in, c_skip, c_out, t): the model sees c_in y at time t, and
    D = c_skip y + c_out v. In the k space this is k-diffusion's VDenoiser
    (t = atan(sigma) 2 / pi)."""
    if space == "k":
        return (
            1 / math.sqrt(sigma**2 + 1),
            1 / (sigma**2 + 1),
            -sigma / math.sqrt(sigma**2 + 1),
            math.atan(sigma) * 2 / math.pi,
        )
    if space == "vp":
        alpha, s = _alpha_sigma(sigma)
        return 1.0, alpha, -s, sigma
    return 1.0, 1.0, -sigma, sigma


def plan(objective: str, sampler: str, sigmas: list) -> list:
    """Per step, the list of its evaluations, each as (coefficients, time t, draws
    noise): the coefficients are [c_in, c_skip, c_out, t] + P (4) + Q (4 x 8,
    row-major)."""
    space, _, steps = samplers_for(objective)[sampler]
    plans = []
    for evaluations in steps(sigmas):
        rows = []
        for e in evaluations:
            Q = np.zeros((len(STATE), len(TERMS)))
            Q[1:, 1:4] = np.eye(3)  # registers not written stay as they are
            for name, c in e.update.items():
                Q[0, TERMS.index(name)] = c
            for i, combination in enumerate(e.keep, start=1):
                Q[i] = 0.0
                for name, c in combination.items():
                    Q[i, TERMS.index(name)] = c
            P = [e.at.get(name, 0.0) for name in STATE]
            coefficients = [*denoiser(space, e.sigma), *P, *Q.ravel()]
            rows.append(
                (coefficients, coefficients[3], e.update.get("noise", 0.0) != 0)
            )
        plans.append(rows)
    return plans


def used_terms(plan: list) -> tuple:
    """Which of P and Q's entries are non-zero at some evaluation of `plan`: evaluate()
    skips the others (a compiled evaluation is traced with this, a constant)."""
    nonzero = np.zeros(4 + len(STATE) * len(TERMS), dtype=bool)
    for evaluations in plan:
        for coefficients, _, _ in evaluations:
            nonzero |= np.array(coefficients[4:]) != 0
    return tuple(bool(b) for b in nonzero)


def evaluate(model, state: tuple, noise: mx.array, k: mx.array, used: tuple) -> tuple:
    """One model evaluation. `model(x, t)` returns the (guided, unconditional)
    predictions for latents x at times t; `state` is (x, h1, h2, h3); `k` holds plan()'s
    coefficients for this evaluation and `used` used_terms(). Returns the new state."""
    c_in, c_skip, c_out, t = (k[i] for i in range(4))
    y = sum(k[4 + j] * s for j, s in enumerate(state) if used[j])
    v, v_uncond = model(y * c_in, mx.broadcast_to(t, (y.shape[0],)))
    terms = (*state, c_skip * y + c_out * v, v, v_uncond, noise)
    Q = k[8:].reshape(len(STATE), len(TERMS))
    rows = [
        [Q[i, j] * term for j, term in enumerate(terms) if used[4 + i * len(TERMS) + j]]
        for i in range(len(STATE))
    ]
    return tuple(sum(row) if row else mx.zeros_like(state[0]) for row in rows)

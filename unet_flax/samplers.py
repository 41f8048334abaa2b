"""The samplers, each equal to a diffusers scheduler: DDIM, DDPM, DPM-Solver++ (multistep, orders 1-3,
ODE or SDE), Euler, Euler ancestral, Heun and UniPC (bh2).

Every one of them is, per model evaluation, a linear update: the model's output becomes a prediction
D (of the clean image) that is linear in the current x and the output, and the next x is a linear
combination of x, one saved earlier x, the last HISTORY predictions and fresh noise. So a sampler is
a `Plan`, those coefficients per evaluation, computed here on the host in float64 from diffusers'
formulas (one function per scheduler, its names theirs), and one `lax.scan` (`run`) serves them all:
samplers with as many evaluations share one compiled program, and a plan is data, not code.

    plan = make_plan(SamplerConfig("dpm_solver", use_karras_sigmas=True), num_steps=20,
                     noise_schedule="linear", timesteps=1000, prediction="epsilon")
    x0 = run(denoise, plan, x_T, key)
"""
from __future__ import annotations

import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .config.sampler_config import SamplerConfig
from .diffusion import Denoiser, beta_schedule, check_sampling_steps, sampling_timesteps
from .errors import ConfigError

# The predictions a step can combine: DPM-Solver++ and UniPC of order 3 read the last three, UniPC's
# corrector the new one too.
HISTORY = 4
# A plan's columns: the current x, the saved x, then the predictions, newest first.
X, SAVED = 0, 1
COLUMNS = 2 + HISTORY
# What a plan holds per model evaluation.
PER_EVALUATION = ("model_t", "input_scale", "from_x", "from_output", "x_row", "saved_row", "noise_scale")


def prediction_column(age: int) -> int:
    """The column of the prediction made `age` evaluations ago (0: this evaluation's)."""
    return 2 + age


@flax.struct.dataclass
class Plan:
    """A sampler as numbers, one row per model evaluation (see the module's docstring). The model sees
    `input_scale * x` at timestep `model_t`; its output becomes D = from_x * x + from_output * output
    (clipped to [-1, 1] where `clip`); then x <- x_row . [x, saved, D, D_1, ...] + noise_scale * noise
    and saved <- saved_row . [the same]."""

    init_scale: np.ndarray  # x_T = init_scale * N(0, I)
    model_t: np.ndarray  # (E,)
    input_scale: np.ndarray  # (E,)
    from_x: np.ndarray  # (E,)
    from_output: np.ndarray  # (E,)
    x_row: np.ndarray  # (E, COLUMNS)
    saved_row: np.ndarray  # (E, COLUMNS)
    noise_scale: np.ndarray  # (E,)
    clip: bool = flax.struct.field(pytree_node=False, default=False)
    stochastic: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def evaluations(self) -> int:
        return self.model_t.shape[0]


def run(denoise: Denoiser, plan: Plan, x_T: jax.Array, key: jax.Array | None = None,
        noise: jax.Array | None = None) -> jax.Array:
    """The sample `plan` makes from x_T ~ N(0, I), in one lax.scan over its evaluations. A stochastic
    plan draws its noise for evaluation e from split(key, E)[e], or takes it from `noise[e]`."""
    if plan.stochastic and (key is None) == (noise is None):
        raise ValueError("a stochastic plan takes exactly one of key and noise")
    x = plan.init_scale * x_T
    predictions = jnp.zeros((HISTORY, *x.shape), x.dtype)
    rows = {name: getattr(plan, name) for name in PER_EVALUATION}
    if plan.stochastic:
        rows["noise"] = jax.random.split(key, plan.evaluations) if noise is None else noise

    def evaluate(carry, row):
        x, saved, predictions = carry
        t = jnp.full(x.shape[:1], row["model_t"])
        output = denoise(row["input_scale"] * x, t).astype(x.dtype)
        prediction = row["from_x"] * x + row["from_output"] * output
        if plan.clip:
            prediction = jnp.clip(prediction, -1.0, 1.0)
        predictions = jnp.concatenate([prediction[None], predictions[:-1]])
        terms = (x, saved, *predictions)
        # Elementwise products, not a dot: a matmul would run at the backend's default precision.
        x_next = sum(c * term for c, term in zip(row["x_row"], terms))
        saved = sum(c * term for c, term in zip(row["saved_row"], terms))
        if plan.stochastic:
            step_noise = row["noise"] if noise is not None else jax.random.normal(row["noise"], x.shape, x.dtype)
            x_next = x_next + row["noise_scale"] * step_noise
        return (x_next, saved, predictions), None

    (x, _, _), _ = jax.lax.scan(evaluate, (x, jnp.zeros_like(x), predictions), rows)
    return x


# -- plans ----------------------------------------------------------------------------------------

def make_plan(sampler: SamplerConfig, num_steps: int, noise_schedule: str, timesteps: int,
              prediction: str) -> Plan:
    """The plan of `sampler` over `num_steps` steps for a model trained with this schedule and
    prediction (DDPM: every timestep, num_steps is not read)."""
    alphas_cumprod = np.cumprod(1 - beta_schedule(noise_schedule, timesteps))
    if sampler.sampler == "ddpm":
        num_steps = timesteps
    check_sampling_steps(num_steps, timesteps)
    with np.errstate(divide="ignore", invalid="ignore"):
        plan = PLANS[sampler.sampler](sampler, num_steps, alphas_cumprod, prediction, noise_schedule)
    if not all(np.all(np.isfinite(getattr(plan, name))) for name in PER_EVALUATION):
        # A multistep method divides by the log-SNR between steps: two steps at one noise level.
        raise ConfigError(f"sampling_steps {num_steps} gives {sampler.sampler} ({sampler.timestep_spacing} spacing"
                          f"{', Karras sigmas' if sampler.use_karras_sigmas else ''}) two steps at the same noise "
                          f"level over the model's {timesteps} timesteps: use fewer steps")
    return plan


class _Rows:
    """A plan's rows as they are built, one model evaluation at a time."""

    def __init__(self):
        self.columns = {name: [] for name in PER_EVALUATION}

    def add(self, model_t: float, input_scale: float, conversion: tuple[float, float], x_row: np.ndarray,
            saved_row: np.ndarray | None = None, noise_scale: float = 0.0) -> None:
        values = dict(model_t=model_t, input_scale=input_scale, from_x=conversion[0], from_output=conversion[1],
                      x_row=x_row, saved_row=np.zeros(COLUMNS) if saved_row is None else saved_row,
                      noise_scale=noise_scale)
        for name, value in values.items():
            self.columns[name].append(value)

    def plan(self, init_scale: float, clip: bool = False) -> Plan:
        # numpy, not JAX: a plan made while a config is checked starts no backend.
        arrays = {name: np.asarray(values, np.float64).astype(np.float32) for name, values in self.columns.items()}
        return Plan(init_scale=np.float32(init_scale), clip=clip,
                    stochastic=bool(np.any(np.asarray(self.columns["noise_scale"]) != 0)), **arrays)


def unit(column: int) -> np.ndarray:
    row = np.zeros(COLUMNS)
    row[column] = 1.0
    return row


def _vp_conversion(sigma: float, prediction: str) -> tuple[float, float]:
    """D from the model's output on the variance-preserving x_t = alpha x0 + sigma_t eps, for the
    noise level sigma = sigma_t / alpha (diffusers' convert_model_output)."""
    alpha, sigma_t = alpha_sigma(sigma)
    if prediction == "epsilon":
        return 1 / alpha, -sigma_t / alpha
    return alpha, -sigma_t  # v


def _ve_conversion(sigma: float, prediction: str) -> tuple[float, float]:
    """D from the model's output on the Euler schedulers' x = x_t / alpha (whose input is scaled back)."""
    if prediction == "epsilon":
        return 1.0, -sigma
    return 1 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)  # v


def alpha_sigma(sigma: float) -> tuple[float, float]:
    alpha = 1 / math.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def log_snr(sigma: float) -> np.float64:
    """lambda = log(alpha) - log(sigma_t): infinite at sigma = 0. A numpy scalar: what follows divides by
    differences of these, which are 0 where two steps share a sigma (as diffusers', inf or NaN, not an error)."""
    with np.errstate(divide="ignore"):
        return -np.log(np.float64(sigma))


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional timesteps of noise levels, by interpolating log sigma (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_max: float, sigma_min: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022)'s noise levels, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, num_steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def euler_timesteps(spacing: str, timesteps: int, num_steps: int, offset: int) -> np.ndarray:
    """The Euler, Euler ancestral and Heun schedulers' timesteps (float32, possibly fractional)."""
    if spacing == "linspace":
        return np.linspace(0, timesteps - 1, num_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(num_steps) * (timesteps // num_steps)).round()[::-1].astype(np.float32) + offset
    return np.arange(timesteps, 0, -timesteps / num_steps).round().astype(np.float32) - 1  # trailing


def multistep_timesteps(spacing: str, timesteps: int, num_steps: int, offset: int) -> np.ndarray:
    """The DPM-Solver and UniPC schedulers' integer timesteps: n + 1 points, the last (0) dropped."""
    if spacing == "linspace":
        return np.linspace(0, timesteps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = timesteps // (num_steps + 1)
        return (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + offset
    return np.arange(timesteps, 0, -timesteps / num_steps).round().astype(np.int64) - 1  # trailing


def euler_sigmas(sampler: SamplerConfig, num_steps: int, alphas_cumprod: np.ndarray,
                 final_sigma: str = "zero") -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas + the final one) of EulerDiscreteScheduler, EulerAncestralDiscreteScheduler
    and HeunDiscreteScheduler: interpolated at their timesteps, or Karras' between the ends of those."""
    sigmas = train_sigmas(alphas_cumprod)
    steps = euler_timesteps(sampler.timestep_spacing, len(sigmas), num_steps, sampler.steps_offset)
    at_steps = np.interp(steps, np.arange(len(sigmas)), sigmas)
    if sampler.use_karras_sigmas:
        at_steps = karras_sigmas(at_steps[0], at_steps[-1], num_steps)
        steps = sigma_to_t(at_steps, np.log(sigmas))
    last = sigmas[0] if final_sigma == "sigma_min" else 0.0
    return steps.astype(np.float32), _as_float32(np.append(at_steps, last))


def multistep_sigmas(sampler: SamplerConfig, num_steps: int, alphas_cumprod: np.ndarray,
                     round_karras_timesteps: bool) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas + the final one) of DPMSolverMultistepScheduler and UniPCMultistepScheduler."""
    sigmas = train_sigmas(alphas_cumprod)
    steps = multistep_timesteps(sampler.timestep_spacing, len(sigmas), num_steps, sampler.steps_offset)
    if sampler.use_karras_sigmas:
        at_steps = karras_sigmas(sigmas[-1], sigmas[0], num_steps)
        steps = sigma_to_t(at_steps, np.log(sigmas))
        # Stored as int64: DPM-Solver rounds them except under the cosine schedule, which truncates.
        steps = (steps.round() if round_karras_timesteps else steps).astype(np.int64)
    else:
        at_steps = np.interp(steps, np.arange(len(sigmas)), sigmas)
    last = 0.0
    if sampler.final_sigmas_type == "sigma_min":
        last = at_steps[-1] if sampler.use_karras_sigmas and sampler.sampler == "unipc" else sigmas[0]
    return steps.astype(np.float32), _as_float32(np.append(at_steps, last))


def _as_float32(sigmas: np.ndarray) -> list[float]:
    # diffusers keeps its sigmas as float32 tensors: the same roundings here.
    return [float(s) for s in np.asarray(sigmas, np.float32)]


def ddim_plan(sampler: SamplerConfig, num_steps: int, alphas_cumprod: np.ndarray, prediction: str,
              noise_schedule: str) -> Plan:
    """DDIM (Song et al. 2021), as diffusers' DDIMScheduler with clip_sample and set_alpha_to_one:
    the clipped x0 and the noise it implies, plus eta's fresh noise. eta = 1 over every timestep is
    DDPM's ancestral sampler (its variance then exactly the posterior's beta~_t)."""
    eta = 1.0 if sampler.sampler == "ddpm" else sampler.eta
    steps, previous = sampling_timesteps(len(alphas_cumprod), num_steps, sampler.timestep_spacing)
    rows = _Rows()
    for t, t_prev in zip(steps, previous):
        abar, abar_prev = alphas_cumprod[t], (1.0 if t_prev < 0 else alphas_cumprod[t_prev])
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        noise_weight = math.sqrt(max(1 - abar_prev - sigma**2, 0.0))
        # x_prev = sqrt(abar_prev) x0 + noise_weight (x - sqrt(abar) x0) / sqrt(1 - abar) + sigma z
        x_row = (noise_weight / math.sqrt(1 - abar)) * unit(X) + (
            math.sqrt(abar_prev) - noise_weight * math.sqrt(abar / (1 - abar))) * unit(prediction_column(0))
        rows.add(t, 1.0, _vp_conversion(math.sqrt((1 - abar) / abar), prediction), x_row, noise_scale=sigma)
    return rows.plan(1.0, clip=True)


def _euler_init_scale(sampler: SamplerConfig, sigmas: list[float]) -> float:
    # diffusers' init_noise_sigma: sqrt(sigma_max^2 + 1) under "leading" spacing.
    sigma_max = max(sigmas)
    return sigma_max if sampler.timestep_spacing in ("linspace", "trailing") else math.sqrt(sigma_max**2 + 1)


def _euler_step(sigma: float, sigma_to: float) -> np.ndarray:
    """x + (sigma_to - sigma) (x - D) / sigma."""
    return (sigma_to / sigma) * unit(X) + (1 - sigma_to / sigma) * unit(prediction_column(0))


def euler_plan(sampler: SamplerConfig, num_steps: int, alphas_cumprod: np.ndarray, prediction: str,
               noise_schedule: str) -> Plan:
    """EulerDiscreteScheduler (s_churn 0) and EulerAncestralDiscreteScheduler: Euler's step of the
    probability-flow ODE in sigma, the ancestral one to sigma_down, then noise of sigma_up."""
    ancestral = sampler.sampler == "euler_ancestral"
    steps, sigmas = euler_sigmas(sampler, num_steps, alphas_cumprod, "zero" if ancestral else sampler.final_sigmas_type)
    rows = _Rows()
    for i, t in enumerate(steps):
        sigma, sigma_to = sigmas[i], sigmas[i + 1]
        sigma_up = math.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) if ancestral else 0.0
        sigma_down = math.sqrt(sigma_to**2 - sigma_up**2)
        rows.add(t, 1 / math.sqrt(sigma**2 + 1), _ve_conversion(sigma, prediction), _euler_step(sigma, sigma_down),
                 noise_scale=sigma_up)
    return rows.plan(_euler_init_scale(sampler, sigmas))


def heun_plan(sampler: SamplerConfig, num_steps: int, alphas_cumprod: np.ndarray, prediction: str,
              noise_schedule: str) -> Plan:
    """HeunDiscreteScheduler: per step an Euler predictor to the next sigma, then the average of the two
    slopes from the saved x (2 n - 1 evaluations: the last step, to sigma 0, is Euler's)."""
    steps, sigmas = euler_sigmas(sampler, num_steps, alphas_cumprod)
    rows = _Rows()
    for i, t in enumerate(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        rows.add(t, 1 / math.sqrt(sigma**2 + 1), _ve_conversion(sigma, prediction), _euler_step(sigma, sigma_next),
                 saved_row=unit(X))
        if sigma_next == 0:
            break
        # saved + dt ((saved - D_1) / sigma + (x - D) / sigma_next) / 2, with x the predictor's result
        dt = sigma_next - sigma
        x_row = (dt / (2 * sigma_next)) * (unit(X) - unit(prediction_column(0))) + unit(SAVED) + (
            dt / (2 * sigma)) * (unit(SAVED) - unit(prediction_column(1)))
        rows.add(steps[i + 1], 1 / math.sqrt(sigma_next**2 + 1), _ve_conversion(sigma_next, prediction), x_row)
    return rows.plan(_euler_init_scale(sampler, sigmas))


def _multistep_order(sampler: SamplerConfig, i: int, num_steps: int) -> int:
    """The order of DPM-Solver++'s step i: lower while the history fills, and at the end as asked."""
    final = i == num_steps - 1 and (sampler.euler_at_final or (sampler.lower_order_final and num_steps < 15)
                                    or sampler.final_sigmas_type == "zero")
    second = i == num_steps - 2 and sampler.lower_order_final and num_steps < 15
    filled = min(i, sampler.solver_order)  # predictions of earlier steps in the history
    if sampler.solver_order == 1 or filled < 1 or final:
        return 1
    if sampler.solver_order == 2 or filled < 2 or second:
        return 2
    return 3


def dpm_solver_plan(sampler: SamplerConfig, num_steps: int, alphas_cumprod: np.ndarray, prediction: str,
                    noise_schedule: str) -> Plan:
    """DPMSolverMultistepScheduler with algorithm_type dpmsolver++ or sde-dpmsolver++ (Lu et al. 2022):
    exact in the linear part, the data prediction extrapolated from the last 1-3 steps in log-SNR."""
    steps, sigmas = multistep_sigmas(sampler, num_steps, alphas_cumprod, noise_schedule != "cosine")
    sde = sampler.algorithm_type == "sde-dpmsolver++"
    rows = _Rows()
    for i, t in enumerate(steps):
        order = _multistep_order(sampler, i, num_steps)
        alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
        _, sigma_s0 = alpha_sigma(sigmas[i])
        lam = [log_snr(sigmas[i - k]) if i - k >= 0 else math.nan for k in range(3)]
        h = log_snr(sigmas[i + 1]) - lam[0]
        d = [unit(prediction_column(k)) for k in range(3)]
        if sde:
            x_weight, phi, noise_scale = sigma_t / sigma_s0 * math.exp(-h), -alpha_t * (-math.expm1(-2 * h)), \
                sigma_t * math.sqrt(-math.expm1(-2 * h))
        else:
            x_weight, phi, noise_scale = sigma_t / sigma_s0, alpha_t * math.expm1(-h), 0.0
        x_row = x_weight * unit(X) - phi * d[0]
        if order == 2:
            r0 = (lam[0] - lam[1]) / h
            d1 = (d[0] - d[1]) / r0
            if sampler.solver_type == "midpoint":
                x_row = x_row - 0.5 * phi * d1
            elif sde:
                x_row = x_row + alpha_t * ((-math.expm1(-2 * h)) / (-2 * h) + 1) * d1
            else:
                x_row = x_row + alpha_t * (math.expm1(-h) / h + 1) * d1
        elif order == 3:
            r0, r1 = (lam[0] - lam[1]) / h, (lam[1] - lam[2]) / h
            d1_0, d1_1 = (d[0] - d[1]) / r0, (d[1] - d[2]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            if sde:
                x_row = (x_row + alpha_t * ((-math.expm1(-2 * h)) / (-2 * h) + 1) * d1
                         + alpha_t * ((-math.expm1(-2 * h) - 2 * h) / (2 * h) ** 2 - 0.5) * d2)
            else:
                x_row = (x_row + alpha_t * (math.expm1(-h) / h + 1) * d1
                         - alpha_t * ((math.expm1(-h) + h) / h**2 - 0.5) * d2)
        rows.add(t, 1.0, _vp_conversion(sigmas[i], prediction), x_row, noise_scale=noise_scale)
    return rows.plan(1.0)


def _unipc_coefficients(order: int, h: float, rks: list[float], corrector: bool) -> tuple[float, float, np.ndarray]:
    """UniPC-bh2's (h_phi_1, B(h), rhos) for a predictor or corrector of this order, rks the earlier
    steps' log-SNR offsets over h (multistep_uni_p_bh_update and multistep_uni_c_bh_update)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    r_matrix, b = [], []
    rks = np.array([*rks, 1.0])
    for k in range(1, order + 1):
        r_matrix.append(rks ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r_matrix, b = np.array(r_matrix), np.array(b)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(r_matrix, b)
    else:
        rhos = (np.array([0.5]) if order == 2
                else np.linalg.solve(r_matrix[:-1, :-1], b[:-1]) if order > 2 else np.zeros(0))
    return h_phi_1, b_h, rhos


def unipc_plan(sampler: SamplerConfig, num_steps: int, alphas_cumprod: np.ndarray, prediction: str,
               noise_schedule: str) -> Plan:
    """UniPCMultistepScheduler, bh2, data prediction (Zhao et al. 2023): at each step a corrector
    (UniC) refines the x the last step predicted, with the new model output, then a predictor (UniP)
    steps on from it; the corrector needs no evaluation of its own."""
    steps, sigmas = multistep_sigmas(sampler, num_steps, alphas_cumprod, True)
    lam = [log_snr(s) for s in sigmas]
    rows = _Rows()
    last_order = 0
    for i, t in enumerate(steps):
        # The corrector, from the saved x (the last step's start) to this step's sigma.
        if i > 0 and i - 1 not in sampler.disable_corrector:
            alpha_t, sigma_t = alpha_sigma(sigmas[i])
            _, sigma_s0 = alpha_sigma(sigmas[i - 1])
            h = lam[i] - lam[i - 1]
            rks = [(lam[i - (k + 1)] - lam[i - 1]) / h for k in range(1, last_order)]
            h_phi_1, b_h, rhos = _unipc_coefficients(last_order, h, rks, corrector=True)
            m0 = unit(prediction_column(1))
            correction = rhos[-1] * (unit(prediction_column(0)) - m0)
            for k, rk in enumerate(rks, start=1):
                correction = correction + rhos[k - 1] * (unit(prediction_column(k + 1)) - m0) / rk
            start = (sigma_t / sigma_s0) * unit(SAVED) - alpha_t * h_phi_1 * m0 - alpha_t * b_h * correction
        else:
            start = unit(X)
        # The predictor, from the corrected x to the next sigma.
        order = min(sampler.solver_order, num_steps - i) if sampler.lower_order_final else sampler.solver_order
        order = min(order, min(i, sampler.solver_order) + 1)
        alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
        _, sigma_s0 = alpha_sigma(sigmas[i])
        h = lam[i + 1] - lam[i]
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, order)]
        h_phi_1, b_h, rhos = _unipc_coefficients(order, h, rks, corrector=False)
        m0 = unit(prediction_column(0))
        x_row = (sigma_t / sigma_s0) * start - alpha_t * h_phi_1 * m0
        for k, rk in enumerate(rks, start=1):
            x_row = x_row - alpha_t * b_h * rhos[k - 1] * (unit(prediction_column(k)) - m0) / rk
        rows.add(t, 1.0, _vp_conversion(sigmas[i], prediction), x_row, saved_row=start)
        last_order = order
    return rows.plan(1.0)


PLANS: dict[str, Callable[..., Plan]] = {
    "ddim": ddim_plan, "ddpm": ddim_plan, "dpm_solver": dpm_solver_plan, "euler": euler_plan,
    "euler_ancestral": euler_plan, "heun": heun_plan, "unipc": unipc_plan,
}

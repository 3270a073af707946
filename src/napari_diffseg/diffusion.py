"""Gaussian diffusion on the mask channel: schedule, noising, hybrid loss, samplers.

Symbols follow Ho et al. (2020) and Nichol & Dhariwal (2021): beta_t, alpha_bar_t, the
posterior q(x_{t-1} | x_t, x_0), epsilon prediction and the learned-range variance
v -> log sigma^2 = frac log beta_t + (1 - frac) log beta~_t.

One :class:`Diffusion` owns the schedule arrays of one (possibly respaced) chain. Its step
functions are pure: they take the network output and tensors and return tensors, so the
same code serves training, the samplers, tests against the reference and benchmarks.
Coefficients are stored in float64 and used as float32, as the reference does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import DiffSegError


@dataclass
class DiffusionConfig:
    """Diffusion flags under the reference's names and with its defaults."""

    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    learn_sigma: bool = True
    rescale_learned_sigmas: bool = False
    rescale_timesteps: bool = False
    # The network outputs x0 (the clean mask) instead of epsilon: improved-diffusion's flag of
    # the same name. Regressing the mask directly lets each chain commit to 0 or 1.
    predict_xstart: bool = False

    @classmethod
    def from_flags(cls, flags: dict) -> "DiffusionConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in flags.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


# The reference's diffusion flags with its defaults (see unet.UNET_FLAG_DEFAULTS); learn_sigma
# sets the network's outputs too. use_kl is accepted only as False.
DIFFUSION_FLAG_DEFAULTS = {
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}

def make_betas(schedule: str, steps: int) -> np.ndarray:
    if schedule == "linear":
        # Scaled so that any number of steps spans the same noise range as 1000 steps.
        scale = 1000 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    if schedule == "cosine":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)],
            dtype=np.float64,
        )
    raise DiffSegError(f"noise schedule {schedule!r} is unknown: use 'linear' or 'cosine'", setting="noise_schedule")


def space_timesteps(num_timesteps: int, spec: str | int | None) -> list[int]:
    """The timesteps a respaced sampler visits, as improved-diffusion defines the spec.

    "" or None: all. "ddimN": the stride that gives exactly N evenly strided steps from 0.
    "N" or "N1,N2,...": split the chain into equal sections and take Ni steps evenly
    spaced (rounded) in section i, first and last step included.
    """
    spec = "" if spec is None else str(spec).strip()
    if spec == "":
        return list(range(num_timesteps))
    if spec.startswith("ddim"):
        try:
            wanted = int(spec[4:])
        except ValueError:
            raise DiffSegError(f"timestep respacing {spec!r}: write ddim followed by a number, e.g. ddim50",
                               setting="timestep_respacing") from None
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        if not 2 <= wanted <= num_timesteps:
            raise DiffSegError(f"timestep respacing {spec!r}: the model has {num_timesteps} steps; "
                               f"take 2 to {num_timesteps} of them (e.g. ddim50)", setting="timestep_respacing")
        raise DiffSegError(
            f"timestep respacing {spec!r}: no integer stride gives exactly {wanted} steps out of "
            f"{num_timesteps}; pick another count (e.g. ddim50) or use the plain form {wanted}",
            setting="timestep_respacing")
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise DiffSegError(
            f"timestep respacing {spec!r} is not understood: use a step count like 50, "
            f"section counts like 10,20 or ddim50", setting="timestep_respacing"
        ) from None
    size, extra = divmod(num_timesteps, len(counts))
    steps: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if not 1 <= count <= section:
            raise DiffSegError(
                f"timestep respacing {spec!r}: cannot take {count} steps from a section of "
                f"{section} (the model has {num_timesteps} steps)", setting="timestep_respacing"
            )
        stride = (section - 1) / (count - 1) if count > 1 else 1.0
        # Accumulated (not multiplied) so the rounding matches improved-diffusion's choice.
        position = 0.0
        for _ in range(count):
            steps.add(start + round(position))
            position += stride
        start += section
    return sorted(steps)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation improved-diffusion uses, kept so losses agree with it.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log likelihood of x under a Gaussian integrated over bins of width 2/255 (edges open)."""
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_minus = _approx_std_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta)
    )
    return -log_probs


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


@dataclass
class SamplerStep:
    """One denoising step, as the samplers yield it."""

    index: int  # steps done so far, minus one (0 .. total - 1)
    total: int
    t: int  # the original (unrespaced) diffusion timestep just denoised
    x: torch.Tensor  # the chain state after this step (the mask channel)
    pred_x0: torch.Tensor  # the network's (clipped) estimate of the clean mask at this step


class Diffusion:
    """The schedule of one chain, respaced or not, and the maths on it."""

    _COEFFICIENTS = (
        "betas", "log_betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
        "posterior_mean_coef2", "fixed_large_variance", "fixed_large_log_variance",
    )

    def __init__(
        self,
        betas: np.ndarray,
        timestep_map: list[int] | None = None,
        learn_sigma: bool = True,
        rescale_learned_sigmas: bool = False,
        rescale_timesteps: bool = False,
        original_num_steps: int | None = None,
        predict_xstart: bool = False,
    ):
        betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.timestep_map = list(range(len(betas))) if timestep_map is None else list(timestep_map)
        self.original_num_steps = original_num_steps or len(betas)
        self.learn_sigma = learn_sigma
        self.rescale_learned_sigmas = rescale_learned_sigmas
        self.rescale_timesteps = rescale_timesteps
        self.predict_xstart = predict_xstart

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # beta~_0 is 0; its log is replaced by beta~_1's so the learned range stays finite
        # (a one-step chain has no beta~_1: beta_0 stands in).
        first_var = post_var[1] if len(betas) > 1 else betas[0]
        arrays = {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.append(first_var, post_var[1:])),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "fixed_large_variance": np.append(first_var, betas[1:]),
            "fixed_large_log_variance": np.log(np.append(first_var, betas[1:])),
        }
        self.arrays = arrays
        self._device_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, config: DiffusionConfig, respacing: str | None = "") -> "Diffusion":
        base = make_betas(config.noise_schedule, config.diffusion_steps)
        use = space_timesteps(config.diffusion_steps, respacing)
        ac = np.cumprod(1.0 - base)
        # Respaced betas reproduce the original alpha_bar at every kept step.
        betas, last = [], 1.0
        for i in use:
            betas.append(1.0 - ac[i] / last)
            last = ac[i]
        return cls(
            np.array(betas),
            timestep_map=use,
            learn_sigma=config.learn_sigma,
            rescale_learned_sigmas=config.rescale_learned_sigmas,
            rescale_timesteps=config.rescale_timesteps,
            original_num_steps=config.diffusion_steps,
            predict_xstart=config.predict_xstart,
        )

    # -- coefficient access ----------------------------------------------------------------
    def _tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        device = torch.device(device)
        if device not in self._device_cache:
            cache = {k: torch.from_numpy(v).to(device).float() for k, v in self.arrays.items()}
            cache["timestep_map"] = torch.tensor(self.timestep_map, dtype=torch.long, device=device)
            self._device_cache[device] = cache
        return self._device_cache[device]

    def _coef(self, name: str, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """The coefficient at step t, shaped to broadcast over ``like``.

        A Python int (all chains at the same step, as in sampling) indexes without a
        device sync; a tensor gathers one value per batch element (training)."""
        table = self._tensors(like.device)[name]
        if isinstance(t, int):
            return table[t]
        return table[t].reshape(-1, *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
        """The timestep values the network sees for respaced step index t."""
        table = self._tensors(device)["timestep_map"]
        steps = table[t].expand(batch) if isinstance(t, int) else table[t]
        if self.rescale_timesteps:
            return steps.float() * (1000.0 / self.original_num_steps)
        return steps

    # -- forward process --------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        return self._coef("sqrt_alphas_cumprod", t, noise) * x0 + self._coef(
            "sqrt_one_minus_alphas_cumprod", t, noise
        ) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._coef("posterior_mean_coef1", t, x_t) * x0 + self._coef("posterior_mean_coef2", t, x_t) * x_t
        return (
            mean,
            self._coef("posterior_variance", t, x_t),
            self._coef("posterior_log_variance_clipped", t, x_t),
        )

    # -- reverse process --------------------------------------------------------------------
    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        return self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._coef(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        ) * eps

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
        return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self._coef(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def x0_estimate(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The (unclipped) clean-mask estimate the network's first output channels stand for (one
        per mask channel of ``x_t``)."""
        k = x_t.shape[1]
        if self.predict_xstart:
            return model_output[:, :k]
        return self.predict_x0(x_t, t, model_output[:, :k])

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, clip: bool = True,
        clip_range: tuple[float, float] = (-1.0, 1.0), clamp_variance: bool = False,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from the network output (eps or x0, and v when sigma is learned).

        ``clip_range`` bounds the x0 estimate: the reference keeps the image code's [-1, 1];
        a {0, 1} mask is better served by [0, 1] (our checkpoints record which).
        ``clamp_variance`` keeps the learned variance inside its range [beta~_t, beta_t]. The
        reference extrapolates v freely; the loss barely constrains v where the two bounds
        nearly agree (most of a 1000-step chain), but a respaced chain's bounds lie far apart,
        and a drifted v then blows the chain up (seen: v = 25, chains at +-inf in 10 steps)."""
        if self.learn_sigma:
            k = x_t.shape[1]  # a mask with several channels (regions) has a variance value per channel
            v = model_output[:, k : 2 * k]
            if clamp_variance:
                v = v.clamp(-1.0, 1.0)
            frac = (v + 1) / 2
            log_variance = frac * self._coef("log_betas", t, x_t) + (1 - frac) * self._coef(
                "posterior_log_variance_clipped", t, x_t
            )
            variance = torch.exp(log_variance)
        else:
            log_variance = self._coef("fixed_large_log_variance", t, x_t).expand_as(x_t)
            variance = self._coef("fixed_large_variance", t, x_t).expand_as(x_t)
        pred_x0 = self.x0_estimate(model_output, x_t, t)
        if clip:
            pred_x0 = pred_x0.clamp(*clip_range)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0}

    def ddpm_step(self, out: dict, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """Ancestral sample x_{t-1} = mean + sigma z (no noise at the last step)."""
        scaled = torch.exp(0.5 * out["log_variance"]) * noise
        if isinstance(t, int):
            return out["mean"] + scaled if t > 0 else out["mean"]
        nonzero = (t != 0).to(scaled.dtype).reshape(-1, *([1] * (noise.ndim - 1)))
        return out["mean"] + nonzero * scaled

    def ddim_step(
        self, out: dict, x_t: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor | None, eta: float = 0.0
    ) -> torch.Tensor:
        """DDIM update (Song et al. 2021); eta = 0 is deterministic, eta = 1 ~ ancestral."""
        eps = self.predict_eps(x_t, t, out["pred_x0"])
        abar = self._coef("alphas_cumprod", t, x_t)
        abar_prev = self._coef("alphas_cumprod_prev", t, x_t)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out["pred_x0"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        if eta == 0 or noise is None:
            return mean
        if isinstance(t, int):
            return mean + sigma * noise if t > 0 else mean
        nonzero = (t != 0).to(mean.dtype).reshape(-1, *([1] * (noise.ndim - 1)))
        return mean + nonzero * sigma * noise

    # -- training ---------------------------------------------------------------------------
    def training_losses(
        self, model_output: torch.Tensor, mask: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-example hybrid loss: MSE on the network's target (epsilon, or x0 with
        ``predict_xstart``) plus the variational bound (in bits) that trains only the variance
        output (the mean is detached)."""
        k = mask.shape[1]  # mask channels; the mean over all of them is the mean over regions
        prediction = model_output[:, :k]
        target = mask if self.predict_xstart else noise
        mse = _mean_flat((target - prediction) ** 2)
        if not self.learn_sigma:
            return {"mse": mse, "vb": torch.zeros_like(mse), "loss": mse}
        frozen = torch.cat([prediction.detach(), model_output[:, k : 2 * k]], dim=1)
        vb = self.vb_bits(frozen, mask, x_t, t)
        if self.rescale_learned_sigmas:
            vb = vb * (self.num_timesteps / 1000.0)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    def vb_bits(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits; the decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip=False)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = _mean_flat(discretized_gaussian_nll(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # -- sampling ---------------------------------------------------------------------------
    def start_index(self, start_step: int | None) -> int:
        """The step a chain starts at: the last unless a valid earlier one is given."""
        if start_step is None:
            return self.num_timesteps - 1
        if not 0 <= int(start_step) < self.num_timesteps:
            raise DiffSegError(f"start step {start_step} is outside this chain's 0..{self.num_timesteps - 1}")
        return int(start_step)

    def sample(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x_start: torch.Tensor,
        draw_noise: Callable[[], torch.Tensor] | None = None,
        sampler: str = "ddpm",
        eta: float = 0.0,
        clip: bool = True,
        clip_range: tuple[float, float] = (-1.0, 1.0),
        clamp_variance: bool = False,
        start_step: int | None = None,
        known_mask: torch.Tensor | None = None,
        known_values: torch.Tensor | None = None,
        self_condition: bool = False,
        resample: int = 1,
    ) -> Iterator[SamplerStep]:
        """Run the reverse chain from x_start down to step 0.

        ``denoise(x_t, model_timesteps)`` returns the network output for the mask state;
        ``draw_noise()`` returns fresh N(0, I) noise shaped like x (default: randn_like).
        ``start_step``: the (respaced) step index x_start sits at; default the last, where
        x_start is pure noise. A smaller one runs only the rest of the chain (SDEdit).
        ``known_mask``/``known_values``: pixels whose clean value is given. After every step
        they are replaced by the given values noised to the new step's level (RePaint), so
        the network fills in the rest consistently with them; at the end they equal the
        values exactly.
        ``resample``: with known pixels, every step but the last is done this many times,
        each repeat after pushing the new state back to the step's level with the forward
        process (RePaint's resampling with jump length 1): the unknown pixels get more than one
        look at the known ones. Costs ``resample`` times the network calls; 1 (default) is off.
        ``self_condition``: the model also takes the previous step's (clipped) x0 estimate,
        called as ``denoise(x_t, model_timesteps, x0_prev)`` (None at the first step).
        Yields a :class:`SamplerStep` after every step, so callers can show progress and
        stop early; the last one's ``x`` is the sample. The settings come checked
        (:class:`options.SamplingOptions`, :class:`options.Guidance`).
        """
        first = self.start_index(start_step)
        if draw_noise is None:
            def draw_noise() -> torch.Tensor:
                return torch.randn_like(x_start)
        known = None if known_mask is None else known_mask.to(torch.bool).expand_as(x_start)

        def impose(x: torch.Tensor, t: int) -> torch.Tensor:
            """The known pixels at the noise level of step t (t = -1: clean)."""
            level = known_values.to(x.dtype) if t < 0 else self.q_sample(known_values.to(x.dtype), t, draw_noise())
            return torch.where(known, level.expand_as(x), x)

        x = x_start if known is None else impose(x_start, first)
        total = first + 1
        x0_prev = None
        for count, t in enumerate(reversed(range(total))):
            repeats = int(resample) if known is not None and t > 0 else 1
            model_t = self.model_timesteps(t, x.shape[0], x.device)
            needs_noise = t > 0 and (sampler == "ddpm" or eta > 0)
            for repeat in range(repeats):
                if repeat:  # back from step t-1 to t: x_t ~ q(x_t | x_{t-1})
                    beta = self._coef("betas", t, x)
                    x = torch.sqrt(1.0 - beta) * x + torch.sqrt(beta) * draw_noise()
                output = denoise(x, model_t, x0_prev) if self_condition else denoise(x, model_t)
                out = self.p_mean_variance(output.to(x.dtype), x, t, clip=clip, clip_range=clip_range,
                                           clamp_variance=clamp_variance)
                x0_prev = out["pred_x0"]
                noise = draw_noise() if needs_noise else None
                if sampler == "ddpm":
                    x = self.ddpm_step(out, t, noise) if noise is not None else out["mean"]
                else:
                    x = self.ddim_step(out, x, t, noise, eta)
                if known is not None:
                    x = impose(x, t - 1)
            yield SamplerStep(count, total, self.timestep_map[t], x, out["pred_x0"])

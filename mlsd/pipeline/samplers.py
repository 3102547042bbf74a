"""A1111 sampler names -> diffusers schedulers, configured from the family's scheduler config."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlsd.errors import UsageError


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: str  # diffusers class name
    options: dict = field(default_factory=dict)
    stochastic: bool = False  # draws fresh noise each step (needs the request's generator)


def _k(name: str, cls: str, stochastic: bool = False, **options) -> list[Sampler]:
    return [Sampler(name, cls, options, stochastic),
            Sampler(f"{name} Karras", cls, {**options, "use_karras_sigmas": True}, stochastic)]


SAMPLERS: dict[str, Sampler] = {s.name: s for s in [
    Sampler("Euler", "EulerDiscreteScheduler"),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", stochastic=True),
    *_k("LMS", "LMSDiscreteScheduler"),
    Sampler("Heun", "HeunDiscreteScheduler"),
    *_k("DPM2", "KDPM2DiscreteScheduler"),
    *_k("DPM2 a", "KDPM2AncestralDiscreteScheduler", stochastic=True),
    *_k("DPM++ 2M", "DPMSolverMultistepScheduler"),
    *_k("DPM++ SDE", "DPMSolverSDEScheduler", stochastic=True),
    *_k("DPM++ 2M SDE", "DPMSolverMultistepScheduler", stochastic=True, algorithm_type="sde-dpmsolver++"),
    Sampler("DDIM", "DDIMScheduler"),
    Sampler("PLMS", "PNDMScheduler"),
    Sampler("UniPC", "UniPCMultistepScheduler"),
]}
DEFAULT_SAMPLER = "DPM++ 2M Karras"


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def resolve_sampler(name: str, schedule_type: str | None = None) -> Sampler:
    """Accepts 'DPM++ 2M Karras' and A1111 >= 1.9's split form ('DPM++ 2M' + schedule 'Karras')."""
    key = name.strip()
    if schedule_type and schedule_type.strip().lower() not in ("", "automatic"):
        key = f"{key} {schedule_type.strip().title()}"
    by_lower = {n.lower(): s for n, s in SAMPLERS.items()}
    sampler = by_lower.get(key.lower())
    if sampler is None:
        raise UsageError(f"Unknown sampler '{key}'.", fix=f"use one of: {', '.join(SAMPLERS)}")
    return sampler


def make_scheduler(sampler: Sampler, base_config: dict, *, seed: int | None = None):
    """A fresh scheduler for one generation (schedulers hold per-run state)."""
    import diffusers

    cls = getattr(diffusers, sampler.scheduler)
    config = dict(base_config)
    if sampler.scheduler == "DPMSolverSDEScheduler":
        # torchsde's Brownian tree is seeded from the config, not a generator: tie it to the request seed
        # so the same seed reproduces on every backend.
        config["noise_sampler_seed"] = seed
    return cls.from_config(config, **sampler.options)

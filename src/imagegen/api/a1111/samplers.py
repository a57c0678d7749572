"""A1111 sampler and schedule names mapped onto the diffusers schedulers of backends/local/schedulers.py.

A1111 (since 1.9) splits a sampler ("DPM++ 2M") from its noise schedule (`scheduler`: "automatic",
"karras", ...); older clients put the schedule in the name ("DPM++ 2M Karras"). Both forms map to one
scheduler name here: "DPM++ 2M" + "karras" -> dpmpp_2m_karras, "Euler a" -> euler_a. A schedule
type with no diffusers counterpart for that sampler runs the sampler's own schedule and is reported
in `info.ignored_parameters`; an unknown sampler or schedule name is a 422 listing the known ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagegen.backends.local.schedulers import SCHEDULERS
from imagegen.errors import InvalidParameterError


@dataclass(frozen=True)
class Sampler:
    name: str  # A1111's display name, what GET /sdapi/v1/samplers lists
    scheduler: str  # our scheduler with the sampler's own schedule ("automatic")
    karras: str | None  # our scheduler with Karras sigmas, where diffusers has one
    aliases: tuple[str, ...] = ()  # A1111's aliases (k-diffusion names)


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", "dpmpp_2m", "dpmpp_2m_karras", ("k_dpmpp_2m",)),
    Sampler("DPM++ SDE", "dpmpp_sde", None, ("k_dpmpp_sde",)),
    Sampler("DPM++ 2M SDE", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", ("k_dpmpp_2m_sde",)),
    Sampler("Euler a", "euler_a", None, ("k_euler_a", "k_euler_ancestral")),
    Sampler("Euler", "euler", "euler_karras", ("k_euler",)),
    Sampler("Heun", "heun", None, ("k_heun",)),
    Sampler("DPM2", "dpm2", None, ("k_dpm_2",)),
    Sampler("DPM2 a", "dpm2_a", None, ("k_dpm_2_a",)),
    Sampler("DDIM", "ddim", None, ()),
    Sampler("PLMS", "pndm", None, ()),
    Sampler("UniPC", "unipc", None, ()),
    Sampler("LCM", "lcm", None, ()),
    Sampler("DEIS", "deis", None, ()),  # not in A1111 (SD.Next has it); diffusers does
)

#: The schedule types GET /sdapi/v1/schedulers lists: the ones honoured.
SCHEDULE_TYPES: tuple[tuple[str, str], ...] = (("automatic", "Automatic"), ("karras", "Karras"))
#: A1111's other schedule types: accepted, but diffusers' schedulers here have no such option, so
#: the sampler's own schedule runs and `scheduler` is reported as ignored.
_UNHONOURED_SCHEDULES = frozenset(
    {
        "uniform",
        "exponential",
        "polyexponential",
        "sgm_uniform",
        "kl_optimal",
        "align_your_steps",
        "simple",
        "normal",
        "ddim",
        "beta",
    }
)

_BY_NAME: dict[str, Sampler] = {}
for _sampler in SAMPLERS:
    for _key in (_sampler.name, *_sampler.aliases, _sampler.scheduler):
        _BY_NAME[_key.casefold()] = _sampler
_DEFAULT = Sampler("Default", "default", None)
_BY_SCHEDULER: dict[str, tuple[str, str]] = {}
for _sampler in SAMPLERS:
    _BY_SCHEDULER[_sampler.scheduler] = (_sampler.name, "Automatic")
    if _sampler.karras:
        _BY_SCHEDULER[_sampler.karras] = (_sampler.name, "Karras")


def _sampler_named(name: str) -> tuple[Sampler, bool]:
    """(sampler, karras from a legacy "... Karras" name)."""
    key = name.strip().casefold()
    if key == "default":
        return _DEFAULT, False
    if key in _BY_NAME:
        return _BY_NAME[key], False
    if key.endswith(" karras") and key[: -len(" karras")] in _BY_NAME:
        return _BY_NAME[key[: -len(" karras")]], True
    if key in SCHEDULERS:  # our own names ("dpmpp_2m_karras") work as sampler names too
        own = next((s for s in SAMPLERS if key in (s.scheduler, s.karras)), None)
        if own is not None:
            return own, key == own.karras
    raise InvalidParameterError(
        f"unknown sampler; available: {', '.join(s.name for s in SAMPLERS)} (GET /sdapi/v1/samplers)",
        param="sampler_name",
    )


def to_scheduler(sampler_name: str | None, schedule: str | None) -> tuple[str, list[str]]:
    """Our scheduler name for an A1111 (sampler_name, scheduler) pair, and the A1111 fields ignored."""
    sampler, karras = _sampler_named(sampler_name) if sampler_name and sampler_name.strip() else (_DEFAULT, False)
    ignored: list[str] = []
    key = (schedule or "").strip().casefold()
    if key in ("", "automatic"):
        pass
    elif key == "karras":
        karras = True
    elif key in _UNHONOURED_SCHEDULES:
        ignored.append("scheduler")
    else:
        raise InvalidParameterError(
            f"unknown scheduler; available: {', '.join(name for name, _ in SCHEDULE_TYPES)} (GET /sdapi/v1/schedulers)",
            param="scheduler",
        )
    if karras and sampler.karras is None:
        ignored.append("scheduler")  # this sampler has no Karras variant in diffusers: its own schedule runs
        karras = False
    return (sampler.karras if karras else sampler.scheduler) or sampler.scheduler, ignored


def a1111_names(scheduler: str | None) -> tuple[str, str] | None:
    """(A1111 sampler name, schedule type label) of one of our schedulers; None when none ran."""
    if scheduler is None:
        return None
    return _BY_SCHEDULER.get(scheduler, ("Default", "Automatic"))

"""The documented set of samplers ("schedulers" in diffusers' words) a request may name.

Names are plain strings so the API validates them without importing diffusers; the classes are
looked up only when a pipeline runs.
"""

from __future__ import annotations

from typing import Any

#: name -> (diffusers class name, config overrides, description)
SCHEDULERS: dict[str, tuple[str | None, dict[str, Any], str]] = {
    "default": (None, {}, "the model's own scheduler"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler ancestral (A1111 'Euler a')"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    # skip_prk_steps: plain PLMS, as SD's own PNDM config; the Runge-Kutta warm-up breaks at few steps.
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PNDM / PLMS"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "DPM++ 2M SDE"),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        "DPM++ 2M SDE Karras",
    ),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {}, "DPM++ SDE (single step)"),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "Euler Karras"),
    "dpm2": ("KDPM2DiscreteScheduler", {}, "DPM2"),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}, "DPM2 ancestral"),
    "deis": ("DEISMultistepScheduler", {}, "DEIS"),
    "lcm": ("LCMScheduler", {}, "LCM (for LCM-distilled models)"),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)


def make_scheduler(name: str | None, base_config: Any) -> Any:
    """A fresh scheduler instance for one pipeline call, built from the model's own config."""
    import diffusers

    class_name, overrides, _ = SCHEDULERS[name or "default"]
    if class_name is None:
        return None
    scheduler_class = getattr(diffusers, class_name)
    return scheduler_class.from_config(base_config, **overrides)

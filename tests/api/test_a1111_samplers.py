"""A1111 sampler + schedule names -> the diffusers schedulers (api/a1111_samplers.py)."""

from __future__ import annotations

import pytest

from imagegen.api.a1111.samplers import SAMPLERS, a1111_names, to_scheduler
from imagegen.backends.local.schedulers import SCHEDULERS
from imagegen.errors import InvalidParameterError


@pytest.mark.parametrize(
    ("sampler", "schedule", "expected", "ignored"),
    [
        ("DPM++ 2M", "Karras", "dpmpp_2m_karras", []),
        ("DPM++ 2M", "karras", "dpmpp_2m_karras", []),
        ("DPM++ 2M", "automatic", "dpmpp_2m", []),
        ("DPM++ 2M Karras", None, "dpmpp_2m_karras", []),  # the pre-1.9 combined name
        ("DPM++ 2M Karras", "automatic", "dpmpp_2m_karras", []),  # what webuiapi sends with it
        ("DPM++ 2M SDE", "karras", "dpmpp_2m_sde_karras", []),
        ("Euler a", "automatic", "euler_a", []),
        ("euler a", None, "euler_a", []),
        ("k_euler_a", None, "euler_a", []),
        ("Euler", "karras", "euler_karras", []),
        ("Euler a", "karras", "euler_a", ["scheduler"]),  # no Karras variant: its own schedule, reported
        ("DDIM", "sgm_uniform", "ddim", ["scheduler"]),  # an A1111 schedule diffusers has no option for
        ("PLMS", None, "pndm", []),
        ("UniPC", "", "unipc", []),
        (None, None, "default", []),
        ("", "automatic", "default", []),
        ("dpmpp_2m_karras", None, "dpmpp_2m_karras", []),  # our own names work too
        ("Default", None, "default", []),
    ],
)
def test_mapping(sampler: str | None, schedule: str | None, expected: str, ignored: list[str]) -> None:
    assert to_scheduler(sampler, schedule) == (expected, ignored)


@pytest.mark.parametrize(
    ("sampler", "schedule", "param"),
    [("DPM fast", None, "sampler_name"), ("LMS", None, "sampler_name"), ("Euler", "bogus", "scheduler")],
)
def test_unknown_names_are_422_naming_the_field(sampler: str, schedule: str | None, param: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        to_scheduler(sampler, schedule)
    assert caught.value.param == param and "available" in caught.value.message


def test_every_sampler_runs_a_known_scheduler_and_maps_back() -> None:
    for sampler in SAMPLERS:
        for name, label in ((sampler.scheduler, "Automatic"), (sampler.karras, "Karras")):
            if name is not None:
                assert name in SCHEDULERS
                assert a1111_names(name) == (sampler.name, label)
    assert a1111_names(None) is None and a1111_names("default") == ("Default", "Automatic")

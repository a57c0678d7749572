"""imagegen: one HTTP API in front of Stable Diffusion, FLUX (local) and the BFL FLUX cloud API."""

__version__ = "0.1.0"

"""Imported once by the fork server of the device processes (supervisor.py, on Linux), before it forks
any: each device process then starts as a cheap fork with torch, diffusers, transformers, the pipeline
classes and the service's own local modules already imported, instead of paying seconds of imports.

Importing torch creates no CUDA context (CUDA initialises on first use, in a device process, after
its fork), so forking afterwards is safe. Without the `local` extra the imports are skipped: the
local backends then report that they cannot run, and no device process is started.
"""

from __future__ import annotations

try:
    from imagegen.backends.local.support import quiet_libraries

    quiet_libraries()  # before diffusers' first import: some notices print at import time
    import torch  # noqa: F401 - imported for its side effect: in memory before the fork
    from diffusers import (  # noqa: F401 - the lazy module imports each pipeline on first access
        AutoPipelineForText2Image,
        DiffusionPipeline,
        Flux2KleinPipeline,
        FluxPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from diffusers.pipelines.stable_diffusion.safety_checker import (  # noqa: F401 - imported for the fork
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer  # noqa: F401 - the same
except ImportError:
    pass

# The service's own modules a device process runs (imported for the fork, unused here).
from imagegen.backends.local import flux_local, host, safety, schedulers, sd  # noqa: F401

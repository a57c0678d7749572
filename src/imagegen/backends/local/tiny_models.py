"""Built-in tiny random-weight pipelines, built offline from configs.

No machine here reaches a model hub, so the real loading path (`from_pretrained` on a folder) is
exercised on pipelines the project builds itself: same classes, same files on disk, a few hundred
kilobytes of random weights. `tiny-sd`, `tiny-sd-512`, `tiny-sdxl` (sd backend), `tiny-flux2-klein` and
`tiny-flux` (flux-local backend) are selectable model ids (`make demo` serves tiny-sd-512, whose VAE has
SD's real scale factor: 512x512 images in about a second on a CPU); the builders also take options
tests need (a safety checker that flags every image, a VAE that produces NaN).

Weights are seeded, so a tiny model and its images are identical on every machine. Everything
here imports torch; call it only from a loading path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

TINY_SD = "tiny-sd"
TINY_SD_512 = "tiny-sd-512"
TINY_SDXL = "tiny-sdxl"
TINY_SAFETY_CHECKER = "tiny-safety-checker"
TINY_FLUX2_KLEIN = "tiny-flux2-klein"
TINY_FLUX = "tiny-flux"

#: Marker written last: a folder without it is an interrupted build and is rebuilt.
COMPLETE_MARKER = ".imagegen-complete"
BUILTIN_SUBDIR = "builtin"

_build_lock = threading.Lock()


def _clip_tokenizer() -> Any:
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # The pipelines pad every prompt to model_max_length; 77 is what CLIP text encoders expect.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _clip_text_config(tokenizer: Any, **overrides: Any) -> Any:
    from transformers import CLIPTextConfig

    values = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
    )
    values.update(overrides)
    return CLIPTextConfig(**values)


def _safety_checker(flag_all: bool) -> tuple[Any, Any]:
    """A tiny CLIP safety checker. Random weights never flag (thresholds start at 1.0 and a flag
    needs cosine > threshold); a weight of -2.0 makes every image flagged."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=514,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=2,
            num_hidden_layers=2,
            image_size=32,
            patch_size=4,
        ),
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config)
    if flag_all:
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(-2.0)
    processor = CLIPImageProcessor(crop_size=32, size=32)
    return checker, processor


def _ddim() -> Any:
    from diffusers import DDIMScheduler

    # steps_offset=1 matches real SD configs (and silences the "outdated config" warning).
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _tiny_vae(blocks: int = 2) -> Any:
    from diffusers import AutoencoderKL

    # Two blocks: a scale factor of 2; four blocks: 8, as real SD VAEs have.
    channels = [4, 8, 8, 8][:blocks]
    return AutoencoderKL(
        block_out_channels=channels,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=64 * 2 ** (blocks - 2),
    )


def build_tiny_sd(
    target: Path,
    *,
    with_safety_checker: bool = True,
    flag_all: bool = False,
    inpainting: bool = False,
    native_size: int = 64,
) -> None:
    """An SD 1.x-style pipeline (StableDiffusionPipeline with its own safety checker).

    `inpainting`: an inpainting checkpoint instead (a 9-channel UNet: latents, masked-image latents and
    the mask, saved as a StableDiffusionInpaintPipeline, as such checkpoints are). `native_size` 64: a
    VAE with a scale factor of 2 (latents 32x32); 512: SD's real factor of 8 (latents 64x64), so that
    512x512 images cost what 64x64 ones cost with the first (`make demo`'s tiny-sd-512)."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    vae_blocks = 4 if native_size >= 512 else 2
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=native_size // 2 ** (vae_blocks - 1),
        in_channels=9 if inpainting else 4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    checker, processor = _safety_checker(flag_all) if with_safety_checker else (None, None)
    pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    # Any: diffusers declares save_pretrained on a mixin mypy does not see through.
    pipe: Any = pipeline_class(
        vae=_tiny_vae(vae_blocks),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim(),
        safety_checker=checker,
        feature_extractor=processor,
        requires_safety_checker=with_safety_checker,
    )
    pipe.save_pretrained(target, safe_serialization=True)


def build_tiny_sd_512(target: Path) -> None:
    """tiny-sd with SD's VAE scale factor (8): native 512x512, as fast as tiny-sd at 64x64."""
    build_tiny_sd(target, native_size=512)


def build_tiny_sdxl(target: Path) -> None:
    """An SDXL-style pipeline: two text encoders, text-time conditioning, no safety checker."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, projection_dim=32))
    addition_time_embed_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        transformer_layers_per_block=(1, 1),
        # 6 micro-conditioning values x time-embed dim + text_encoder_2's projection
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + 32,
        cross_attention_dim=64,  # both encoders' hidden sizes, concatenated
        norm_num_groups=2,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe: Any = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(target, safe_serialization=True)


def build_tiny_safety_checker(target: Path, *, flag_all: bool = False) -> None:
    """A standalone checker in the layout of a pipeline repository (safety_checker/,
    feature_extractor/), the same layout the default standalone checker source uses."""
    import torch

    torch.manual_seed(0)
    checker, processor = _safety_checker(flag_all)
    checker.save_pretrained(target / "safety_checker", safe_serialization=True)
    processor.save_pretrained(target / "feature_extractor")


# Qwen3's chat template, reduced to what Flux2KleinPipeline uses: one user turn, the generation
# prompt, and the empty think block that `enable_thinking=False` asks for.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def _qwen_tokenizer() -> Any:
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template (no merges)."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    for token in specials:
        vocab[token] = len(vocab)
    # Klein pads every prompt to 512 tokens.
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    return tokenizer


def _t5_tokenizer() -> Any:
    """A unigram T5 tokenizer over printable ASCII (bare and word-initial pieces)."""
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for char in string.printable:
        if not char.isspace():
            pieces += [(char, -5.0), ("\u2581" + char, -4.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _poison(module: Any) -> None:
    """Fill every floating-point weight with NaN: a model that can only produce NaN pixels."""
    import torch

    with torch.no_grad():
        for parameter in module.parameters():
            parameter.fill_(float("nan"))


#: The tiny FLUX VAEs (klein's and FLUX.1's): two blocks, a scale factor of 2 (the real one has 8);
#: sample_size is the VAE's tile size.
_FLUX_VAE: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "latent_channels": 1,
    "norm_num_groups": 1,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def build_tiny_flux2_klein(target: Path, *, distilled: bool = True, nan_vae: bool = False) -> None:
    """A FLUX.2 [klein]-style pipeline: Qwen3 text encoder, Flux2 transformer and VAE.

    The pipeline stacks the encoder's hidden states of layers (9, 18, 27), so the tiny encoder
    needs 28 layers, and the transformer's joint_attention_dim is 3 x the encoder's hidden size."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tokenizer = _qwen_tokenizer()
    hidden = 16
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            hidden_size=hidden,
            intermediate_size=16,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
    )
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * hidden,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    )
    vae: Any = AutoencoderKLFlux2(**_FLUX_VAE)
    if nan_vae:
        _poison(vae.decoder)
    pipe: Any = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=distilled,
    )
    pipe.save_pretrained(target, safe_serialization=True)


def build_tiny_flux(
    target: Path,
    *,
    guidance_embeds: bool = False,
    t5_vocab_rows: int | None = None,
    save_dtype: str | None = None,
    nan_vae: bool = False,
) -> None:
    """A FLUX.1-style pipeline (CLIP + T5 encoders). Without guidance embeddings it is shaped like
    [schnell]; with them like [dev].

    `t5_vocab_rows` pads T5's embedding table with unused rows: ballast that makes the model's
    memory measurable without making generation slower. `save_dtype="bfloat16"` stores the weights
    the way real FLUX checkpoints are stored; loading them in float32 then converts every tensor into
    process memory (float32 files would be memory-mapped, and unread rows would never count)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    # A dict: T5Config takes decoder_start_token_id through **kwargs, which its stubs do not declare.
    t5_config: dict[str, Any] = dict(
        vocab_size=max(len(tokenizer_2), t5_vocab_rows or 0),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    text_encoder_2 = T5EncoderModel(T5Config(**t5_config))
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=32,  # CLIP hidden size
        axes_dims_rope=[4, 4, 8],  # sums to the head dim
        guidance_embeds=guidance_embeds,
    )
    vae: Any = AutoencoderKL(
        **_FLUX_VAE,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    if nan_vae:
        _poison(vae.decoder)
    pipe: Any = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    if save_dtype is not None:
        pipe.to(getattr(torch, save_dtype))
    pipe.save_pretrained(target, safe_serialization=True)


BUILDERS: dict[str, Callable[[Path], None]] = {
    TINY_SD: build_tiny_sd,
    TINY_SD_512: build_tiny_sd_512,
    TINY_SDXL: build_tiny_sdxl,
    TINY_SAFETY_CHECKER: build_tiny_safety_checker,
    TINY_FLUX2_KLEIN: build_tiny_flux2_klein,
    TINY_FLUX: build_tiny_flux,
}


def checker_for(checker_id: str, model_id: str) -> str:
    """The safety checker the service pairs with a model: built-in tiny models are offline, so with
    the default (hub) checker setting they get the built-in tiny checker."""
    from imagegen.config import DEFAULT_SAFETY_CHECKER

    if checker_id == DEFAULT_SAFETY_CHECKER and is_builtin(model_id):
        return TINY_SAFETY_CHECKER
    return checker_id


def is_builtin(model_id: str) -> bool:
    return model_id in BUILDERS


def builtin_path(model_dir: Path, model_id: str) -> Path:
    return Path(model_dir) / BUILTIN_SUBDIR / model_id


def ensure_builtin(model_dir: Path, model_id: str) -> Path:
    """Build a built-in tiny model into model_dir once; return its folder."""
    target = builtin_path(model_dir, model_id)
    if (target / COMPLETE_MARKER).exists():
        return target
    with _build_lock:
        if (target / COMPLETE_MARKER).exists():
            return target
        build(BUILDERS[model_id], target)
    return target


def build(builder: Callable[[Path], None], target: Path) -> None:
    """Run a builder into a temporary sibling folder, then move it into place, so that an
    interrupted build or a concurrent process never leaves a half-written model behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        builder(staging)
        (staging / COMPLETE_MARKER).write_text(json.dumps({"builder": getattr(builder, "__name__", repr(builder))}))
        if target.exists():
            if (target / COMPLETE_MARKER).exists():
                return  # another process finished first
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError:
        if not (target / COMPLETE_MARKER).exists():
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

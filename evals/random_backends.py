"""Random-weight diffusers pipelines and SAM checkpoints, written to disk like the real ones.

Why: no diffusion or SAM weights ship in a registry package (DESIGN §8), yet the production backends
must be tested here and timed on GPU machines that have no weights. These builders write folders and
checkpoints in exactly the layouts the backends load (``save_pretrained`` pipeline folders, SAM state
dicts), so tests and benchmarks exercise the production load path. Two sizes: ``tiny`` (tests: a 64 px
SD inpainting pipeline in about a megabyte, a 256 px two-block SAM) and ``full`` (the real
architectures of SD 1.5 inpainting and SAM vit_b/l/h, random weights: the same compute as the
published models). Only torch, diffusers, transformers and segment-anything are needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

#: A CLIP vocabulary of single characters (BPE without merges): enough to tokenise any prompt.
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'()-_/"


def tiny_clip_tokenizer() -> Any:
    """A CLIP tokenizer over a character vocabulary (transformers 5 builds it from vocab and merges).

    The pipeline's `save_pretrained` writes it beside the models, so the folder loads offline.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def sd_inpaint_pipeline(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a Stable Diffusion inpainting pipeline (9-channel UNet) with random weights to `folder`.

    Args:
        folder: Output folder (a diffusers pipeline folder with model_index.json).
        size: ``tiny`` (64 px, for tests) or ``full`` (the SD 1.5 inpainting architecture, 512 px).
        seed: Seed of the random weights.

    Returns:
        The folder.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    if size == "tiny":
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=9, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, norm_num_groups=32, attention_head_dim=4,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64,
        )
        text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              vocab_size=len(_CHARS) * 2 + 2, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                              max_position_embeddings=77, projection_dim=32)
    elif size == "full":
        unet = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4, cross_attention_dim=768,
                                    attention_head_dim=8)  # the other defaults are SD 1.x's
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                              vocab_size=49408, max_position_embeddings=77, projection_dim=768,
                              bos_token_id=0, eos_token_id=1, pad_token_id=1)
    else:
        raise ValueError(f"size must be tiny or full; got {size}")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tiny_clip_tokenizer(), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    json.loads((folder / "model_index.json").read_text())  # written, readable
    return folder


def sdxl_inpaint_pipeline(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a Stable Diffusion XL inpainting pipeline (9-channel UNet, two text encoders) with random weights.

    Why: SDXL inpainting is the common production choice at 1024 px; its UNet is ~2.6B parameters with
    micro-conditioning ("text_time" added embeddings), so its cost cannot be read off SD 1.5's.

    Args:
        folder: Output folder (a diffusers pipeline folder with model_index.json).
        size: ``tiny`` (same structure, small widths, for tests) or ``full`` (the SDXL architecture, 1024 px).
        seed: Seed of the random weights.

    Returns:
        The folder.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    if size == "tiny":
        widths, per_block, heads, sample = (32, 64), (1, 2), (2, 4), 32
        text_1 = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
        text_2 = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
        vae_widths, vae_sample = (32, 64), 64
        down = ("DownBlock2D", "CrossAttnDownBlock2D")
        up = ("CrossAttnUpBlock2D", "UpBlock2D")
    elif size == "full":
        widths, per_block, heads, sample = (320, 640, 1280), (1, 2, 10), (5, 10, 20), 128
        text_1 = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
        text_2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32)
        vae_widths, vae_sample = (128, 256, 512, 512), 1024
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    else:
        raise ValueError(f"size must be tiny or full; got {size}")
    cross = text_1["hidden_size"] + text_2["hidden_size"]
    time_dim = 256 if size == "full" else 8
    unet = UNet2DConditionModel(
        sample_size=sample, in_channels=9, out_channels=4, down_block_types=down, up_block_types=up,
        block_out_channels=widths, layers_per_block=2, transformer_layers_per_block=per_block,
        attention_head_dim=heads, cross_attention_dim=cross, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        # pooled text (text_2 width) + 6 micro-conditioning numbers, each embedded in time_dim
        projection_class_embeddings_input_dim=text_2["hidden_size"] + 6 * time_dim,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(block_out_channels=vae_widths, latent_channels=4, layers_per_block=2 if size == "full" else 1,
                        sample_size=vae_sample, down_block_types=("DownEncoderBlock2D",) * len(vae_widths),
                        up_block_types=("UpDecoderBlock2D",) * len(vae_widths))
    common = dict(vocab_size=len(_CHARS) * 2 + 2 if size == "tiny" else 49408, max_position_embeddings=77,
                  bos_token_id=0, eos_token_id=1, pad_token_id=1)
    encoder_1 = CLIPTextModel(CLIPTextConfig(**text_1, **common, projection_dim=text_1["hidden_size"]))
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_2, **common, projection_dim=text_2["hidden_size"]))
    tokenizer = tiny_clip_tokenizer()
    pipe = StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=encoder_1, text_encoder_2=encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                    steps_offset=1, timestep_spacing="leading"),
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.save_pretrained(str(folder))
    return folder


def sam_checkpoint(path: str | Path, model_type: str = "tiny", seed: int = 0) -> Path:
    """Write a SAM state dict with random weights: ``tiny`` (256 px, 2 blocks) or vit_b / vit_l / vit_h."""
    from tools.mask_gen_sam import SamArchitecture, build_sam, published_architecture

    if model_type == "tiny":
        arch = SamArchitecture(embed_dim=32, depth=2, num_heads=2, img_size=256, patch_size=16, mlp_ratio=2.0,
                               window_size=14, global_attn_indexes=(1,), out_chans=32, decoder_depth=1,
                               decoder_mlp_dim=64)
    else:
        arch = published_architecture(model_type)
    torch.manual_seed(seed)
    model = build_sam(arch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def flux_fill_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny FLUX.1 Fill pipeline with random weights (tests of the ``flux-fill`` path).

    The shapes follow diffusers' own FluxFill test components; both tokenizers are the character CLIP
    tokenizer (any tokenizer that pads to a length serves the T5 encoder), so nothing is downloaded.
    """
    from diffusers import FluxFillPipeline

    FluxFillPipeline(**_flux_components(in_channels=20, out_channels=8, seed=seed)).save_pretrained(str(folder))
    return Path(folder)


def flux_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny guidance-distilled FLUX.1 (dev-like) text-to-image pipeline with random weights.

    `AutoPipelineForInpainting` maps such a folder to `FluxInpaintPipeline` (tests of that path).
    """
    from diffusers import FluxPipeline

    FluxPipeline(**_flux_components(in_channels=8, out_channels=8, seed=seed)).save_pretrained(str(folder))
    return Path(folder)


def _flux_components(in_channels: int, out_channels: int, seed: int) -> dict[str, Any]:
    """The components of a tiny FLUX.1 pipeline (2 latent channels: 8 once packed 2x2)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vocab = len(_CHARS) * 2 + 2
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=out_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=True,
    )
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                        max_position_embeddings=77, projection_dim=32))
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=1))
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=2, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    tokenizer = tiny_clip_tokenizer()
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae, "text_encoder": clip, "tokenizer": tokenizer,
            "text_encoder_2": t5, "tokenizer_2": tokenizer, "transformer": transformer}

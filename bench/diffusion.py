"""Stable Diffusion as one trainable module (the DreamBooth task's model) and its image generator.

The runner trains `model(**batch).loss` and methods adapt layers by name, so the networks of a text-to-image model
are held by one module, DreamBoothModel: the UNet and the CLIP text encoder are its submodules (a method's
`target_modules` reach them: `to_q`/`to_k`/`to_v`/`to_out.0` are the UNet's attention projections, `q_proj`/
`k_proj`/`v_proj`/`out_proj` the text encoder's); the VAE is held outside the module tree, so no method can see,
adapt, unfreeze or count it (its attention layers are also called `to_q`...), yet `.to(device)` moves it.

Two sources, as for every model (conf/model/<name>.yaml):
- hub (model=sd15): `from_pretrained` of the subfolders unet, vae, text_encoder, tokenizer, scheduler of a hub id or
  a local folder in diffusers' layout. No PyPI package ships diffusion weights: this path needs hub access.
- random (model=tiny_sd): a tiny model from the configs in the YAML, as diffusers' own pipeline tests build one, and
  a CLIP tokenizer built offline (tiny_clip_tokenizer; diffusers' tests load hf-internal-testing/tiny-random-clip
  from the hub instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from bench.models import LoadedModel, ModelUnavailableError
from tasks.base import HeadSpec

try:
    from diffusers import (AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from diffusers.utils import logging as diffusers_logging
except ImportError as e:  # the `diffusion` extra
    raise ImportError("the DreamBooth task needs diffusers: pip install -e '.[diffusion]' (or `make install`)") from e

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def tiny_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer built offline for the random models: CLIP's byte-level BPE with no merges.

    Its vocabulary is the 256 byte-level symbols with and without CLIP's end-of-word marker `</w>`, plus
    <|startoftext|> and <|endoftext|> (514 tokens): text is tokenised as CLIP tokenises it, one symbol per character
    (lower-cased, words split as CLIP splits them). diffusers' tests load hf-internal-testing/tiny-random-clip from
    the hub, and no installed package ships CLIP's vocab.json/merges.txt, so the vocabulary is made here.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())  # 256 byte-level symbols
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


@dataclass
class DiffusionOutput:
    loss: torch.Tensor  # what the runner trains: instance loss + λ·prior loss
    instance_loss: torch.Tensor  # mean squared error on the instance (subject) images
    prior_loss: torch.Tensor | None  # the same on the class images (prior preservation), else None
    per_example: torch.Tensor  # (N,) mean squared error of each image of the batch


class DreamBoothModel(nn.Module):
    """The latent-diffusion denoising loss that DreamBooth fine-tunes, with its optional prior preservation:

        z0 = s·E(x)  (frozen VAE encoder E, a sample of its posterior; s = vae.config.scaling_factor)
        ε ~ N(0, I),  t ~ U{0, …, T−1},  z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε,  c = τ(y)  (CLIP text encoder, prompt y)
        L = ‖ε_θ(z_t, t, c) − target‖²,  target = ε (epsilon prediction) or v = √ᾱ_t·ε − √(1−ᾱ_t)·z0 (v prediction),
            as the noise scheduler's config says
        with prior preservation (the batch holds instance images, then as many class images from the frozen model):
        L = L_instance + λ·L_class

    Ruiz et al., "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven Generation",
    arXiv 2208.12242 (the loss: their Eq. 2); latent diffusion: Rombach et al., arXiv 2112.10752. No official code
    (google/dreambooth holds the dataset only); the reference implementation for Stable Diffusion is diffusers'
    examples/dreambooth/train_dreambooth_lora.py @ 80628708190f02a67c5c8ee791b3881dfd8a122d.

    The VAE is frozen and outside the module tree. The text encoder is trained exactly when a method left any of its
    parameters trainable (LoRA with q_proj/k_proj/v_proj/out_proj among target_modules, or full fine-tuning); else
    it runs without gradients, as in diffusers' script without --train_text_encoder.

    Args:
        unet: the denoiser ε_θ (UNet2DConditionModel).
        vae: the autoencoder (AutoencoderKL); frozen.
        text_encoder: the prompt encoder τ (CLIPTextModel).
        tokenizer: its tokenizer (CLIPTokenizer), used by generate().
        noise_scheduler: the training noise schedule (DDPMScheduler); also the config of the sampler.
    """

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, noise_scheduler: DDPMScheduler) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        vae.requires_grad_(False)
        vae.eval()
        self._frozen = {"vae": vae}  # a dict, not a submodule: invisible to named_modules()/parameters()
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {noise_scheduler.config.prediction_type!r} in the scheduler "
                             "config; epsilon and v_prediction are supported")

    @property
    def vae(self) -> AutoencoderKL:
        return self._frozen["vae"]

    def _apply(self, fn: Any, recurse: bool = True) -> DreamBoothModel:
        """`.to()`, `.cuda()`, `.float()`... reach the VAE too, although it is not a submodule."""
        super()._apply(fn, recurse)
        self.vae._apply(fn, recurse)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def text_encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.text_encoder.parameters())

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(N, L) token ids, padded and truncated to the tokenizer's length (77 for CLIP), as diffusers does."""
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] → (N, 4, H/f, W/f) scaled latents (a sample of the VAE posterior)."""
        vae = self.vae
        posterior = vae.encode(pixel_values.to(next(vae.parameters()).dtype)).latent_dist
        return posterior.sample() * vae.config.scaling_factor

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, is_prior: torch.Tensor | None = None,
                prior_loss_weight: torch.Tensor | float = 1.0) -> DiffusionOutput:
        """The denoising loss of a batch.

        Args:
            pixel_values: (N, 3, H, W) images in [-1, 1].
            input_ids: (N, L) prompt token ids.
            is_prior: (N,) True for class images (prior preservation); None when there are none.
            prior_loss_weight: λ, the weight of the class-image loss.
        """
        latents = self.encode_images(pixel_values).float()  # (N, 4, h, w)
        noise = torch.randn_like(latents)  # (N, 4, h, w)
        n = latents.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)  # (N, 4, h, w)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_encoder_trainable()):
            cond = self.text_encoder(input_ids)[0]  # (N, L, d)
        pred = self.unet(noisy, timesteps, cond).sample  # (N, 4, h, w)
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)  # (N, 4, h, w)
        per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (N,)
        if is_prior is None or not bool(is_prior.any()):
            loss = per_example.mean()
            return DiffusionOutput(loss=loss, instance_loss=loss, prior_loss=None, per_example=per_example)
        is_prior = is_prior.bool()
        instance_loss = per_example[~is_prior].mean()
        prior_loss = per_example[is_prior].mean()
        weight = torch.as_tensor(prior_loss_weight, dtype=prior_loss.dtype, device=prior_loss.device)
        return DiffusionOutput(loss=instance_loss + weight * prior_loss, instance_loss=instance_loss,
                               prior_loss=prior_loss, per_example=per_example)

    def pipeline(self) -> StableDiffusionPipeline:
        """A diffusers pipeline over this model's (wrapped) networks, sampling with DPM-Solver++ (multistep) on the
        training schedule, as diffusers' DreamBooth script samples its validation images."""
        sampler = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=sampler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float,
                 resolution: int | None = None, autocast_dtype: torch.dtype | None = None) -> list[Image.Image]:
        """One image per prompt; image i starts from the noise of `torch.Generator().manual_seed(seeds[i])`, drawn on
        the CPU, so a seed gives the same starting noise on every device and for every method."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        was_training = self.training
        self.eval()
        size = resolution or self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        device = self.device
        try:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                images = self.pipeline()(list(prompts), height=size, width=size, num_inference_steps=steps,
                                         guidance_scale=guidance_scale, generator=generators, output_type="pil").images
        finally:
            self.train(was_training)
        return images


def find_dreambooth(model: nn.Module) -> DreamBoothModel:
    """The DreamBoothModel inside whatever a method returned (a PeftModel, or the model with swapped layers)."""
    for module in model.modules():
        if isinstance(module, DreamBoothModel):
            return module
    raise TypeError(f"no DreamBoothModel inside {type(model).__name__}; the DreamBooth task needs a diffusion model "
                    "(model=sd15, or model=tiny_sd in tests)")


def _random_components(cfg: DictConfig) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer,
                                                  DDPMScheduler]:
    """A tiny Stable Diffusion from the configs in conf/model/<name>.yaml (random_config), seeded by the caller."""
    rc = OmegaConf.to_container(cfg.random_config, resolve=True)
    missing = sorted({"unet", "vae", "text_encoder", "scheduler"} - set(rc))
    if missing:
        raise ValueError(f"model.random_config lacks {missing}: a random diffusion model needs configs for unet, vae, "
                         "text_encoder and scheduler (see conf/model/tiny_sd.yaml)")
    tokenizer = tiny_clip_tokenizer()
    te = dict(rc["text_encoder"])
    if te.get("vocab_size", 0) < len(tokenizer):
        raise ValueError(f"model.random_config.text_encoder.vocab_size must be >= {len(tokenizer)} (the offline "
                         f"tokenizer's size); got {te.get('vocab_size')}")
    te.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id, max_position_embeddings=tokenizer.model_max_length)
    unet = UNet2DConditionModel(**rc["unet"])
    vae = AutoencoderKL(**rc["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**te))
    return unet, vae, text_encoder, tokenizer, DDPMScheduler(**rc["scheduler"])


def _pretrained_components(source: str, revision: str | None) -> tuple[UNet2DConditionModel, AutoencoderKL,
                                                                        CLIPTextModel, CLIPTokenizer, DDPMScheduler]:
    """The five subfolders of a Stable Diffusion repository (hub id or local folder), in fp32 for training."""
    kw = {"revision": revision} if revision else {}
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return unet, vae, text_encoder, tokenizer, scheduler


def load_diffusion_model(cfg: DictConfig, head: HeadSpec) -> LoadedModel:
    """A DreamBoothModel from conf/model/<name>.yaml: `source: random` builds the tiny test model from random_config
    (seeded by the runner's seed); `hub`/`auto` load `id` (a hub id or a local folder in diffusers' layout)."""
    if cfg.source == "random":
        unet, vae, text_encoder, tokenizer, scheduler = _random_components(cfg)
        source = "random"
    elif cfg.source in ("hub", "auto"):
        if not cfg.get("id"):
            raise ModelUnavailableError("model.id is empty: set model.id=<hub id or folder of a Stable Diffusion "
                                        "model>")
        try:
            unet, vae, text_encoder, tokenizer, scheduler = _pretrained_components(str(cfg.id), cfg.get("revision"))
        except OSError as e:
            raise ModelUnavailableError(
                f"could not load Stable Diffusion {cfg.id!r} ({', '.join(SUBFOLDERS)}): {e}\nNo PyPI package ships "
                "diffusion weights: this needs the Hugging Face hub, or model.id=<a local folder in diffusers' "
                "layout>. The offline tests use model=tiny_sd (random weights)."
            ) from e
        source = str(cfg.id)
    else:
        raise ValueError(f"a diffusion model's source must be hub, auto or random (no PyPI package ships diffusion "
                         f"weights); got model.source={cfg.source!r}")
    model = DreamBoothModel(unet, vae, text_encoder, tokenizer, scheduler)
    return LoadedModel(model=model, tokenizer=tokenizer, head_modules=[], source=source)


"""The DreamBooth metrics: subject fidelity (DINO, CLIP-I) and prompt fidelity (CLIP-T) of generated images.

Ruiz et al., arXiv 2208.12242, Sec. 4.1: DINO is the average pairwise cosine similarity between the ViT-S/16 DINO
embeddings of generated and real images of the subject; CLIP-I the same with CLIP image embeddings; CLIP-T the
average cosine similarity between the CLIP embeddings of each generated image and its prompt. DINO is the paper's
preferred subject-fidelity metric: unlike CLIP, it was not trained to ignore differences between subjects of the
same class.

Hub weights: facebook/dino-vits16 (CLS token of the last layer, after its layer norm) and
openai/clip-vit-base-patch32 (projected image and text embeddings). `ImageScorer.random()` builds tiny random
models of the same architectures from configs, so the metric code runs offline; their scores mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (AutoImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTConfig,
                          ViTImageProcessor, ViTModel)

from bench.models import ModelUnavailableError

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # DINO's input normalisation


def _features(output: torch.Tensor | object) -> torch.Tensor:
    """get_image_features/get_text_features return a tensor (transformers 4) or an output with pooler_output (5)."""
    return output if torch.is_tensor(output) else output.pooler_output


@dataclass
class ImageScorer:
    """DINO and CLIP embeddings of images and prompts.

    Args:
        dino: a ViTModel (DINO ViT-S/16 on the hub path).
        dino_processor: its image processor (resize, crop, ImageNet normalisation).
        clip: a CLIPModel.
        clip_processor: its processor (image processor and tokenizer).
        meaningful: False for random models: their scores only show that the code runs.
        batch_size: images per forward pass.
    """

    dino: nn.Module
    dino_processor: object
    clip: CLIPModel
    clip_processor: CLIPProcessor
    meaningful: bool = True
    batch_size: int = 32

    @classmethod
    def from_hub(cls, dino_id: str, clip_id: str) -> ImageScorer:
        try:
            dino = ViTModel.from_pretrained(dino_id, add_pooling_layer=False)
            dino_processor = AutoImageProcessor.from_pretrained(dino_id)
            clip = CLIPModel.from_pretrained(clip_id)
            clip_processor = CLIPProcessor.from_pretrained(clip_id)
        except OSError as e:
            raise ModelUnavailableError(
                f"the DreamBooth metrics load {dino_id!r} (DINO) and {clip_id!r} (CLIP) from the Hugging Face hub, "
                f"which failed: {e}\nWith hub access, run once online to cache them; offline, "
                "task.metrics_models=random runs the metric code on random models (scores are not meaningful)."
            ) from e
        return cls(dino.eval(), dino_processor, clip.eval(), clip_processor, meaningful=True)

    @classmethod
    def random(cls, image_size: int = 32, seed: int = 0) -> ImageScorer:
        """Tiny random DINO (ViT) and CLIP models of the hub models' architectures, built offline and seeded."""
        from bench.diffusion import tiny_clip_tokenizer

        tokenizer = tiny_clip_tokenizer()
        tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dino = ViTModel(ViTConfig(image_size=image_size, patch_size=8, **tiny), add_pooling_layer=False)
            clip = CLIPModel(CLIPConfig(
                text_config={**tiny, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
                             "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                             "pad_token_id": tokenizer.pad_token_id},
                vision_config={**tiny, "image_size": image_size, "patch_size": 8}, projection_dim=32))
        size = {"height": image_size, "width": image_size}
        dino_processor = ViTImageProcessor(size=size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        clip_processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                          crop_size=size), tokenizer=tokenizer)
        return cls(dino.eval(), dino_processor, clip.eval(), clip_processor, meaningful=False)

    def to(self, device: torch.device) -> ImageScorer:
        self.dino.to(device)
        self.clip.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @torch.no_grad()
    def dino_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """(n, d) unit-norm DINO CLS embeddings."""
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.dino_processor(images=images[i:i + self.batch_size], return_tensors="pt").pixel_values
            cls_token = self.dino(pixel_values=pixels.to(self.device)).last_hidden_state[:, 0]  # (b, d)
            out.append(F.normalize(cls_token.float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def clip_image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """(n, d) unit-norm CLIP image embeddings."""
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.clip_processor(images=images[i:i + self.batch_size], return_tensors="pt").pixel_values
            emb = _features(self.clip.get_image_features(pixel_values=pixels.to(self.device)))  # (b, d)
            out.append(F.normalize(emb.float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def clip_text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """(n, d) unit-norm CLIP text embeddings (prompts truncated to CLIP's 77 tokens)."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.clip_processor.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                                max_length=77, return_tensors="pt")
            emb = _features(self.clip.get_text_features(input_ids=tok.input_ids.to(self.device),
                                                        attention_mask=tok.attention_mask.to(self.device)))  # (b, d)
            out.append(F.normalize(emb.float(), dim=-1))
        return torch.cat(out)

    def score(self, generated: list[Image.Image], texts: list[str],
              references: list[Image.Image]) -> tuple[dict[str, float], dict[str, list[float]]]:
        """The three metrics over all generated images, and each image's own scores.

        dino / clip_i of image g: mean over the real images r of cos(e(g), e(r)); the metric is their mean over g
        (= the mean over all (g, r) pairs). clip_t of image g: cos(e(g), e(text of g)).
        """
        if len(generated) != len(texts):
            raise ValueError(f"{len(generated)} images but {len(texts)} texts")
        dino = self.dino_embeddings(generated) @ self.dino_embeddings(references).T  # (n, m)
        gen_clip = self.clip_image_embeddings(generated)  # (n, d)
        clip_i = gen_clip @ self.clip_image_embeddings(references).T  # (n, m)
        clip_t = (gen_clip * self.clip_text_embeddings(texts)).sum(-1)  # (n,)
        per_image = {"dino": dino.mean(1).tolist(), "clip_i": clip_i.mean(1).tolist(), "clip_t": clip_t.tolist()}
        metrics = {name: float(sum(v) / len(v)) for name, v in per_image.items()}
        return metrics, per_image

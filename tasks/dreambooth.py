"""DreamBooth: teach a text-to-image model one subject from its 4–6 photos, then generate it in new contexts.

Ruiz et al., "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven Generation",
arXiv 2208.12242; dataset google/dreambooth @ 4f887af7970a06fc0cd3adaa1d0b368547d6a1d0 (30 subjects, their class
nouns and the 25 evaluation prompts per subject type), copied in tasks/data/dreambooth (PROVENANCE.md there).

Training rows are the subject's photos with the prompt "a photo of <identifier> <class noun>" (identifier `sks`,
as diffusers' examples use); with prior preservation each row also carries a class image ("a photo of <class
noun>") generated once by the frozen base model and cached. Evaluation generates `images_per_prompt` images for each
of the 25 prompts of the subject's type (object or live subject) with fixed seeds, saves them beside the record and
scores DINO, CLIP-I and CLIP-T (tasks/dreambooth_metrics.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import OmegaConf
from PIL import Image, ImageOps
from torch import nn

from tasks.base import Batch, HeadSpec, Task, subset

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data" / "dreambooth"
LIVE_CLASSES = frozenset({"cat", "dog"})  # the paper's live subjects (the cats and dogs) use the live-subject prompts
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    images: tuple[Path, ...]

    @property
    def live(self) -> bool:
        return self.class_noun in LIVE_CLASSES


def load_subjects(data_dir: Path = DATA_DIR) -> dict[str, Subject]:
    """The 30 subjects: the `subject_name,class` CSV block that opens prompts_and_classes.txt, and each one's photos."""
    lines = (data_dir / "prompts_and_classes.txt").read_text(encoding="utf-8").splitlines()
    start = lines.index("subject_name,class") + 1
    subjects = {}
    for line in lines[start:]:
        if not line.strip():
            break
        name, class_noun = (s.strip() for s in line.split(",", 1))
        images = tuple(sorted(p for p in (data_dir / "images" / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        subjects[name] = Subject(name, class_noun, images)
    return subjects


def load_prompt_templates(data_dir: Path = DATA_DIR) -> dict[str, list[str]]:
    """{"object": [...], "live": [...]}: the paper's 25 prompts per subject type, `{0}` the identifier and `{1}` the
    class noun (the file writes them as Python `'...'.format(unique_token, class_token)` lines)."""
    text = (data_dir / "prompts_and_classes.txt").read_text(encoding="utf-8")
    objects, live = text.split("Object Prompts", 1)[1].split("Live Subject Prompts", 1)
    pattern = re.compile(r"^'(.*)'\.format\(unique_token, class_token\),?\s*$", re.M)
    return {"object": pattern.findall(objects), "live": pattern.findall(live)}


def load_image(path: Path) -> Image.Image:
    """An RGB image, upright (EXIF orientation applied)."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def image_tensor(image: Image.Image, resolution: int, center_crop: bool) -> torch.Tensor:
    """(3, R, R) in [-1, 1]: shorter side resized to R (bilinear), then a center or a random crop (the torch RNG),
    as diffusers' DreamBooth dataset does."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(torch.randint(0, w - resolution + 1, ()))
        top = int(torch.randint(0, h - resolution + 1, ()))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(resolution, resolution, 3)  # (R, R, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, R, R)


class DreamBoothTask(Task):
    """One DreamBooth subject: fine-tune on its photos, generate the paper's prompts, score DINO / CLIP-I / CLIP-T.

    Main metric: dino, the subject fidelity the paper argues for (DINO tells subjects of one class apart, CLIP-I
    much less); clip_t (prompt fidelity) is its counterweight: a model that only reproduces the training photos has a
    high DINO and a low CLIP-T.

    Args:
        subject: one of the 30 subjects of tasks/data/dreambooth.
        identifier: the rare token that names the subject in prompts.
        resolution: training and generation resolution (the model's native one: model.resolution).
        center_crop: center crop after the resize (else a random crop; the photos are square, so at their aspect
            ratio the crop is the whole image).
        prior_preservation: add the class-prior loss (the paper's Eq. 2): each row also carries a class image.
        prior_loss_weight: λ of the class-prior loss.
        num_class_images: class images for prior preservation.
        class_images_dir: a folder of class images; missing ones are generated into it. None: generated into a
            cache folder under class_cache_dir, keyed by the base model, prompt, resolution and sampler settings.
        class_cache_dir: the root of that cache; None: <results_dir>/class_images (beside runs/).
        images_per_prompt: images generated per evaluation prompt (the paper: 4).
        eval_seed: image j of every prompt starts from seed eval_seed + j: every method and run gets the same noise.
        inference_steps: sampler steps (DPM-Solver++) for evaluation and class images.
        guidance_scale: classifier-free guidance scale.
        eval_chunk: images per generation call (bounds the memory).
        metrics_models: hub (DINO ViT-S/16 and CLIP ViT-B/32 from the hub), random (tiny random models: the metric
            code runs, the scores mean nothing), auto (random when the diffusion model itself is random, else hub).
        dino_model: hub id of the DINO model.
        clip_model: hub id of the CLIP model.
        max_train_samples: a seeded random subset of the training rows (None: all).
        max_eval_samples: a fixed random subset of the (prompt, seed) evaluation rows (None: all).
        eval_subset_seed: seed of that subset.
        base_model: the diffusion model's config (conf/model/<name>.yaml): class images are generated by the frozen
            base model this describes, and metrics_models=auto reads its source.
        device: where class images are generated (the run's device; auto: CUDA, then MPS, then the CPU).
        data_dir: the dataset folder.
    """

    name = "dreambooth"
    head = HeadSpec(kind="diffusion")
    main_metric = "dino"
    higher_is_better = {"dino": True, "clip_i": True, "clip_t": True}
    eval_split = "dreambooth_prompts"

    def __init__(
        self,
        subject: str = "dog",
        identifier: str = "sks",
        resolution: int = 512,
        center_crop: bool = False,
        prior_preservation: bool = False,
        prior_loss_weight: float = 1.0,
        num_class_images: int = 100,
        class_images_dir: str | None = None,
        class_cache_dir: str | None = None,
        images_per_prompt: int = 4,
        eval_seed: int = 0,
        inference_steps: int = 25,
        guidance_scale: float = 7.5,
        eval_chunk: int = 8,
        metrics_models: Literal["auto", "hub", "random"] = "auto",
        dino_model: str = "facebook/dino-vits16",
        clip_model: str = "openai/clip-vit-base-patch32",
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        eval_subset_seed: int = 0,
        base_model: dict[str, Any] | None = None,
        device: str = "auto",
        data_dir: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir else DATA_DIR
        subjects = load_subjects(self.data_dir)
        if subject not in subjects:
            raise ValueError(f"task.subject={subject!r} is not a DreamBooth subject; choose one of: "
                             f"{', '.join(sorted(subjects))}")
        if metrics_models not in ("auto", "hub", "random"):
            raise ValueError(f"task.metrics_models must be auto, hub or random; got {metrics_models!r}")
        for key, value in {"resolution": resolution, "images_per_prompt": images_per_prompt,
                           "inference_steps": inference_steps, "eval_chunk": eval_chunk,
                           "num_class_images": num_class_images}.items():
            if int(value) < 1:
                raise ValueError(f"task.{key} must be >= 1, got {value}")
        if prior_loss_weight < 0:
            raise ValueError(f"task.prior_loss_weight must be >= 0, got {prior_loss_weight}")
        self.subject = subjects[subject]
        self.identifier = identifier
        self.resolution, self.center_crop = int(resolution), bool(center_crop)
        self.prior_preservation, self.prior_loss_weight = bool(prior_preservation), float(prior_loss_weight)
        self.num_class_images = int(num_class_images)
        self.class_images_dir, self.class_cache_dir = class_images_dir, class_cache_dir
        self.images_per_prompt, self.eval_seed = int(images_per_prompt), int(eval_seed)
        self.inference_steps, self.guidance_scale = int(inference_steps), float(guidance_scale)
        self.eval_chunk = int(eval_chunk)
        self.dino_model, self.clip_model = dino_model, clip_model
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.eval_subset_seed = eval_subset_seed
        self.base_model = dict(base_model) if base_model else None
        self.device = device
        random_base = bool(self.base_model) and self.base_model.get("source") == "random"
        if metrics_models == "auto":
            metrics_models = "random" if random_base else "hub"
        self.metrics_models = metrics_models
        templates = load_prompt_templates(self.data_dir)["live" if self.subject.live else "object"]
        self.prompts = [t.format(identifier, self.subject.class_noun) for t in templates]
        self.instance_prompt = f"a photo of {identifier} {self.subject.class_noun}"
        self.class_prompt = f"a photo of {self.subject.class_noun}"
        notes = ["DINO and CLIP-I compare the generated images with the subject's own training photos (the "
                 "DreamBooth protocol); CLIP-T scores each image against its prompt without the identifier."]
        if metrics_models == "random":
            notes.append("The metric models are random (task.metrics_models=random): the scores are not meaningful.")
        if random_base:
            notes.append("The diffusion model is random (a test model): its images are noise.")
        self.eval_note = " ".join(notes)
        self._scorer: Any = None
        self._references: list[Image.Image] | None = None

    # ------------------------------------------------------------------------------------------------ data
    def class_images(self, seed: int = 0) -> list[Path]:
        """num_class_images class images for prior preservation: those already in the folder, plus ones the frozen
        base model generates ("a photo of <class noun>", image i from seed i), saved for the next run."""
        if self.class_images_dir:
            folder = Path(self.class_images_dir)
        else:
            folder = self._class_cache_root() / self._class_cache_name(seed)
        folder.mkdir(parents=True, exist_ok=True)
        have = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(have) < self.num_class_images:
            missing = list(range(len(have), self.num_class_images))
            log.info("generating %d class images (%r) into %s", len(missing), self.class_prompt, folder)
            for index, image in zip(missing, self._generate_with_base_model(missing, seed)):
                path = folder / f"class_{index:05d}.png"
                image.save(path.with_suffix(".tmp.png"))
                path.with_suffix(".tmp.png").replace(path)  # a killed run never leaves a half-written image
                have.append(path)
        return sorted(have)[:self.num_class_images]

    def _class_cache_root(self) -> Path:
        if self.class_cache_dir:
            return Path(self.class_cache_dir)
        if self.run_dir is None:
            raise ValueError("prior preservation needs class images: set task.class_images_dir (a folder of class "
                             "images) or task.class_cache_dir (where generated ones are cached)")
        return Path(self.run_dir).parent.parent / "class_images"  # <results_dir>/class_images

    def _class_cache_name(self, seed: int) -> str:
        """A folder name that changes with everything the class images depend on."""
        if not self.base_model:
            raise ValueError("generating class images needs the base model's config (task.base_model: ${model})")
        model = {k: v for k, v in self.base_model.items() if k != "target_modules"}
        key = {"model": model, "seed": seed if model.get("source") == "random" else None, "prompt": self.class_prompt,
               "resolution": self.resolution, "steps": self.inference_steps, "guidance": self.guidance_scale}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"{re.sub(r'[^a-z0-9]+', '_', self.class_prompt.lower()).strip('_')}__{digest}"

    def _generate_with_base_model(self, indices: list[int], seed: int) -> list[Image.Image]:
        """Images of the class prompt from a fresh copy of the base model. A random base model is built under the
        run's seed, exactly as the runner builds the model it trains."""
        from bench.diffusion import load_diffusion_model
        from bench.run import resolve_device

        if not self.base_model:
            raise ValueError("generating class images needs the base model's config (task.base_model: ${model})")
        device, dtype = resolve_device(self.device, "auto")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = load_diffusion_model(OmegaConf.create(self.base_model), self.head).model
        model.to(device)
        images: list[Image.Image] = []
        for i in range(0, len(indices), self.eval_chunk):
            chunk = indices[i:i + self.eval_chunk]
            images += model.generate([self.class_prompt] * len(chunk), chunk, self.inference_steps,
                                     self.guidance_scale, self.resolution, dtype)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return images

    def examples(self, split: Literal["train", "eval"], seed: int = 0) -> Sequence[dict[str, Any]]:
        if split == "train":
            if self.holdout is not None:
                raise ValueError("task=dreambooth has no validation split to tune on (4-6 photos per subject, scored "
                                 "by generation): run it without a tuning protocol (protocol=none)")
            photos = [str(p) for p in self.subject.images]
            if not self.prior_preservation:
                rows = [{"image": p, "prompt": self.instance_prompt} for p in photos]
            else:  # diffusers' pairing: row i holds photo i mod n and class image i mod m
                self.scorer()  # a missing metric model fails the run before the class images are generated
                classes = [str(p) for p in self.class_images(seed)]
                rows = [{"image": photos[i % len(photos)], "prompt": self.instance_prompt,
                         "class_image": classes[i % len(classes)], "class_prompt": self.class_prompt}
                        for i in range(max(len(photos), len(classes)))]
            return subset(rows, self.max_train_samples, seed)
        if split == "eval":
            self.scorer()  # load the metric models now: a missing hub model fails the run before training
            rows = [{"prompt": prompt, "prompt_index": i, "image_index": j, "seed": self.eval_seed + j}
                    for i, prompt in enumerate(self.prompts) for j in range(self.images_per_prompt)]
            return subset(rows, self.max_eval_samples, self.eval_subset_seed)
        if split == "validation":
            raise ValueError("task=dreambooth has no validation split to tune on (4-6 photos per subject, scored by "
                             "generation): run it without a tuning protocol (protocol=none)")
        raise ValueError(f"unknown split {split!r}")

    def length(self, row: dict[str, Any]) -> int:
        return len(row["prompt"])

    def collate_fn(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], Batch]:
        """pixel_values (N, 3, R, R) in [-1, 1], input_ids (N, 77); with prior preservation N = 2B (the B photos,
        then their B class images), is_prior (N,) marks the class half, prior_loss_weight is λ."""
        cache: dict[str, Image.Image] = {}

        def pixels(path: str) -> torch.Tensor:
            if path not in cache:
                cache[path] = load_image(Path(path))
            return image_tensor(cache[path], self.resolution, self.center_crop)

        def tokens(prompts: list[str]) -> torch.Tensor:
            return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids

        def collate(rows: list[dict[str, Any]]) -> Batch:
            if any("image" not in r for r in rows):
                raise ValueError("DreamBooth training batches are made of training rows (photos); export=true is "
                                 "not supported for task=dreambooth: the trained tensors are in adapter.safetensors")
            images = [pixels(r["image"]) for r in rows]
            prompts = [r["prompt"] for r in rows]
            if not self.prior_preservation:
                return {"pixel_values": torch.stack(images), "input_ids": tokens(prompts)}
            images += [pixels(r["class_image"]) for r in rows]
            prompts += [r["class_prompt"] for r in rows]
            is_prior = torch.arange(len(images)) >= len(rows)  # (2B,)
            return {"pixel_values": torch.stack(images), "input_ids": tokens(prompts), "is_prior": is_prior,
                    "prior_loss_weight": torch.tensor(self.prior_loss_weight)}

        return collate

    def eval_collate_fn(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
        """Evaluation batches are the (prompt, seed) rows themselves: evaluate() generates from them."""
        return list

    # ------------------------------------------------------------------------------------------------ metrics
    def scorer(self) -> Any:
        """The DINO/CLIP scorer, loaded once (hub or random models, as metrics_models says)."""
        if self._scorer is None:
            from tasks.dreambooth_metrics import ImageScorer

            self._scorer = (ImageScorer.random(image_size=self.resolution) if self.metrics_models == "random"
                            else ImageScorer.from_hub(self.dino_model, self.clip_model))
        return self._scorer

    def references(self) -> list[Image.Image]:
        """The subject's photos, the real images DINO and CLIP-I compare with."""
        if self._references is None:
            self._references = [load_image(p) for p in self.subject.images]
        return self._references

    def clip_t_text(self, prompt: str) -> str:
        """The prompt CLIP-T scores against: without the identifier, which means nothing to CLIP."""
        return re.sub(rf"\b{re.escape(self.identifier)}\s+", "", prompt)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> dict[str, float]:
        from bench.diffusion import find_dreambooth

        dreambooth = find_dreambooth(model)
        model.eval()
        rows = [row for batch in loader for row in batch]
        images: list[Image.Image] = []
        for i in range(0, len(rows), self.eval_chunk):
            chunk = rows[i:i + self.eval_chunk]
            images += dreambooth.generate([r["prompt"] for r in chunk], [r["seed"] for r in chunk],
                                          self.inference_steps, self.guidance_scale, self.resolution, autocast_dtype)
        scorer = self.scorer().to(device)
        metrics, per_image = scorer.score(images, [self.clip_t_text(r["prompt"]) for r in rows], self.references())
        if self.run_dir is not None:
            self._save(images, rows, metrics, per_image, meaningful=scorer.meaningful)
        return metrics

    def _save(self, images: list[Image.Image], rows: list[dict[str, Any]], metrics: dict[str, float],
              per_image: dict[str, list[float]], meaningful: bool) -> None:
        """<run dir>/images/<prompt index>_<seed>.png and <run dir>/images.json (prompts, seeds, per-image scores)."""
        folder = Path(self.run_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        index = []
        for k, (image, row) in enumerate(zip(images, rows)):
            name = f"{row['prompt_index']:02d}_{row['seed']}.png"
            image.save(folder / name)
            index.append({"file": f"images/{name}", "prompt": row["prompt"], "seed": row["seed"],
                          **{m: per_image[m][k] for m in per_image}})
        summary = {"subject": self.subject.name, "class_noun": self.subject.class_noun,
                   "instance_prompt": self.instance_prompt, "inference_steps": self.inference_steps,
                   "guidance_scale": self.guidance_scale, "resolution": self.resolution,
                   "metrics_models": self.metrics_models, "scores_meaningful": meaningful, "metrics": metrics,
                   "images": index}
        tmp = Path(self.run_dir) / "images.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(Path(self.run_dir) / "images.json")

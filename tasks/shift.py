"""Image classification under distribution shift: the eval images corrupted offline, scored with and without
test-time adaptation on top of whatever method trained the model.

Corruptions are CIFAR-10-C's (Hendrycks & Dietterich, arXiv 1903.12261), applied to each eval image at its native
resolution before the model's resize, with the severity constants of the CIFAR generator (hendrycks/robustness
@305054464935cdf4c5f182f1387a1cc506854d49, ImageNet-C/create_c/make_cifar_c.py); the noise of image i is drawn from
a generator seeded by (corruption, severity, i), so every run scores the same corrupted images.

Test-time adaptation, each scored on the same corrupted batches (eval rows in a fixed seeded order, so a batch is an
i.i.d. sample, never one class):
- `alpha_bn` (You et al., arXiv 2110.04065): every BatchNorm normalises with α·(source statistics) + (1 − α)·(the
  test batch's); α = 1 is the trained model, α = 0 pure test-batch statistics (Schneider et al., arXiv 2006.16971).
- `lame` (Boudiaf et al., CVPR 2022, arXiv 2201.05718; github.com/fiveai/LAME): the model's outputs corrected per
  batch by Laplacian-regularised maximum likelihood, z = argmin Σ_i KL(z_i‖p_i) − Σ_ij w_ij z_iᵀz_j over a kNN graph of
  the head's input features, by its bound iterations z_i ← softmax(log p_i + Σ_j w_ij z_j); the model is unchanged.

Metrics: `accuracy` (clean), `shift/<corruption>/<severity>` per corrupted set, `shift_accuracy` their mean (the
main metric: robustness of the fine-tuned model itself), and with each adaptation `…/alpha_bn`, `…/lame`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tasks.vision import ImageClassificationTask, ImageRow, to_pixels

log = logging.getLogger("bench")

#: CIFAR-10-C's severity constants (severity 1..5), images in [0, 1]
SEVERITIES: dict[str, list[float]] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],  # σ of additive Gaussian noise
    "shot_noise": [500, 250, 100, 75, 50],  # photons per unit intensity (Poisson)
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],  # fraction of values set to 0 or 1 (salt and pepper)
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],  # contrast kept around the per-image mean
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],  # σ of the Gaussian blur, pixels
}
ADAPTATIONS = ("none", "alpha_bn", "lame")


def corrupt(image: np.ndarray, corruption: str, severity: int, generator: np.random.Generator) -> np.ndarray:
    """A corrupted copy of `image` (H, W, 3) float in [0, 1]."""
    c = SEVERITIES[corruption][severity - 1]
    if corruption == "gaussian_noise":
        out = image + generator.normal(scale=c, size=image.shape)
    elif corruption == "shot_noise":
        out = generator.poisson(image * c) / c
    elif corruption == "impulse_noise":
        out = image.copy()
        hit = generator.random(image.shape) < c
        out[hit] = (generator.random(int(hit.sum())) < 0.5).astype(image.dtype)  # salt or pepper, even odds
    elif corruption == "contrast":
        mean = image.mean(axis=(0, 1), keepdims=True)
        out = (image - mean) * c + mean
    elif corruption == "gaussian_blur":
        out = gaussian_blur(image, c)
    else:
        raise ValueError(f"unknown corruption {corruption!r}; choose from {', '.join(SEVERITIES)}")
    return np.clip(out, 0.0, 1.0)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Per-channel Gaussian blur (kernel truncated at 4σ, edges repeated: skimage.filters.gaussian's defaults)."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    t = torch.from_numpy(image).permute(2, 0, 1)[:, None]  # (3, 1, H, W)
    k = torch.from_numpy(kernel)
    t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return t[:, 0].permute(1, 2, 0).numpy()


@contextlib.contextmanager
def alpha_bn(model: nn.Module, alpha: float) -> Iterator[int]:
    """Within the block, every BatchNorm of `model` normalises with α·running + (1 − α)·batch mean and variance;
    yields how many BatchNorm layers it changed."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    def forward(bn: nn.modules.batchnorm._BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        def mixed(x: torch.Tensor) -> torch.Tensor:
            dims = [0, *range(2, x.ndim)]
            mean = alpha * bn.running_mean + (1 - alpha) * x.mean(dims)  # (C,)
            var = alpha * bn.running_var + (1 - alpha) * x.var(dims, unbiased=False)  # (C,)
            return F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return mixed

    for bn in layers:
        bn.forward = forward(bn)  # an instance attribute: shadows the class's forward
    try:
        yield len(layers)
    finally:
        for bn in layers:
            del bn.forward


def lame(probs: torch.Tensor, features: torch.Tensor, knn: int = 5, max_steps: int = 100) -> torch.Tensor:
    """LAME's corrected assignments z (N, K) of one batch from its softmax outputs (N, K) and features (N, D)."""
    n = probs.shape[0]
    k = min(knn, n - 1)
    if k < 1:
        return probs
    f = F.normalize(features.float(), dim=1)  # (N, D)
    dist = torch.cdist(f, f)  # (N, N)
    dist.fill_diagonal_(float("inf"))
    neighbours = dist.topk(k, dim=1, largest=False).indices  # (N, k)
    w = torch.zeros(n, n).scatter_(1, neighbours, 1.0)  # (N, N): w_ij = 1 for the k nearest j of i
    log_p = probs.clamp_min(1e-12).log()  # (N, K)
    z = probs
    previous = float("inf")
    for _ in range(max_steps):
        pairwise = w @ z  # (N, K)
        z = (log_p + pairwise).softmax(dim=1)
        energy = float((z * (z.clamp_min(1e-12).log() - log_p - pairwise)).sum())  # the bound's value
        if abs(energy - previous) <= 1e-8 * abs(previous):
            break
        previous = energy
    return z


class ShiftedImageClassificationTask(ImageClassificationTask):
    """An image task (tasks/vision.py) whose evaluation adds corrupted copies of the eval split and test-time
    adaptation (see the module docstring). Training is the vision task's, unchanged.

    Args (beyond ImageClassificationTask's):
        corruptions: keys of SEVERITIES.
        severities: severity levels 1..5 of each corruption.
        adaptations: which of ADAPTATIONS to score ("none" always is).
        alpha: α of alpha_bn (You et al.'s default, 0.9).
        lame_knn: neighbours of LAME's affinity graph (the paper's default, 5).
        head_module: the module whose input is the feature LAME's graph is built on.
    """

    def __init__(self, *args: Any, corruptions: Sequence[str] = ("gaussian_noise",), severities: Sequence[int] = (3,),
                 adaptations: Sequence[str] = ADAPTATIONS, alpha: float = 0.9, lame_knn: int = 5,
                 head_module: str = "classifier", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        bad = [c for c in corruptions if c not in SEVERITIES]
        if bad:
            raise ValueError(f"unknown task.corruptions {bad}; choose from {', '.join(SEVERITIES)}")
        if not corruptions or any(int(s) not in range(1, 6) for s in severities) or not severities:
            raise ValueError(f"task.severities must be levels 1..5 and task.corruptions non-empty, got "
                             f"{list(severities)} and {list(corruptions)}")
        bad = [a for a in adaptations if a not in ADAPTATIONS]
        if bad:
            raise ValueError(f"unknown task.adaptations {bad}; choose from {', '.join(ADAPTATIONS)}")
        if not 0 <= float(alpha) <= 1:
            raise ValueError(f"task.alpha must be in [0, 1], got {alpha}")
        self.corruptions, self.severities = list(corruptions), [int(s) for s in severities]
        self.adaptations = ["none", *[a for a in adaptations if a != "none"]]
        self.alpha, self.lame_knn, self.head_module = float(alpha), int(lame_knn), head_module
        self.main_metric = "shift_accuracy"
        names = ["accuracy", "shift_accuracy", *(f"shift/{c}/{s}" for c in self.corruptions for s in self.severities)]
        self.higher_is_better = {f"{n}/{a}" if a != "none" else n: True for n in names for a in self.adaptations}
        self.eval_note = (self.eval_note + " " if self.eval_note else "") + (
            f"Shift: {', '.join(self.corruptions)} at severities {self.severities} (CIFAR-10-C constants), "
            "applied to the eval images at their own resolution; batches drawn in a fixed random order.")
        self._spec: Any = None

    def eval_collate_fn(self, tokenizer: Any) -> Callable[[Sequence[ImageRow]], dict[str, torch.Tensor]]:
        self._spec = tokenizer  # evaluate() builds the corrupted batches with the model's size and normalisation
        return super().eval_collate_fn(tokenizer)

    def corrupted_batch(self, rows: Sequence[tuple[int, ImageRow]], corruption: str | None,
                        severity: int) -> tuple[torch.Tensor, torch.Tensor]:
        spec, pixels = self._spec, []
        for index, row in rows:
            image = self.load_image(row)
            if corruption is not None:
                seed = [list(SEVERITIES).index(corruption), severity, index]
                x = np.asarray(image, dtype=np.float64) / 255.0  # (H, W, 3)
                x = corrupt(x, corruption, severity, np.random.default_rng(seed))
                image = Image.fromarray(np.uint8(np.round(x * 255.0)))
            pixels.append(to_pixels(image, spec.size, spec.mean, spec.std, augment=False))
        return torch.stack(pixels), torch.tensor([r.label for _, r in rows])  # (B, 3, S, S), (B,)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> dict[str, float]:
        if self._spec is None:
            raise RuntimeError("evaluate() needs the batches of eval_collate_fn (the model's image spec)")
        rows = list(loader.dataset)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.eval_subset_seed)).tolist()
        indexed = [(i, rows[i]) for i in order]  # i: the image's index, its corruption seed
        size = int(loader.batch_size or 64)
        batches = [indexed[s:s + size] for s in range(0, len(indexed), size)]
        head = next((m for n, m in model.named_modules() if n.split(".")[-1] == self.head_module), None)
        adaptations = list(self.adaptations)
        if "lame" in adaptations and head is None:  # skipped, not fatal: the trained model is scored all the same
            log.warning("LAME needs the features entering the head and %s has no module named %r (set "
                        "task.head_module): its scores are left out", type(model).__name__, self.head_module)
            adaptations.remove("lame")
        if "alpha_bn" in adaptations and not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                 for m in model.modules()):
            log.warning("alpha_bn recalibrates BatchNorm and %s has none (a ViT normalises with LayerNorm): its "
                        "scores are left out", type(model).__name__)
            adaptations.remove("alpha_bn")
        was_training = model.training
        model.eval()
        features: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda m, args, out: features.append(args[0].detach())) if head else None

        def forward(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            features.clear()
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(pixel_values=pixels.to(device)).logits.float()  # (B, C)
            feats = features[-1].float().flatten(1) if features else None  # (B, D)
            return logits, feats

        metrics: dict[str, float] = {}
        try:
            sets = [(None, 0)] + [(c, s) for c in self.corruptions for s in self.severities]
            for corruption, severity in sets:
                correct = dict.fromkeys(adaptations, 0)
                total = 0
                for batch in batches:
                    pixels, labels = self.corrupted_batch(batch, corruption, severity)
                    labels = labels.to(device)
                    logits, feats = forward(pixels)
                    correct["none"] += int((logits.argmax(-1) == labels).sum())
                    if "lame" in adaptations:
                        z = lame(logits.softmax(-1).cpu(), feats.cpu(), self.lame_knn)
                        correct["lame"] += int((z.argmax(-1).to(device) == labels).sum())
                    if "alpha_bn" in adaptations:
                        with alpha_bn(model, self.alpha):
                            adapted, _ = forward(pixels)
                        correct["alpha_bn"] += int((adapted.argmax(-1) == labels).sum())
                    total += len(labels)
                name = "accuracy" if corruption is None else f"shift/{corruption}/{severity}"
                for adaptation, n in correct.items():
                    metrics[name if adaptation == "none" else f"{name}/{adaptation}"] = n / total
        finally:
            if hook is not None:
                hook.remove()
            model.train(was_training)
        shifted = [f"shift/{c}/{s}" for c in self.corruptions for s in self.severities]
        metrics["shift_accuracy"] = float(np.mean([metrics[k] for k in shifted]))
        for adaptation in adaptations[1:]:
            metrics[f"shift_accuracy/{adaptation}"] = float(np.mean([metrics[f"{k}/{adaptation}"] for k in shifted]))
        return metrics

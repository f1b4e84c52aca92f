"""Adapter generation: a conditional VAE learns LoRA adapters from the store's runs and generates one per task.

    python -m bench task=generate/glue method=lora           # members train first (with snapshots), then the CVAE

In-Context Meta LoRA Generation (ICM-LoRA; Shao et al., IJCAI 2025, arXiv 2501.17635; reference
YihuaJerry/ICM-LoRA @ 0b0057c8c3fa5c38bc69b6687be3568aca48dd8c: model/CVAE_design.py, TrainScript_CVAE.py,
ICL/last_time_step_icl.py, utils/ReconstructLora_cvae.py). Each training sample is one late-training snapshot of a
member's adapter (record.snapshots; the reference: ~50 epochs of one run per task), flattened; its condition is the
task's vector c, computed from in-context examples of the task. The CVAE reconstructs the flattened adapter from
(x, c); at test time z ~ N(0, I) is decoded with a task's c into an adapter, which is scored like any other.

    x      every saved tensor (LoRA A and B, the trained head) in name order, each standardised, concatenated,
           zero-padded to a multiple of 2^depth
    enc    depth × [Conv1d(k 7, stride 2) → BatchNorm → LeakyReLU] → Linear → h;  μ, log σ² = Linear([h; c])
    dec    Linear([z; c]) → depth − 1 × [ConvTranspose1d(k 7, stride 2) → BatchNorm → ELU] → ConvTranspose1d →
           BatchNorm → ELU → Conv1d(k 7) → x̂
    loss   MSE(x̂, x) + β·KL(q(z | x, c) ‖ N(0, I))   (KL summed over latent dimensions, mean over the batch)

Where this differs from the reference, and why:

* The task vector: the reference runs the task's own fine-tuned Florence-2 over 30 task images and averages the
  decoder's last hidden state. A held-out task has no fine-tuned model (that is what is being generated), so here
  c is computed by the pretrained backbone: [mean over `context_examples` training rows of the mean-pooled last
  hidden state ; mean over label-1 rows − mean over label-0 rows], the second half carrying the input–label
  mapping that in-context examples show.
* Standardisation: the reference standardises each tensor by its own snapshot's mean and std and restores a
  generated adapter with one stored snapshot's statistics; here each tensor is standardised with statistics pooled
  over all training snapshots, so that an unseen task's adapter is restored with statistics that exist.
* Widths: `channels` defaults to the reference's (8 … 256 … 8); the committed table uses narrower ones (CPU).
* Evaluation: the reference scores a generated adapter on the task it was trained on; here both seen tasks (the
  members) and held-out ones are generated and scored, each normalised by the real adapter's score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

#: the reference's channel widths: 12 stride-2 blocks, 1 → 8 → … → 256 → … → 8
REFERENCE_CHANNELS = (8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8)


# ---------------------------------------------------------------------------------------------- adapters as vectors


class Flattener:
    """Adapters (name → tensor, the same names and shapes in each) ↔ standardised, padded vectors.

    Each tensor is standardised with the mean and std of its entries over every adapter given to `fit` (pooled),
    flattened in name order, and the concatenation is zero-padded to a multiple of `multiple`.
    """

    def __init__(self, adapters: Sequence[dict[str, torch.Tensor]], multiple: int) -> None:
        if not adapters:
            raise ValueError("an adapter generator needs training adapters")
        self.names = sorted(adapters[0])
        for a in adapters[1:]:
            if sorted(a) != self.names or any(a[n].shape != adapters[0][n].shape for n in self.names):
                raise ValueError("the training adapters differ in tensor names or shapes; members must share the "
                                 "method, its settings and the model")
        self.shapes = {n: tuple(adapters[0][n].shape) for n in self.names}
        self.stats = {}
        for n in self.names:
            values = torch.stack([a[n].double().flatten() for a in adapters])  # (S, numel)
            std = float(values.std())
            self.stats[n] = (float(values.mean()), std if std > 0 else 1.0)
        self.length = sum(int(torch.Size(s).numel()) for s in self.shapes.values())
        self.padded = -(-self.length // multiple) * multiple

    def flatten(self, adapter: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [((adapter[n].double().flatten() - m) / s).float() for n, (m, s) in self.stats.items()]
        x = torch.cat(parts)  # (length,)
        return nn.functional.pad(x, (0, self.padded - self.length))  # (padded,)

    def unflatten(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for n in self.names:
            size = int(torch.Size(self.shapes[n]).numel())
            m, s = self.stats[n]
            out[n] = (x[start:start + size].double() * s + m).float().reshape(self.shapes[n])
            start += size
        return out


# ---------------------------------------------------------------------------------------------- the CVAE


class CVAE(nn.Module):
    """ICM-LoRA's conditional VAE over flattened adapters (module docstring): 1-D convolutions, condition at the
    latent only. Input (B, L) with L a multiple of 2^len(channels); condition (B, C)."""

    def __init__(self, length: int, condition_dim: int, latent_dim: int = 256, hidden_dim: int = 256,
                 channels: Sequence[int] = REFERENCE_CHANNELS) -> None:
        super().__init__()
        depth = len(channels)
        if depth < 2 or length % (2 ** depth):
            raise ValueError(f"the CVAE needs at least 2 blocks and an input length divisible by 2^{depth}")
        self.length, self.latent_dim, self.channels = length, latent_dim, tuple(channels)
        self.bottom = length // 2 ** depth  # positions after the encoder
        widths = (1, *channels)
        self.encoder = nn.Sequential(*[nn.Sequential(nn.Conv1d(a, b, 7, stride=2, padding=3), nn.BatchNorm1d(b),
                                                     nn.LeakyReLU()) for a, b in zip(widths[:-1], widths[1:])])
        self.to_h = nn.Linear(channels[-1] * self.bottom, hidden_dim)
        self.mu = nn.Linear(hidden_dim + condition_dim, latent_dim)
        self.log_var = nn.Linear(hidden_dim + condition_dim, latent_dim)
        self.from_z = nn.Linear(latent_dim + condition_dim, channels[-1] * self.bottom)
        up = tuple(reversed(channels))  # (8, 16, ..., 8) mirrored
        self.decoder = nn.Sequential(*[
            nn.Sequential(nn.ConvTranspose1d(a, b, 7, stride=2, padding=3, output_padding=1), nn.BatchNorm1d(b),
                          nn.ELU()) for a, b in zip(up[:-1], up[1:])])
        last = up[-1]
        self.head = nn.Sequential(nn.ConvTranspose1d(last, last, 7, stride=2, padding=3, output_padding=1),
                                  nn.BatchNorm1d(last), nn.ELU(), nn.Conv1d(last, 1, 7, padding=3))

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.to_h(self.encoder(x[:, None]).flatten(1))  # (B, hidden)
        hc = torch.cat([h, c], dim=1)  # (B, hidden + C)
        return self.mu(hc), self.log_var(hc)  # (B, latent) each

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.from_z(torch.cat([z, c], dim=1)).view(-1, self.channels[-1], self.bottom)  # (B, ch, bottom)
        return self.head(self.decoder(h))[:, 0]  # (B, L)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, log_var = self.encode(x, c)
        z = mu + torch.randn_like(mu) * (0.5 * log_var).exp()  # the reparameterisation trick
        return self.decode(z, c), mu, log_var


def cvae_loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(MSE + β·KL, MSE, KL): MSE over every entry (padding included, as the reference), KL summed over latent
    dimensions and averaged over the batch."""
    mse = nn.functional.mse_loss(recon, x)
    kl = (-0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(1)).mean()
    return mse + beta * kl, mse, kl


def train_cvae(model: CVAE, xs: torch.Tensor, cs: torch.Tensor, epochs: int, batch_size: int, lr: float,
               beta: float, seed: int) -> list[dict[str, float]]:
    """AdamW with cosine annealing over `epochs` (the reference's T_max = 2 × epochs, stepped per epoch); returns the
    per-epoch mean losses."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2 * epochs)
    curve = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(xs), generator=g)
        totals = [0.0, 0.0, 0.0]
        for lo in range(0, len(xs), batch_size):
            idx = order[lo:lo + batch_size]
            if len(idx) < 2:  # BatchNorm needs two rows
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 100003 + epoch * 1009 + lo)
                recon, mu, log_var = model(xs[idx], cs[idx])
            loss, mse, kl = cvae_loss(recon, xs[idx], mu, log_var, beta)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for i, v in enumerate((loss, mse, kl)):
                totals[i] += float(v.detach()) * len(idx)
        schedule.step()
        curve.append({"epoch": epoch + 1, "loss": totals[0] / len(xs), "mse": totals[1] / len(xs),
                      "kl": totals[2] / len(xs)})
    return curve


@torch.no_grad()
def generate(model: CVAE, c: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """`samples` vectors decoded from z ~ N(0, I) with condition c (C,): (samples, L)."""
    model.eval()
    z = torch.randn(samples, model.latent_dim, generator=torch.Generator().manual_seed(seed)).to(c.device)
    return model.decode(z, c[None].expand(samples, -1))


# ---------------------------------------------------------------------------------------------- the task


class GenerateTask:
    """Generate adapters for `members` (seen: their snapshots train the CVAE) and `held_out` tasks (never seen).

    Args:
        members: task options whose snapshots train the generator (binary classification tasks of one model).
        held_out: task options generated without any of their adapters in training; each is still trained as an
            ordinary cell, for the score its generated adapter is normalised by.
        snapshots: adapter snapshots per member (record.snapshots of its cell).
        context_examples: training rows of a task its condition vector is computed from.
        samples: adapters generated per task (each scored; the record holds their mean and best).
        latent_dim, hidden_dim, channels: the CVAE (channels: one width per stride-2 block).
        beta: β of the KL term (the reference's 0.005).
        epochs, batch_size, lr: CVAE training (the reference: 2000 epochs, batch 2, lr 2e-4).
        member_overrides: overrides every member cell gets (e.g. ["method.target_modules=[query,value]"]).
        **member_keys: any other task key is the member tasks' (`task.<key>=<value>` on every member).
    """

    name = "generate"
    suite = None

    def __init__(self, members: Sequence[str], held_out: Sequence[str] = (), snapshots: int = 10,
                 context_examples: int = 32, samples: int = 3, latent_dim: int = 256, hidden_dim: int = 256,
                 channels: Sequence[int] = REFERENCE_CHANNELS, beta: float = 0.005, epochs: int = 200,
                 batch_size: int = 4, lr: float = 2e-4, member_overrides: Sequence[str] = (),
                 **member_keys: Any) -> None:
        self.members, self.held_out = [str(m) for m in members], [str(m) for m in held_out]
        if len(self.members) < 1 or set(self.members) & set(self.held_out):
            raise ValueError("task.members needs at least one task, and no task may be both a member and held out")
        if int(snapshots) < 2 or int(context_examples) < 2 or int(samples) < 1:
            raise ValueError("task.snapshots and task.context_examples must be >= 2, task.samples >= 1")
        if not (beta >= 0 and epochs >= 1 and batch_size >= 2 and lr > 0):
            raise ValueError("the CVAE needs beta >= 0, epochs >= 1, batch_size >= 2 and lr > 0")
        self.snapshots, self.context_examples, self.samples = int(snapshots), int(context_examples), int(samples)
        self.latent_dim, self.hidden_dim, self.channels = int(latent_dim), int(hidden_dim), tuple(int(c) for c in channels)
        self.beta, self.epochs, self.batch_size, self.lr = float(beta), int(epochs), int(batch_size), float(lr)
        from tasks.merge import task_key_overrides

        self.member_overrides = [*map(str, member_overrides), *task_key_overrides(member_keys)]
        self.main_metric = "heldout_normalized" if self.held_out else "seen_normalized"

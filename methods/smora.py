"""SMoRA: every rank of a LoRA is an expert; a sigmoid router picks k of the r rank-1 experts per token, with
auxiliary-loss-free load balancing through a non-trainable router bias."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import WrapContext
from methods.swap import AdaptedLinear, SwapMethod


def _layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one layer's draws, the same in every process (unlike the salted hash())."""
    digest = hashlib.blake2b(f"{seed}/smora/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init, kaiming-uniform(a=√5) = U(±1/√fan_in), drawn on the CPU from `generator`."""
    out = torch.empty(shape)
    nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=generator)
    return out.to(like.device, like.dtype)


class SMoRALinear(AdaptedLinear):
    """y = W0·x + (α/k)·Σ_{i∈top-k} ĝ_i·(a_iᵀx)·b_i with g = σ(W_g·x) + β and ĝ = k·g_top/Σg_top.

    A (r×n, rows a_iᵀ), B (m×r, columns b_i) and the router W_g (r×n) are trainable; β (r,) is a buffer moved by
    the load-balancing rule, and `counts` (r,) counts how often each expert was selected in training forwards since
    the last update (every token position of the batch, padding included, as the reference does).
    """

    def __init__(self, base: nn.Linear, r: int, k: int, alpha: float, dropout: float, generator: torch.Generator) -> None:
        super().__init__(base)
        self.r, self.k, self.scaling = int(r), int(k), float(alpha) / int(k)
        w = base.weight
        self.A = nn.Parameter(_kaiming_uniform((self.r, self.in_features), generator, w))  # (r, n) LoRA's A init
        self.B = nn.Parameter(torch.zeros(self.out_features, self.r, device=w.device, dtype=w.dtype))  # (m, r) zero: init == base
        self.router = nn.Parameter(_kaiming_uniform((self.r, self.in_features), generator, w))  # (r, n) nn.Linear init
        self.register_buffer("beta", torch.zeros(self.r, device=w.device))  # (r,) fp32: steps of 1e-5 survive bf16
        self.register_buffer("counts", torch.zeros(self.r, device=w.device))  # (r,) selections since the last update
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def gates(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense gates (..., r), zero outside the top-k, the k kept ones summing to k; and the top-k indices (..., k)."""
        scores = torch.sigmoid(F.linear(h, self.router).float()) + self.beta  # (..., r) g = σ(W_g x) + β
        top, idx = scores.topk(self.k, dim=-1)  # (..., k)
        kept = self.k * top / top.sum(dim=-1, keepdim=True)  # (..., k) ĝ = k·g_top / Σ g_top
        return torch.zeros_like(scores).scatter(-1, idx, kept), idx  # (..., r), (..., k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x)  # (..., n)
        gates, idx = self.gates(h)  # (..., r), (..., k)
        if self.training:
            with torch.no_grad():
                self.counts += torch.bincount(idx.reshape(-1), minlength=self.r).to(self.counts.dtype)  # (r,)
        proj = F.linear(h, self.A)  # (..., r) a_iᵀx
        z = proj * gates.to(proj.dtype)  # (..., r) ĝ_i·a_iᵀx
        return self.base(x) + self.scaling * F.linear(z, self.B)  # (..., m)

    @torch.no_grad()
    def balance(self, rate: float) -> None:
        """β_i += u·sign(mean count − count_i), then reset the counts (no-op if nothing was counted)."""
        if self.counts.sum() > 0:
            self.beta += rate * torch.sign(self.counts.mean() - self.counts)  # (r,)
        self.counts.zero_()

    def delta(self) -> torch.Tensor:
        raise NotImplementedError("SMoRA has no ΔW: its update (α/k)·Σ ĝ_i(x)·b_i·a_iᵀ depends on the input x "
                                  "through the router")


class SMoRA(SwapMethod):
    """SMoRA: y = W0·x + (α/k)·Σ_{i∈top-k(g)} ĝ_i·(a_iᵀx)·b_i, r rank-1 experts (a_i, b_i), router
    g = σ(W_g·x) + β, ĝ = k·g_top/Σg_top; after each training step β_i += u·sign(mean count − count_i).

    Zhao et al., "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-task Learning",
    arXiv 2501.15103 (KDD 2026); reference StyxXuan/smora @ 7e7ada17fda3bc1a82b80536617074a62d41f715
    (packages/peft/src/peft/tuners/srmole/layer.py `SRMoLELinear`, config.py; scripts/traing_configs/).

    Each of the r ranks of a LoRA is an expert; a sigmoid router (r×n, no bias) scores them, a non-trainable bias β
    is added to the scores, the top-k experts are kept and their scores renormalised to sum to k; the output is
    scaled by α/k (the reference: lora_alpha / activate_r). The router sees the same dropout(x) as the experts, and
    gradients flow through the kept scores into the router. Load balancing (auxiliary-loss-free, as in DeepSeek-V3)
    moves β_i by u·sign(mean count − count_i), with counts of top-k selections over every token position.
    Init: A and the router kaiming-uniform(a=√5) (nn.Linear's default), B = 0, β = 0: the model starts at the base.

    Where this follows the reference differently: the reference moves β inside every training forward (after the
    top-k, so it only affects the next forward); here the counts of the step's forwards are summed and β moves once
    in on_step_end (after the optimizer step). With grad_accum = 1 the two are identical; with more micro-batches
    β moves once per optimizer step, on the summed counts. The experts are evaluated densely (r is small; the
    reference's indexed kernels compute the same sum). β and the pending counts are persistent buffers and are
    also returned by method.state_dict().

    Not mergeable: the gates depend on the input, so no single weight W0 + ΔW reproduces the forward. merge()
    raises NotImplementedError, `mergeable = False`, and delta_weights() returns {} (analyses of ΔW skip SMoRA;
    the input-averaged update is not a property of the method).

    Args:
        lr: learning rate (the reference's training configs: 1e-4).
        target_modules: module-name suffixes to adapt.
        r: number of rank-1 experts (the README example: 16; the paper's training configs: 64).
        k: experts kept per token (activate_r; the reference: 8).
        alpha: scaling numerator; the update is scaled by alpha / k (README example: 32; training configs: 16).
        dropout: dropout on the adapter and router input (README example: 0.1; training configs: 0).
        bias_update_rate: u, the step of the load-balancing bias β.
    """

    family = "rank allocation"

    init_equals_base = True
    mergeable = False

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        r: int = 16,
        k: int = 8,
        alpha: float = 32.0,
        dropout: float = 0.1,
        bias_update_rate: float = 1e-5,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if not 1 <= k <= r:
            raise ValueError(f"SMoRA needs 1 <= k <= r, got k={k}, r={r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}")
        self.r, self.k, self.alpha, self.dropout = int(r), int(k), float(alpha), float(dropout)
        self.bias_update_rate = float(bias_update_rate)
        self._layers: dict[str, SMoRALinear] = {}

    def make_layer(self, name: str, base: nn.Linear, ctx: WrapContext) -> AdaptedLinear:
        generator = torch.Generator().manual_seed(_layer_seed(ctx.seed, name))
        return SMoRALinear(base, self.r, self.k, self.alpha, self.dropout, generator)

    def layer_trainable(self, base: nn.Linear) -> int:
        return self.r * (2 * base.in_features + base.out_features)  # A (r×n) + router (r×n) + B (m×r)

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        model = super().wrap(model, ctx)
        self._layers = self.adapted_layers(model)  # type: ignore[assignment]
        return model

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> bool:
        for layer in self.adapted_layers(model).values():
            layer.balance(self.bias_update_rate)  # type: ignore[operator]
        return False

    # ---------------------------------------------------------------------------------- after training
    def merge(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError("SMoRA cannot be merged: the router picks different experts for every token, so "
                                  "the update depends on the input and no single weight W0 + ΔW reproduces it")

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """{}: SMoRA has no input-independent ΔW (see the class docstring)."""
        return {}

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """β and the pending selection counts of every layer."""
        out: dict[str, Any] = {}
        for name, layer in self._layers.items():
            out[f"{name}.beta"] = layer.beta.detach().to("cpu").clone()
            out[f"{name}.counts"] = layer.counts.detach().to("cpu").clone()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {f"{n}.{k}" for n in self._layers for k in ("beta", "counts")}
        if set(state) != expected:
            raise KeyError(f"SMoRA state does not fit the model: missing {sorted(expected - set(state))[:5]}, "
                           f"unexpected {sorted(set(state) - expected)[:5]}")
        with torch.no_grad():
            for name, layer in self._layers.items():
                layer.beta.copy_(state[f"{name}.beta"].to(layer.beta.device))
                layer.counts.copy_(state[f"{name}.counts"].to(layer.counts.device))

"""Export a trained run for use outside deltabench.

Wherever the method's ΔW is low-rank, the export is a standard PEFT LoRA adapter that any PEFT user loads with
`PeftModel.from_pretrained(base_model, folder)`: each adapted layer's ΔW is factored by SVD at its numerical rank
(per-layer ranks through `rank_pattern`), the trained task head goes in `modules_to_save`. The export is checked
by loading it back with PEFT and comparing outputs with the trained model; when ΔW is not low-rank (full
fine-tuning, full-rank methods) or the check fails (a method that also changes what LoRA cannot express), the
export is the merged model in Hugging Face format instead, and the record says which and why.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from methods.base import Batch, Method, WrapContext


@dataclass
class ExportResult:
    kind: str  # "peft_lora", "merged", or "none" (a method that cannot be merged)
    path: Path
    max_abs_diff: float  # between the exported model's outputs and the trained model's, on a check batch
    ranks: dict[str, int]
    reason: str = ""


def low_rank_factors(delta: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """B (m×k), A (k×n) with B·A = ΔW up to fp32 rounding, k the numerical rank (σ_i > rtol·σ_1)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (m, q), (q,), (q, n)
    k = max(1, int((s > rtol * s[0]).sum())) if s[0] > 0 else 1
    root = s[:k].sqrt()
    return (u[:, :k] * root).float(), (root[:, None] * vh[:k]).float()


def _outputs(model: nn.Module, batch: Batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


def export(model: nn.Module, method: Method, base: nn.Module, ctx: WrapContext, batch: Batch, out: Path,
           max_rank_fraction: float = 0.5, atol: float = 1e-4) -> ExportResult:
    """Write a PEFT LoRA adapter (or the merged model) for the trained `model` into `out`.

    Args:
        base: a fresh copy of the pre-trained model (the one PEFT users load the adapter onto).
        batch: a batch to check the export on.
        max_rank_fraction: ΔW whose rank exceeds this fraction of min(m, n) is not exported as LoRA.
    """
    if not method.mergeable:
        return ExportResult("none", out, float("nan"), {}, f"{type(method).__name__} is not mergeable; "
                            "its trained tensors are in adapter.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    expected = _outputs(model, batch)
    deltas = method.delta_weights(model)
    factors = {name: low_rank_factors(d) for name, d in deltas.items()}
    ranks = {name: b.shape[1] for name, (b, _) in factors.items()}
    too_high = {n: r for n, r in ranks.items() if r > max_rank_fraction * min(deltas[n].shape)}
    trained = dict(method.trainable_parameters(model))
    touches_other_weights = any(  # the method trains something besides adapters and heads (e.g. full fine-tuning)
        p.requires_grad and not any(n.startswith(h) for h in ctx.head_modules) and n in dict(base.named_parameters())
        for n, p in model.named_parameters()
    )
    reason = ""
    if too_high:
        reason = f"ΔW is not low-rank (e.g. {next(iter(too_high))}: rank {next(iter(too_high.values()))})"
    elif touches_other_weights:
        reason = "the method trains weights outside its adapters"
    else:
        config = LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=sorted(deltas),
                            rank_pattern={n: r for n, r in ranks.items()},
                            alpha_pattern={n: r for n, r in ranks.items()},  # s = alpha / r = 1: B·A is ΔW itself
                            modules_to_save=list(ctx.head_modules) or None)
        peft_model = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for name, (b, a) in factors.items():
                layer = peft_model.base_model.model.get_submodule(name)
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
            for head in ctx.head_modules:
                source = {n.split(head + ".")[-1].split("modules_to_save.default.")[-1]: p
                          for n, p in trained.items() if f"{head}." in n}
                target = peft_model.base_model.model.get_submodule(head).modules_to_save["default"]
                for n, p in target.named_parameters():
                    p.copy_(source[n])
        peft_model.save_pretrained(str(out))
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out))
        diff = float((_outputs(reloaded, batch) - expected).abs().max())
        if diff <= atol:
            return ExportResult("peft_lora", out, diff, ranks)
        reason = f"the LoRA export differs from the trained model by {diff:.2e} (> {atol})"
    merged = method.merge(copy.deepcopy(model))
    merged.save_pretrained(str(out))
    diff = float((_outputs(merged, batch) - expected).abs().max())
    return ExportResult("merged", out, diff, ranks, reason)

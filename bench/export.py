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
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from methods.base import Batch, Method, WrapContext

CONF_METHOD = Path(__file__).resolve().parents[1] / "conf" / "method"
ARXIV = re.compile(r"arXiv[: ]\s*(\d{4}\.\d{4,5})")


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
           max_rank_fraction: float = 0.5, atol: float = 1e-4, base_model_id: str | None = None,
           card: dict[str, Any] | None = None) -> ExportResult:
    """Write a PEFT LoRA adapter (or the merged model) for the trained `model` into `out`.

    Args:
        base: a fresh copy of the pre-trained model (the one PEFT users load the adapter onto).
        batch: a batch to check the export on.
        max_rank_fraction: ΔW whose rank exceeds this fraction of min(m, n) is not exported as LoRA.
        base_model_id: the base model's hub id (cfg.model.id), written as adapter_config.json's
            base_model_name_or_path instead of the folder the weights were loaded from (a path in this machine's
            virtual environment for the offline models).
        card: the run's record so far, with its final metrics: README.md (the model card) is filled from it
            instead of PEFT's empty template.
    """
    result = _export(model, method, base, ctx, batch, out, max_rank_fraction, atol)
    if result.kind == "none":
        return result
    if base_model_id and result.kind == "peft_lora":
        config_path = out / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_model_id
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if card is not None:
        (out / "README.md").write_text(model_card(card, result, method, base_model_id, base))
    return result


def paper_reference(option: str, method: Method) -> tuple[str, str | None]:
    """The method's one-line description (the first comment line of conf/method/<option>.yaml) and its arXiv id
    (from that line, else from the method class's docstring), or None."""
    line = ""
    path = CONF_METHOD / f"{option}.yaml"
    if path.is_file():
        first = next((l for l in path.read_text().splitlines() if l.strip()), "")
        line = first.lstrip("# ").strip() if first.lstrip().startswith("#") else ""
    for text in (line, *(inspect.getdoc(k) or "" for k in type(method).__mro__ if k.__module__.startswith("methods"))):
        if found := ARXIV.search(text):
            return line, found.group(1)
    return line, None


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def auto_class(base: nn.Module) -> tuple[str, str]:
    """The transformers Auto class that loads `base` with its head, and its extra arguments."""
    name = type(base).__name__
    config = getattr(base, "config", None)
    if "SequenceClassification" in name:
        return "AutoModelForSequenceClassification", f", num_labels={getattr(config, 'num_labels', '...')}"
    if "CausalLM" in name:
        return "AutoModelForCausalLM", ""
    if "ImageClassification" in name:
        return "AutoModelForImageClassification", f", num_labels={getattr(config, 'num_labels', '...')}"
    return "AutoModel", ""


def model_card(record: dict[str, Any], result: ExportResult, method: Method, base_model_id: str | None,
               base: nn.Module | None = None) -> str:
    """README.md of an export: what was trained (method and paper, base model, task), its score and how to load it."""
    option, task, config = record.get("method", "?"), record.get("task", "?"), record.get("config") or {}
    description, arxiv = paper_reference(option, method)
    metrics, main = record.get("metrics") or {}, record.get("main_metric")
    train, mcfg = config.get("train") or {}, config.get("method") or {}
    source = (record.get("params") or {}).get("model_source") or ""
    base_id = base_model_id or "?"
    peft = result.kind == "peft_lora"
    higher = (record.get("higher_is_better") or {}).get(main, True)
    ranks = list(result.ranks.values())
    tags = ["deltabench", option, task.replace("/", "-"), "peft" if peft else "merged"]
    lines = ["---", f"base_model: {base_id}", f"library_name: {'peft' if peft else 'transformers'}",
             "tags:", *(f"- {t}" for t in tags), "---", "",
             f"# {option} on {task} ({record.get('model', '?')}), exported by deltabench", ""]
    if description:
        lines += [description, ""]
    paper = f"arXiv {arxiv} (https://arxiv.org/abs/{arxiv})" if arxiv else "not recorded"
    score = (f"**{main} = {_fmt(metrics[main])}** ({'higher' if higher else 'lower'} is better)"
             if main in metrics else "not recorded")
    lines += [
        f"- **Method**: `method={option}` (conf/method/{option}.yaml); paper: {paper}",
        f"- **Base model**: `{base_id}` (`model={record.get('model', '?')}`"
        + ("; random weights: a test model, not the pretrained one" if source == "random" else "") + ")",
        f"- **Task**: `task={task}`, scored on {record.get('eval_split') or '?'}"
        + (f" ({record['eval_note']})" if record.get("eval_note") else ""),
        f"- **Score**: {score}",
        f"- **All metrics**: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in sorted(metrics.items())),
        f"- **Training**: {train.get('max_steps')} steps of batch {train.get('batch_size')} "
        f"(× {train.get('grad_accum', 1)}), lr {mcfg.get('lr')}, seed {record.get('seed')}",
        "- **Export**: " + (f"PEFT LoRA adapter, per-layer ranks {min(ranks)}..{max(ranks)}"
                            if peft and ranks else f"merged model ({result.reason})")
        + f"; max |logit difference| to the trained model on a check batch: {result.max_abs_diff:.2e}",
        f"- **Run**: `{record.get('id', '?')}` (config hash `{record.get('config_hash', '?')}`)",
        "",
    ]
    auto, extra = auto_class(base) if base is not None else ("AutoModel", "")
    lines += ["## Use", "", "```python"]
    if peft:
        lines += ["from peft import PeftModel", f"from transformers import {auto}", "",
                  f'base = {auto}.from_pretrained("{base_id}"{extra})',
                  'model = PeftModel.from_pretrained(base, "<this folder>")']
    else:
        lines += [f"from transformers import {auto}", "", f'model = {auto}.from_pretrained("<this folder>")']
    lines += ["```", ""]
    return "\n".join(lines)


def _export(model: nn.Module, method: Method, base: nn.Module, ctx: WrapContext, batch: Batch, out: Path,
            max_rank_fraction: float, atol: float) -> ExportResult:
    """export() without the card and the base model id."""
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

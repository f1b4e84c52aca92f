"""Post-training compression shared by EoRA and WeLore: pruning and NormalFloat quantisation of a weight, the
compressed layer (a frozen dense part plus low-rank factors), and the LoRA base that fine-tunes first, then
compresses and compensates in post_train().

The run of such a method (bench/run.py): wrap + train are LoRA's (PEFT, conf/method/lora.yaml's defaults); then
post_train() folds the trained ΔW into the target weights (the fine-tuned model, "base"), compresses them
("compressed") and compensates; the runner's final evaluation scores the compensated model. Afterwards every
target layer is a `CompressedLinear` (or a frozen plain Linear), and merge()/delta_weights() describe that final
model relative to the pre-trained W0.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from methods.base import Batch, LossFn, WrapContext
from methods.lora import LoRA
from methods.lq_lora import QuantConfig, nf_quantize
from methods.swap import linear_from, set_submodule

PRUNINGS = ("magnitude", "2:4")
QUANTISATIONS = ("nf4",)
PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------------------------- compression
def magnitude_prune(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured magnitude pruning of one matrix: the round(sparsity·m·n) smallest |w_ij| become 0."""
    k = int(round(sparsity * w.numel()))
    out = w.detach().clone()
    if k > 0:
        drop = torch.topk(out.abs().reshape(-1), k, largest=False).indices  # (k,)
        out.view(-1)[drop] = 0
    return out


def semi_structured_prune(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M pruning (2:4 by default): in every group of m consecutive input weights of a row, keep the n largest |w|."""
    rows, cols = w.shape
    if cols % m:
        raise ValueError(f"{n}:{m} pruning needs in_features divisible by {m}, got {cols}; "
                         "use method.compression=[magnitude] for this model")
    groups = w.detach().reshape(rows, cols // m, m)  # (m_out, n_in/M, M)
    keep = torch.topk(groups.abs(), n, dim=-1).indices  # (m_out, n_in/M, N)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(rows, cols)


def check_compression(steps: Sequence[str], sparsity: float) -> list[str]:
    """Validate `compression` (a list of steps applied in order): at most one pruning, and before quantisation."""
    steps = [steps] if isinstance(steps, str) else list(steps)
    known = PRUNINGS + QUANTISATIONS
    unknown = [s for s in steps if s not in known]
    if not steps or unknown:
        raise ValueError(f"method.compression must be a non-empty list of {list(known)}, got {steps}")
    prunes = [i for i, s in enumerate(steps) if s in PRUNINGS]
    quants = [i for i, s in enumerate(steps) if s in QUANTISATIONS]
    if len(prunes) > 1 or len(quants) > 1 or (prunes and quants and prunes[0] > quants[0]):
        raise ValueError(f"method.compression={steps}: at most one pruning and one quantisation, pruning first "
                         "(e.g. [2:4, nf4])")
    if "magnitude" in steps and not 0.0 < sparsity < 1.0:
        raise ValueError(f"method.sparsity must be in (0, 1) for magnitude pruning, got {sparsity}")
    return steps


def compress_weight(w: torch.Tensor, steps: Sequence[str], sparsity: float, qconfig: QuantConfig) -> torch.Tensor:
    """W_c: `steps` applied in order to w (m×n), in fp32. NF4 keeps pruned zeros at 0 (its codebook has an exact 0)."""
    out = w.detach().float()
    for step in steps:
        if step == "magnitude":
            out = magnitude_prune(out, sparsity)
        elif step == "2:4":
            out = semi_structured_prune(out, 2, 4)
        elif step == "nf4":
            out = nf_quantize(out, qconfig)
    return out


# ------------------------------------------------------------------------------------------ compressed layer
class CompressedLinear(nn.Module):
    """y = W_c·x + B·(A·x) + b: a frozen dense weight W_c (m×n; None for a purely low-rank layer) plus low-rank
    factors B (m×k), A (k×n) (None for a dense-only layer), and the original frozen bias.

    `compensate = False` drops the low-rank term (the compressed model before compensation is scored that way).
    """

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, up: torch.Tensor | None,
                 down: torch.Tensor | None, trainable: bool) -> None:
        super().__init__()
        ref = weight if weight is not None else up
        assert ref is not None, "a CompressedLinear needs a dense weight or low-rank factors"
        self.out_features = ref.shape[0]
        self.in_features = weight.shape[1] if weight is not None else down.shape[1]  # type: ignore[union-attr]
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone(), requires_grad=False)  # (m, n)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)  # (m,)
        self.B = None if up is None else nn.Parameter(up.detach().clone(), requires_grad=trainable)  # (m, k)
        self.A = None if down is None else nn.Parameter(down.detach().clone(), requires_grad=trainable)  # (k, n)
        self.compensate = True

    @property
    def rank(self) -> int:
        return 0 if self.A is None else self.A.shape[0]

    def stored_parameters(self) -> int:
        """Weights this layer stores (dense part + factors; the bias is not counted)."""
        return sum(p.numel() for p in (self.weight, self.A, self.B) if p is not None)

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward computes with (m×n)."""
        w = self.weight if self.weight is not None else torch.zeros(
            self.out_features, self.in_features, device=self.B.device, dtype=self.B.dtype)  # type: ignore[union-attr]
        if self.compensate and self.A is not None:
            w = w + self.B @ self.A  # (m, n)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = self.compensate and self.A is not None
        if self.weight is not None:
            y = F.linear(x, self.weight, self.bias)  # (..., m)
            return y + F.linear(F.linear(x, self.A), self.B) if low_rank else y
        y = F.linear(F.linear(x, self.A), self.B, self.bias)  # (..., m) purely low-rank
        return y

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            return linear_from(self.effective_weight(), self.bias).requires_grad_(False)


def batch_source(ctx: WrapContext, fallback: Sequence[Batch]) -> Callable[[], Iterable[Batch]]:
    """One pass over the training batches: ctx.train_batches() (the runner's seeded loader, on the run's device), or
    the batches calibrate() saw when the context has none (unit tests)."""
    if ctx.train_batches is not None:
        return ctx.train_batches
    if fallback:
        return lambda: iter(fallback)
    raise ValueError("post-training compensation needs training batches: run it through bench/run.py "
                     "(ctx.train_batches) or call calibrate() with batches first")


def batch_stream(source: Callable[[], Iterable[Batch]]) -> Iterator[Batch]:
    """Endless batches: pass after pass of `source()`."""
    while True:
        empty = True
        for batch in source():
            empty = False
            yield batch
        if empty:
            raise ValueError("the training batches are empty")


def take_samples(batches: Iterable[Batch], samples: int) -> list[Batch]:
    """The first `samples` examples of `batches` (one pass; fewer if it is shorter), the last batch cut to size."""
    out, seen = [], 0
    for batch in batches:
        rows = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
        keep = min(rows, samples - seen)
        cut = {k: v[:keep] if torch.is_tensor(v) and v.shape[:1] == (rows,) else v for k, v in batch.items()}
        out.append(cut if keep < rows else batch)
        seen += keep
        if seen >= samples:
            break
    return out


# ------------------------------------------------------------------------------------------------ the method
class CompressedLoRA(LoRA):
    """LoRA fine-tuning, then (post_train) fold ΔW into W, compress and compensate: the shared base of EoRA and WeLore.

    Subclasses implement `post_train`. Before it runs the method is exactly LoRA (the shared checklist sees that);
    after it, `compressed` is True and every target layer is a `CompressedLinear` or a frozen `nn.Linear`.
    """

    family = "compression"

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003  (LoRA's arguments)
        super().__init__(*args, **kwargs)
        self.compressed = False
        self._calibration: list[Batch] = []

    def calibrate(self, model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn) -> None:
        """Keep the calibration batches: post_train() falls back on them when its context has no train_batches."""
        self._calibration = list(batches)

    def fine_tuned_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """{layer: W0 + ΔW} in float64 on the layer's device: the fine-tuned model's weights (LoRA, DoRA, PiSSA)."""
        layers = self.lora_layers(model)
        return {name: (self._w0[name].double() + delta.double()).to(layers[name].get_base_layer().weight.device)
                for name, delta in super().delta_weights(model).items()}

    def install(self, model: nn.Module, name: str, module: nn.Module) -> None:
        """Put `module` where the PEFT LoRA layer of target `name` is."""
        set_submodule(model, PEFT_PREFIX + name, module)

    def target_modules_now(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: model.get_submodule(PEFT_PREFIX + name) for name in self._w0}

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Before post_train: LoRA's closed form. After: W_final − W0 in float64, W_final = W_c + B·A (or the
        frozen dense weight), exactly what merge() writes up to fp32 rounding."""
        if not self.compressed:
            return super().delta_weights(model)
        out = {}
        with torch.no_grad():
            for name, module in self.target_modules_now(model).items():
                if isinstance(module, CompressedLinear):
                    w = copy.deepcopy(module).to("cpu", torch.float64).effective_weight()
                elif isinstance(module, LoraLayer):
                    raise RuntimeError(f"{name} is still a LoRA layer after post_train")
                else:
                    w = module.weight.detach().to("cpu", torch.float64)
                out[name] = (w - self._w0[name].double()).float()
        return out

    def merge(self, model: nn.Module) -> nn.Module:
        merged = super().merge(model)  # PEFT: folds the LoRA layers that remain (all of them before post_train)
        for name, module in list(merged.named_modules()):
            if isinstance(module, CompressedLinear):
                set_submodule(merged, name, module.merged())
        return merged

    def compression_stats(self, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean relative compression error ‖W − W_c‖_F / ‖W‖_F and the fraction of exact zeros in W_c."""
        errors = [float((before[n] - after[n].double()).norm() / before[n].norm().clamp_min(1e-30)) for n in before]
        zeros = sum(int((after[n] == 0).sum()) for n in after) / max(1, sum(after[n].numel() for n in after))
        return {"compression/relative_error": sum(errors) / max(1, len(errors)), "compression/zero_fraction": zeros}


def score(ctx: WrapContext, model: nn.Module) -> float | None:
    """ctx.evaluate's main metric of `model`, or None when the context has no evaluation (unit tests)."""
    if ctx.evaluate is None:
        return None
    metrics = ctx.evaluate(model)
    key = ctx.main_metric or next(iter(metrics))
    return float(metrics[key])

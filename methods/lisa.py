"""LISA and OwLore: full-weight fine-tuning of a few transformer blocks at a time, re-sampled every K steps
(uniformly for LISA, in proportion to each block's share of outlier weights for OwLore, whose active blocks also
train through GaLore's low-rank gradient projection)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from methods.base import Batch, LossFn, WrapContext
from methods.full import Full
from methods.galore import GaLoreAdamW, projected_param_groups
from methods.structured_lora import stable_seed
from tasks.base import model_inputs

log = logging.getLogger(__name__)


# ============================================================================================ helpers
def find_blocks(model: nn.Module, head_modules: Sequence[str] = (),
                path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The transformer blocks of `model`: the module at `path`, or else the longest nn.ModuleList outside the heads
    (a BERT's `encoder.layer`, a Llama's `model.layers`, a GPT-2's `transformer.h`). Raises when none or several
    lists of that length exist, naming the YAML key that settles it."""
    if path:
        try:
            blocks = model.get_submodule(path)
        except AttributeError as e:
            raise ValueError(f"method.blocks={path!r} names no module of {type(model).__name__}") from e
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"method.blocks={path!r} is a {type(blocks).__name__}, not a non-empty nn.ModuleList")
        return path, blocks
    lists = {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and any(True for _ in m.parameters())
        and not any(name == h or name.startswith(h + ".") for h in head_modules)
    }
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of transformer blocks; set method.blocks to "
                         "the dotted name of the block list (e.g. encoder.layer, model.layers)")
    longest = max(len(m) for m in lists.values())
    names = sorted(n for n, m in lists.items() if len(m) == longest)
    if len(names) > 1:
        raise ValueError(f"{type(model).__name__} has several block lists of length {longest}: {names}; "
                         "set method.blocks to the one to sample")
    return names[0], lists[names[0]]


class BlockSampler:
    """γ of L block indices, drawn one after the other without replacement, each draw ∝ the remaining weights p
    (numpy.random.choice(L, γ, replace=False, p=p), which the reference calls); uniform p gives a uniform γ-subset.

    The draws come from a torch.Generator seeded from the run's seed; its state and p are in state_dict(), so a
    resumed run draws the same sequence of sets.
    """

    def __init__(self, n_blocks: int, gamma: int, seed: int) -> None:
        if not 1 <= gamma <= n_blocks:
            raise ValueError(f"method.gamma must be in [1, {n_blocks}] (the model has {n_blocks} blocks), got {gamma}")
        self.n_blocks, self.gamma = int(n_blocks), int(gamma)
        self.probs = torch.full((self.n_blocks,), 1.0 / self.n_blocks, dtype=torch.float64)  # (L,)
        self.generator = torch.Generator().manual_seed(int(seed))

    def set_probs(self, probs: torch.Tensor) -> None:
        p = torch.as_tensor(probs, dtype=torch.float64).flatten()  # (L,)
        if p.numel() != self.n_blocks or bool((p < 0).any()) or not float(p.sum()) > 0:
            raise ValueError(f"block probabilities must be {self.n_blocks} non-negative numbers with a positive sum, "
                             f"got {p.tolist()}")
        if int((p > 0).sum()) < self.gamma:
            raise ValueError(f"only {int((p > 0).sum())} blocks have a non-zero probability ({p.tolist()}) but "
                             f"method.gamma={self.gamma} must be drawn without replacement; lower method.gamma")
        self.probs = p / p.sum()

    def draw(self) -> list[int]:
        weights = self.probs.clone()  # (L,)
        chosen = []
        for _ in range(self.gamma):
            i = int(torch.multinomial(weights, 1, generator=self.generator))
            chosen.append(i)
            weights[i] = 0.0
        return sorted(chosen)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "probs": self.probs.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.probs = state["probs"].to(torch.float64)


# ============================================================================================= LISA
class LISA(Full):
    """LISA: every K steps, freeze all transformer blocks and unfreeze γ of them drawn uniformly at random; the rest
    of the model (embeddings, final norm, pooler, task head) always trains; AdamW on whatever is unfrozen.

    Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model Fine-Tuning",
    arXiv 2403.17919; reference OptimalScale/LMFlow @ f3597dba134e8bb3d2cfedeaaae6fc7296ace924
    (src/lmflow/pipeline/utils/lisa_trainer.py `DynamicLayerActivationCallback`; arguments in src/lmflow/args.py:
    lisa_activated_layers γ = 2, lisa_interval_steps K = 20).

    As in the reference callback: the blocks are the model's block list (found here as the longest nn.ModuleList,
    or `blocks`), every parameter outside it stays trainable, and the set of γ blocks is drawn at step 0 and after
    every K optimizer steps (numpy.random.choice without replacement there; a seeded torch.Generator here, whose state
    is checkpointed so a resumed run draws the same sets). Full fine-tuning's ΔW = W − W0 is recorded for the target
    layers; nothing is merged.

    The optimizer. The trainable set changes at every draw, so on_step_end asks the loop to rebuild AdamW over the
    new set (bench/train.py `rebuild_optimizer`): the Adam state of the always-trained parameters and of blocks that
    stay active carries over, the state of blocks that become inactive is dropped, and a re-activated block starts
    from fresh moments. This is the memory the paper counts (Adam state for γ blocks only, Algorithm 1); the
    paper's own experiments re-started every K-step period from saved weights, so there *every* state was reset
    (OptimalScale/LMFlow issues #729, #768), while LMFlow's callback builds the optimizer once over all parameters
    and so keeps the moments of an inactive block frozen until it is drawn again. `keep_inactive_state: true`
    reproduces the callback: the state of a deactivated block is set aside (in this method's state_dict) and handed
    back when the block is drawn again.

    Args:
        lr: learning rate (AdamW).
        target_modules: the layers whose ΔW is recorded for analysis.
        gamma: γ, the number of blocks trained at a time.
        interval_steps: K, the optimizer steps between two draws.
        blocks: dotted name of the block list; None finds the longest nn.ModuleList.
        keep_inactive_state: keep the Adam state of deactivated blocks for their next activation (LMFlow's callback)
            instead of dropping it.
    """

    family = "layer selection"

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense"),
                 gamma: int = 2, interval_steps: int = 20, blocks: str | None = None,
                 keep_inactive_state: bool = False) -> None:
        super().__init__(lr=lr, target_modules=target_modules)
        if int(gamma) < 1 or int(interval_steps) < 1:
            raise ValueError(f"need method.gamma >= 1 and method.interval_steps >= 1, got {gamma}, {interval_steps}")
        self.gamma, self.interval_steps = int(gamma), int(interval_steps)
        self.blocks = blocks
        self.keep_inactive_state = bool(keep_inactive_state)
        self.active: list[int] = []
        self._blocks_path = ""
        self._blocks: nn.ModuleList | None = None
        self._sampler: BlockSampler | None = None
        self._stash: dict[str, dict[str, Any]] = {}  # parameter name -> optimizer state of an inactive block

    # ----------------------------------------------------------------------------------------- setup
    def _sampler_seed(self, ctx: WrapContext) -> int:
        return stable_seed(ctx.seed, type(self).__name__.lower())

    def freeze_blocks(self, model: nn.Module, ctx: WrapContext) -> BlockSampler:
        """Everything outside the block list trains (the reference leaves it trainable); every block is frozen."""
        model.requires_grad_(True)
        self._blocks_path, self._blocks = find_blocks(model, ctx.head_modules, self.blocks)
        self._blocks.requires_grad_(False)
        self.active = []
        self._sampler = BlockSampler(len(self._blocks), self.gamma, self._sampler_seed(ctx))
        return self._sampler

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        self.activate(self.freeze_blocks(model, ctx).draw())  # the set of steps 0 .. K-1
        return model

    def activate(self, indices: Iterable[int]) -> None:
        """Freeze every block, then unfreeze the blocks `indices`."""
        assert self._blocks is not None, "wrap() first"
        self.active = sorted(int(i) for i in indices)
        for i, block in enumerate(self._blocks):
            block.requires_grad_(i in self.active)

    def _block_parameters(self, i: int) -> dict[str, nn.Parameter]:
        assert self._blocks is not None
        return {f"{self._blocks_path}.{i}.{n}": p for n, p in self._blocks[i].named_parameters()}

    # ---------------------------------------------------------------------------------- optimisation
    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """After every K-th step, draw a new set of blocks and ask for a new optimizer over it."""
        if (step + 1) % self.interval_steps != 0:
            return False
        assert self._sampler is not None
        before, after = set(self.active), set(self._sampler.draw())
        if self.keep_inactive_state:
            for i in sorted(before - after):  # set aside the state rebuild_optimizer would drop
                for name, p in self._block_parameters(i).items():
                    if p in optimizer.state and optimizer.state[p]:
                        self._stash[name] = optimizer.state[p]
            for i in sorted(after - before):  # hand back a re-activated block's state: rebuild_optimizer copies it
                for name, p in self._block_parameters(i).items():
                    if name in self._stash:
                        optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and k != "step" else v
                                              for k, v in self._stash.pop(name).items()}
        self.activate(after)
        log.debug("%s step %d: active blocks %s", type(self).__name__, step + 1, self.active)
        return True

    # ------------------------------------------------------------------------------------- counts, state
    def expected_trainable(self, model: nn.Module, ctx: WrapContext) -> int:
        """Every parameter outside the block list plus γ blocks: total − L·|block| + γ·|block|."""
        _, blocks = find_blocks(model, ctx.head_modules, self.blocks)
        sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
        total = sum(p.numel() for p in model.parameters())
        if len(set(sizes)) != 1:  # blocks of unequal size: the count depends on which were drawn
            return total - sum(sizes) + sum(sizes[i] for i in self.active)
        return total - sum(sizes) + self.gamma * sizes[0]

    def saved_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """What a checkpoint must hold: the trainable set plus every block (inactive blocks trained earlier)."""
        prefix = self._blocks_path + "."
        return {n: p for n, p in model.named_parameters() if p.requires_grad or n.startswith(prefix)}

    def state_dict(self) -> dict[str, Any]:
        assert self._sampler is not None, "wrap() first"
        return {"active": list(self.active), "sampler": self._sampler.state_dict(), "stash": self._stash}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self._sampler is not None, "wrap() first"
        self._sampler.load_state_dict(state["sampler"])
        self._stash = dict(state.get("stash", {}))
        self.activate(state["active"])


# ============================================================================================ OwLore
def input_feature_norms(model: nn.Module, linears: dict[str, nn.Linear],
                        batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ for every input feature j of every layer in `linears`, over the non-padding tokens of `batches`
    (forward hooks; the model runs in eval mode without gradients). Returns {name: (n,)} in float32 on the CPU."""
    sums = {name: torch.zeros(layer.in_features, dtype=torch.float64) for name, layer in linears.items()}
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().double()  # (B, T, n) or (N, n)
            if mask[0] is not None and x.ndim == 3 and x.shape[:2] == mask[0].shape:
                x = x[mask[0].bool()]  # (N, n): the real tokens
            sums[name] += x.reshape(-1, x.shape[-1]).pow(2).sum(0).cpu()  # (n,)
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in linears.items()]
    was_training, seen = model.training, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                mask[0] = batch.get("attention_mask")
                model(**model_inputs(batch))
                seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("OwLore computes its block probabilities from calibration batches and got none; "
                         "set train.calibration_batches > 0")
    return {name: s.sqrt().float() for name, s in sums.items()}


def outlier_ratio(weights: Sequence[torch.Tensor], norms: Sequence[torch.Tensor], threshold: float) -> float:
    """OWL's layer outlier ratio: the share of the Wanda scores |W_ij|·‖X_j‖₂ of all the block's linears (one pool)
    that exceed `threshold` × their mean. weights[k]: (m_k, n_k); norms[k]: (n_k,)."""
    scores = torch.cat([(w.detach().abs().float().cpu() * x.float().cpu()[None, :]).flatten()
                        for w, x in zip(weights, norms)])  # (Σ m_k·n_k,)
    return float((scores > threshold * scores.mean()).sum()) / scores.numel()


class OwLore(LISA):
    """OwLore: LISA whose γ blocks are drawn with probability p_l ∝ the block's outlier ratio, and whose active
    blocks train through GaLore (W ← W − lr·α·P·Adam(PᵀG), P = top-r singular vectors of G, refreshed every T steps).

    Li et al., "OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection for Memory-Efficient LLM
    Fine-tuning", arXiv 2405.18380; reference pixeli99/OwLore @ e4159735f510a89b641e7f336eb8050bf9f51bed
    (src/lmflow/pipeline/finetuner.py: `DynamicLayerActivationCallback` with prob_mode "owl", the GaLore param groups
    rank 256, update_proj_gap 100, scale 1.0; owlore_scripts/run_owlore_low_rank.sh: γ = 5, K = 50); the outlier
    ratio is OWL's (Yin et al., arXiv 2310.05175; luuyin/OWL @ dddb7a4bffe27c73e4c8cf692b3a5e36401532c8,
    lib/prune_all.py `check_outlier_mean`).

    calibrate() runs the calibration batches through the pre-trained model with forward hooks on every nn.Linear of
    every block and forms, per block l, the Wanda scores A_ij = |W_ij|·‖X_j‖₂ of all its linears pooled together;
    the outlier ratio D_l is the share of scores above M × their mean (M = 13), and p_l = D_l / Σ D. The reference
    reads D from a precomputed file (metric_cache/, LLaMA-2-7B at M = 13); here it is computed on the task's own
    calibration batches, padding tokens left out. If no block has an outlier at M, p is uniform (LISA) and a warning
    is logged. The first draw happens in calibrate(), the later ones every K steps, as LISA. Sampling is
    numpy.random.choice's, γ successive draws without replacement ∝ the remaining p.

    The optimizer is GaLoreAdamW (methods/galore.py): the target layers inside the active blocks (by default every
    linear of a block, as the reference's "attn"/"mlp" selection) are projected with rank r, scale α and refresh
    gap T; the other trainable parameters (embeddings, norms, biases, head) take plain AdamW. The optimizer state is
    handled as LISA's (dropped on deactivation unless keep_inactive_state), so a re-activated block computes a fresh
    projector on its first step; the reference keeps one optimizer over all weights, so there a block's projector
    and moments wait, frozen, for its next activation (keep_inactive_state: true).

    Args:
        lr, target_modules, gamma, interval_steps, blocks, keep_inactive_state: as LISA's.
        outlier_threshold: M, a score is an outlier above M × the block's mean score.
        r: rank of GaLore's projection (capped at min(m, n)).
        alpha: GaLore's scale α of the projected update.
        update_proj_gap: T, steps between GaLore's subspace refreshes.
    """

    def __init__(self, lr: float, target_modules: Sequence[str] = ("query", "key", "value", "dense"),
                 gamma: int = 5, interval_steps: int = 50, blocks: str | None = None,
                 keep_inactive_state: bool = False, outlier_threshold: float = 13.0, r: int = 256,
                 alpha: float = 1.0, update_proj_gap: int = 100) -> None:
        super().__init__(lr=lr, target_modules=target_modules, gamma=gamma, interval_steps=interval_steps,
                         blocks=blocks, keep_inactive_state=keep_inactive_state)
        if not outlier_threshold > 0:
            raise ValueError(f"method.outlier_threshold must be > 0, got {outlier_threshold}")
        if int(r) < 1 or int(update_proj_gap) < 1 or not alpha > 0:
            raise ValueError(f"need method.r >= 1, method.update_proj_gap >= 1, method.alpha > 0; "
                             f"got {r}, {update_proj_gap}, {alpha}")
        self.outlier_threshold = float(outlier_threshold)
        self.r, self.alpha, self.update_proj_gap = int(r), float(alpha), int(update_proj_gap)
        self.outlier_ratios: list[float] = []
        self._targets: list[str] = []

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        self._targets = list(self.target_layers(model, ctx))
        self.freeze_blocks(model, ctx)  # the first draw needs the outlier ratios: calibrate()
        return model

    def calibrate(self, model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn) -> None:
        assert self._blocks is not None and self._sampler is not None, "wrap() first"
        linears = {f"{i}.{n}": m for i, block in enumerate(self._blocks)
                   for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        norms = input_feature_norms(model, linears, batches)
        self.outlier_ratios = []
        for i, block in enumerate(self._blocks):
            names = [k for k in linears if k.split(".", 1)[0] == str(i)]
            if not names:
                raise ValueError(f"block {self._blocks_path}.{i} has no nn.Linear to score outliers on")
            self.outlier_ratios.append(outlier_ratio([linears[k].weight for k in names], [norms[k] for k in names],
                                                     self.outlier_threshold))
        ratios = torch.tensor(self.outlier_ratios, dtype=torch.float64)  # (L,)
        if float(ratios.sum()) == 0:
            log.warning("OwLore: no block has a score above %g x its mean; sampling blocks uniformly",
                        self.outlier_threshold)
        else:
            self._sampler.set_probs(ratios)
        log.info("OwLore outlier ratios %s -> block probabilities %s",
                 [round(d, 6) for d in self.outlier_ratios], [round(float(p), 4) for p in self._sampler.probs])
        self.activate(self._sampler.draw())

    def make_optimizer(self, model: nn.Module, weight_decay: float = 0.0,
                       betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        if not self.active:
            raise RuntimeError("OwLore draws its first blocks in calibrate(); call it before building the optimizer")
        prefixes = tuple(f"{self._blocks_path}.{i}." for i in self.active)
        projected = [model.get_submodule(n).weight for n in self._targets if n.startswith(prefixes)]
        groups = projected_param_groups(self, model, weight_decay, projected,
                                        {"rank": self.r, "scale": self.alpha, "update_proj_gap": self.update_proj_gap})
        return GaLoreAdamW(groups, lr=self.lr, betas=betas, eps=eps)

"""Adapter merging: one adapter per member task, merged into one model that is scored on every member.

A merge cell (`task=merge/<name>`, conf/task/merge/) names its members (ordinary task options, e.g. glue/sst2);
bench/merge.py trains each member as its own cell (or reuses the completed record of that cell key), turns every
member into a task vector τ_t = θ_t − θ_0 over the backbone's parameters, merges the vectors with one of MERGERS,
and scores θ_0 + τ_merged with each member's own trained head on that member's eval split. Heads are never merged:
the tasks' label spaces differ (as in Ilharco et al., arXiv 2212.04089, where each task keeps its classifier).

The mergers work on the task vectors, so they apply to every mergeable method alike (its recorded ΔW plus any
backbone tensor it trained in full), and a merge table compares fine-tuning methods by how well their adapters
merge. Averaging, task arithmetic, TIES and DARE are PEFT's own tensor merges (peft.utils.merge_utils, which
`add_weighted_adapter` applies to ΔW in its `*_svd` modes), applied per tensor; LoRA-LEGO is lora_lego() below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

#: The merge algorithms a merge task offers (task.merger), each with its paper.
MERGERS: dict[str, str] = {
    "average": "the mean of the task vectors (model soups / Fisher-free averaging; arXiv 2203.05482)",
    "task_arithmetic": "λ·Σ τ_t (Ilharco et al., arXiv 2212.04089)",
    "ties": "trim to the top-density magnitudes, elect a sign per entry, mean of the agreeing entries, times λ "
            "(Yadav et al., arXiv 2306.01708)",
    "dare_linear": "drop entries at random with probability 1 − density, rescale by 1/density, then task arithmetic "
                   "(Yu et al., arXiv 2311.03099)",
    "dare_ties": "DARE's random drop and rescale, then TIES's sign election and disjoint mean (arXiv 2311.03099)",
    "lora_lego": "rank-wise units of every member pooled and clustered by k-means, the centroids a new low-rank "
                 "update, rescaled (Zhao et al., arXiv 2409.16167; see lora_lego for the details it leaves open)",
}
#: Each merger's scale λ and density when the task leaves them null: the papers' settings for merging without a
#: validation set (TIES §5: λ = 0.4 for task arithmetic, λ = 1 with the top 20% for TIES; DARE: drop 90%).
DEFAULTS: dict[str, dict[str, float | None]] = {
    "average": {"scale": None, "density": None},
    "task_arithmetic": {"scale": 0.4, "density": None},
    "ties": {"scale": 1.0, "density": 0.2},
    "dare_linear": {"scale": 0.4, "density": 0.1},
    "dare_ties": {"scale": 1.0, "density": 0.1},
    "lora_lego": {"scale": None, "density": None},
}

TaskVector = dict[str, Tensor]  # backbone parameter name -> θ_t − θ_0 (the parameter's shape)
Factors = dict[str, tuple[Tensor, Tensor]]  # adapted layer -> (B (m, r), A (r, n)) with ΔW = B A


def task_key_overrides(keys: dict[str, Any]) -> list[str]:
    """`task.<key>=<value>` overrides of a composite task's keys that belong to its member tasks (an experiment's
    task.max_train_samples, say), in Hydra's override syntax."""
    return [f"task.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in sorted(keys.items())]


class MergeTask:
    """A merge of adapters trained on `members`, scored on each member (see the module docstring).

    Args:
        members: task options of the member tasks (e.g. [glue/sst2, glue/mrpc, glue/rte]); at least two.
        merger: a key of MERGERS.
        scale: λ of task arithmetic, TIES and DARE (null: the merger's default, DEFAULTS). Averaging has no λ.
        density: the fraction of entries TIES keeps (by magnitude) and DARE keeps (at random); null: DEFAULTS.
        sign: TIES's sign election: "total" (the sign of the summed entries) or "frequency" (the majority).
        clusters: LoRA-LEGO's k, the merged rank per layer (null: the largest member rank of the layer).
        member_overrides: overrides every member cell gets on top of the merge cell's own (e.g.
            ["task.max_train_samples=2000"]); a member cell is an ordinary cell whose record a plain run reuses.
        **member_keys: any other task key (an experiment's task.max_train_samples, say) is a key of the members'
            tasks: every member gets it as `task.<key>=<value>`.
    """

    name = "merge"
    suite = None

    def __init__(self, members: Sequence[str], merger: str = "ties", scale: float | None = None,
                 density: float | None = None, sign: Literal["total", "frequency"] = "total",
                 clusters: int | None = None, member_overrides: Sequence[str] = (), **member_keys: Any) -> None:
        members = [str(m) for m in members]
        if len(members) < 2 or len(set(members)) != len(members):
            raise ValueError(f"task.members must name at least two different tasks, got {members}")
        if any(m.startswith("merge/") for m in members):
            raise ValueError(f"task.members are the tasks whose adapters are merged, not merges: {members}")
        if merger not in MERGERS:
            raise ValueError(f"unknown task.merger={merger!r}; choose from {', '.join(MERGERS)}")
        if merger == "lora_lego" and scale is not None:
            raise ValueError("task.merger=lora_lego sets its scale by its own reweighting; set task.scale=null")
        if merger == "average" and scale is not None:
            raise ValueError("task.merger=average weights every member 1/T; set task.scale=null, or use "
                             "task.merger=task_arithmetic to choose λ")
        if sign not in ("total", "frequency"):
            raise ValueError(f"task.sign must be total or frequency, got {sign!r}")
        if clusters is not None and merger != "lora_lego":
            raise ValueError(f"task.clusters is LoRA-LEGO's k; task.merger={merger} has none (set task.clusters=null)")
        self.members, self.merger, self.sign = members, merger, sign
        self.scale = DEFAULTS[merger]["scale"] if scale is None else float(scale)
        self.density = DEFAULTS[merger]["density"] if density is None else float(density)
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"task.density must be in (0, 1], got {self.density}")
        if self.density is not None and merger not in ("ties", "dare_linear", "dare_ties"):
            raise ValueError(f"task.density is TIES's and DARE's; task.merger={merger} has none "
                             "(set task.density=null)")
        self.clusters = None if clusters is None else int(clusters)
        self.member_overrides = [str(o) for o in member_overrides] + task_key_overrides(member_keys)

    def settings(self) -> dict[str, Any]:
        """What the record says of the merge (the values in effect, defaults filled in)."""
        return {"merger": self.merger, "members": list(self.members), "scale": self.scale, "density": self.density,
                "sign": self.sign if self.merger in ("ties", "dare_ties") else None, "clusters": self.clusters,
                "description": MERGERS[self.merger]}

    def merge(self, vectors: Sequence[TaskVector], factors: Sequence[Factors] | None = None,
              seed: int = 0) -> tuple[TaskVector, dict[str, Any]]:
        """The merged task vector, and what the merge reports (LoRA-LEGO's ranks; empty for the others)."""
        if self.merger == "lora_lego":
            if factors is None:
                raise ValueError("lora_lego needs each member's low-rank factors")
            return lora_lego(vectors, factors, self.clusters, seed)
        return merge_tensors(vectors, self.merger, self.scale, self.density, self.sign, seed), {}


def merge_tensors(vectors: Sequence[TaskVector], merger: str, scale: float | None, density: float | None,
                  sign: str = "total", seed: int = 0) -> TaskVector:
    """Merge task vectors tensor by tensor with PEFT's merge functions; a tensor a member did not train is 0 there.

    DARE draws its random masks from a generator seeded with `seed`, so a merge cell is reproducible.
    """
    from peft.utils import merge_utils  # PEFT's imports take seconds: only a merge pays for them

    names = sorted(set().union(*vectors))
    t = len(vectors)
    merged: TaskVector = {}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # peft's random_pruning draws from the global generator
    try:
        for name in names:
            ref = next(v[name] for v in vectors if name in v)
            tensors = [v.get(name, torch.zeros_like(ref)).float() for v in vectors]
            if merger == "average":
                merged[name] = merge_utils.task_arithmetic(tensors, torch.full((t,), 1.0 / t))
            elif merger == "task_arithmetic":
                merged[name] = merge_utils.task_arithmetic(tensors, torch.full((t,), float(scale)))
            elif merger == "ties":
                merged[name] = merge_utils.ties(tensors, torch.full((t,), float(scale)), float(density), sign)
            elif merger == "dare_linear":
                merged[name] = merge_utils.dare_linear(tensors, torch.full((t,), float(scale)), float(density))
            elif merger == "dare_ties":
                merged[name] = merge_utils.dare_ties(tensors, torch.full((t,), float(scale)), float(density), sign)
            else:
                raise ValueError(f"merge_tensors does not do {merger!r}")
    finally:
        torch.random.set_rng_state(state)
    return merged


@dataclass(frozen=True)
class LegoLayer:
    """One layer's LoRA-LEGO result: the merged factors and how many units went in."""

    b: Tensor  # (m, k)
    a: Tensor  # (k, n)
    units: int


#: LoRA-LEGO factors a layer without saved LoRA factors by SVD; beyond this many units per member it refuses
#: (a full-rank ΔW is not a low-rank adapter, and k-means over hundreds of units per layer is not what LEGO is)
LEGO_MAX_UNITS = 64
LEGO_ITERATIONS = 100


def kmeans(points: Tensor, k: int, generator: torch.Generator, iterations: int = LEGO_ITERATIONS) -> Tensor:
    """Lloyd's k-means with k-means++ seeding (squared Euclidean); returns each point's cluster, (N,) in [0, k)."""
    n = points.shape[0]
    centres = points[torch.randint(n, (1,), generator=generator)]  # (1, D)
    for _ in range(1, k):  # k-means++: the next centre drawn with probability ∝ D² to the nearest chosen one
        d2 = torch.cdist(points, centres).min(dim=1).values ** 2  # (N,)
        pick = torch.multinomial(d2, 1, generator=generator) if d2.sum() > 0 else torch.randint(n, (1,), generator=generator)
        centres = torch.cat([centres, points[pick]])
    assign = torch.cdist(points, centres).argmin(dim=1)  # (N,)
    for _ in range(iterations):
        for c in range(k):
            inside = assign == c
            if inside.any():
                centres[c] = points[inside].mean(dim=0)
            else:  # an empty cluster restarts at the point farthest from its centre
                far = (points - centres[assign]).norm(dim=1).argmax()
                centres[c], assign[far] = points[far], c
        new = torch.cdist(points, centres).argmin(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def balanced_units(b: Tensor, a: Tensor) -> Tensor:
    """The rank-one units of ΔW = B A as vectors [a_i; b_i], (r, n + m), each split so that ‖a_i‖ = ‖b_i‖: b_i a_iᵀ
    is unchanged, and where a LoRA keeps its scale (α/r in B or in A) no longer moves the clustering."""
    nb, na = b.norm(dim=0), a.norm(dim=1)  # (r,), (r,)
    ratio = torch.where((nb > 0) & (na > 0), (nb / na.clamp_min(1e-30)).sqrt(), torch.ones_like(nb))
    return torch.cat([a * ratio[:, None], (b / ratio).T], dim=1)


def svd_factors(delta: Tensor, max_units: int) -> tuple[Tensor, Tensor]:
    """B (m, q), A (q, n) of a ΔW at its numerical rank q (σ_i > 1e-6·σ_1), for a layer with no saved LoRA factors."""
    u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    q = max(1, int((sv > 1e-6 * sv[0]).sum())) if sv[0] > 0 else 1
    if q > max_units:
        raise ValueError(f"lora_lego merges low-rank adapters; this ΔW has rank {q} > {max_units} (a full-rank "
                         "method such as full fine-tuning): choose another task.merger")
    root = sv[:q].sqrt()
    return (u[:, :q] * root).float(), (root[:, None] * vh[:q]).float()


def lego_layer(members: Sequence[tuple[Tensor, Tensor]], k: int | None, generator: torch.Generator) -> LegoLayer:
    """LoRA-LEGO on one layer: pool every member's units, k-means them into k clusters, take each centroid as a
    unit of the merged update, rescale each centroid to its cluster's mean norm (parameter reweighting: a mean of
    unaligned vectors is shorter than they are), and the whole update by √(r/k) (output reweighting: k units sum
    k/r times the variance of a rank-r update), r the members' mean rank."""
    units = torch.cat([balanced_units(b, a) for b, a in members])  # (N, n + m)
    ranks = [b.shape[1] for b, _ in members]
    k = min(max(ranks) if k is None else int(k), units.shape[0])
    n = members[0][1].shape[1]
    assign = kmeans(units.double(), k, generator)
    centroids = []
    for c in range(k):
        inside = units[assign == c].double()  # (N_c, n + m)
        mu = inside.mean(dim=0)
        norm = mu.norm()
        centroids.append(mu * inside.norm(dim=1).mean() / norm if norm > 0 else mu)
    cents = torch.stack(centroids)  # (k, n + m)
    output = (sum(ranks) / len(ranks) / k) ** 0.5  # √(r/k), on B' alone: it scales the update once
    return LegoLayer(b=(cents[:, n:].T * output).float(), a=cents[:, :n].float(), units=units.shape[0])


def lora_lego(vectors: Sequence[TaskVector], factors: Sequence[Factors], clusters: int | None,
              seed: int = 0) -> tuple[TaskVector, dict[str, Any]]:
    """LoRA-LEGO (Zhao et al., ICLR 2025, arXiv 2409.16167; no reference code has been released): every adapted
    layer is merged by lego_layer() from the members' saved LoRA factors (or, for a method that saves none, the
    SVD factors of its ΔW); a tensor that is not a matrix (a bias or norm a method trained) is averaged.

    The text available to us fixes the framework (rank-wise units pooled across LoRAs, k-means into k clusters,
    centroids as the merged rank-k LoRA, then a parameter and an output reweighting); the details it leaves open
    are chosen here and named: units balanced between their halves, k-means++ seeding with `seed`, the ℓ2 norm for
    the parameter reweighting and √(r/k) for the output reweighting, k = the members' largest rank by default.
    """
    generator = torch.Generator().manual_seed(int(seed))
    merged: TaskVector = {}
    ranks: dict[str, int] = {}
    sources = {"lora factors": 0, "svd of ΔW": 0}
    names = sorted(set().union(*vectors))
    for name in names:
        present = [(v[name], f) for v, f in zip(vectors, factors) if name in v]
        layer = name.removesuffix(".weight")
        if present[0][0].ndim != 2 or not name.endswith(".weight"):
            merged[name] = sum(t.float() for t, _ in present) / len(vectors)  # a bias, a norm: averaged
            continue
        pairs = []
        for tensor, f in present:
            if layer in f:
                pairs.append(f[layer])
                sources["lora factors"] += 1
            else:
                pairs.append(svd_factors(tensor.float(), LEGO_MAX_UNITS))
                sources["svd of ΔW"] += 1
        result = lego_layer(pairs, clusters, generator)
        merged[name] = (result.b.double() @ result.a.double()).float()  # (m, n)
        ranks[layer] = result.b.shape[1]
    return merged, {"lego_rank_total": sum(ranks.values()), "lego_units_from": sources}

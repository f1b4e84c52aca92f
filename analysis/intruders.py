"""Intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
arXiv 2410.21228): new high-ranking singular directions of a fine-tuned weight that the pre-trained weight lacks.

Definition. Take the SVD of the pre-trained W0 and of the merged W = W0 + ΔW (both from fp32 weights). A left
singular vector u_i of W among its top k (by singular value; default k = 10) is an *intruder* when its largest
absolute cosine similarity with every left singular vector of W0 is below ε (default 0.5):

    intruder(i)  ⇔  max_j |⟨u_i(W), u_j(W0)⟩| < ε,     i ≤ k,  j ≤ min(m, n).

Computation. W0 needs its full thin left basis (all min(m, n) vectors); it is decomposed once per (base model,
layer) and cached (``analysis.weights.base_svd``). W needs only its top k triplets: ``top_singular`` takes them
from the eigendecomposition of W's smaller Gram matrix (WᵀW or WWᵀ, formed in float64 from the fp32 W, so the
squared condition number costs nothing at the top of the spectrum), then recovers the other side as W·v/σ. It
is deterministic and as accurate as an fp32 SVD for the top vectors (randomised range finders such as
``torch.svd_lowrank`` are not: pre-trained spectra decay slowly and neighbouring singular values of W differ by
~1e-3 of σ_1, so their top vectors come out rotated). ``exact=True`` uses a full ``torch.linalg.svd`` of W
instead: the reference the tests and the benchmark compare with.

Mitigation (the paper's §6, PEFT's ``reduce_intruder_dimension``): scale the intruder components of W by λ,

    W_λ = W + (λ − 1) · Σ_{i ∈ intruders} σ_i u_i v_iᵀ,

so λ = 1 is the fine-tuned model and λ = 0 removes the intruder directions. ``mitigation_frame`` traces the
trade-off between the task score and forgetting (a zero-shot STS-B probe of the encoder) over λ.

    count_intruders(w0, w, k=10, eps=0.5)                 # -> int
    frame = intruder_frame("results")                     # run × layer × ε
    mitigation_frame(Path("results/runs/<id>"))           # λ × (score, STS-B Spearman, forgetting)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor, nn

from analysis import plots
from analysis.spectral import layer_block, record_columns
from analysis.weights import (
    as_matrix,
    base_svd,
    fresh_base_model,
    load_adapter,
    load_base_model,
    load_base_weights,
    load_deltas,
    load_record,
    records_with_deltas,
)

__all__ = [
    "EPS_GRID",
    "LAMBDAS",
    "TopSingular",
    "count_intruders",
    "count_intruders_grid",
    "figure_intruders_vs_eps",
    "figure_intruders_vs_rank",
    "figure_mitigation",
    "intruder_components",
    "intruder_frame",
    "intruder_similarities",
    "intruder_totals",
    "mitigate",
    "mitigation_frame",
    "plot_intruders_vs_eps",
    "plot_intruders_vs_rank",
    "plot_mitigation",
    "rebuild_finetuned",
    "sts_probe",
    "top_singular",
]

#: The ε grid of ``intruder_frame`` and the ε-curves.
EPS_GRID: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: The λ grid of ``mitigation_frame``.
LAMBDAS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.0)
#: Columns of ``intruder_frame``.
COLUMNS = ["id", "method", "label", "r", "seed", "task", "model", "layer", "block", "m", "n", "k", "eps", "intruders"]
#: ``top_singular`` falls back to a full SVD when σ_k / σ_1 is below this (the Gram matrix squares the condition
#: number: in float64, vectors with σ ≥ 1e-5·σ_1 still come out to ~1e-6).
GRAM_RTOL = 1e-5
#: Rows of the STS-B dev set scored by the forgetting probe, and the seed that picks them.
PROBE_ROWS = 500
#: The ε-curves switch to a symlog y axis when the largest total exceeds SYMLOG_ABOVE and SYMLOG_RATIO times the
#: smallest curve's maximum (curves decades apart).
SYMLOG_ABOVE = 30
SYMLOG_RATIO = 15
PROBE_SEED = 0


# ---------------------------------------------------------------------------------------------- SVD


@dataclass(frozen=True)
class TopSingular:
    """The top singular triplets of a matrix W (m, n), by decreasing singular value.

    Attributes:
        u: (m, k) left singular vectors.
        s: (k,) singular values.
        v: (n, k) right singular vectors (columns).
    """

    u: Tensor
    s: Tensor
    v: Tensor

    def select(self, index: Tensor) -> TopSingular:
        """The triplets at ``index`` (a 1-D index or boolean mask over the k triplets)."""
        return TopSingular(u=self.u[:, index], s=self.s[index], v=self.v[:, index])

    def product(self) -> Tensor:
        """Σ_i σ_i u_i v_iᵀ, (m, n)."""
        return (self.u * self.s) @ self.v.T  # (m, k) @ (k, n)


def top_singular(w: Tensor, k: int, exact: bool = False) -> TopSingular:
    """The top-k singular triplets of W (fp32 result), k clipped to min(m, n).

    Fast path: eigh of the smaller Gram matrix in float64 (WᵀW when m ≥ n, else WWᵀ) for one side, W·v/σ (or
    Wᵀ·u/σ) for the other. Falls back to a full SVD when σ_k < ``GRAM_RTOL``·σ_1 (a numerically rank-deficient
    top-k, where W·v/σ is inaccurate). ``exact=True``: a full fp32 ``torch.linalg.svd`` of W.
    """
    w = as_matrix(w).float()  # (m, n)
    m, n = w.shape
    k = min(int(k), m, n)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not exact:
        wd = w.double()  # (m, n)
        tall = m >= n
        gram = wd.T @ wd if tall else wd @ wd.T  # (n, n) or (m, m)
        evals, evecs = torch.linalg.eigh(gram)  # ascending
        s = evals[-k:].flip(0).clamp_min(0).sqrt()  # (k,)
        side = evecs[:, -k:].flip(1)  # (n, k) right vectors if tall, else (m, k) left vectors
        if s[0] > 0 and s[-1] >= GRAM_RTOL * s[0]:
            if tall:
                v, u = side, (wd @ side) / s  # (n, k), (m, k)
            else:
                u, v = side, (wd.T @ side) / s  # (m, k), (n, k)
            return TopSingular(u=u.float(), s=s.float(), v=v.float())
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (m, p), (p,), (p, n)
    return TopSingular(u=u[:, :k], s=s[:k], v=vh[:k].T)


def _base_left(w0: Tensor | None, base_u: Tensor | None) -> Tensor:
    """W0's left singular vectors (m, p): ``base_u`` when given (cached), else a full SVD of ``w0``."""
    if base_u is not None:
        return base_u.float()
    if w0 is None:
        raise ValueError("give w0 or its left singular vectors base_u")
    return torch.linalg.svd(as_matrix(w0).float(), full_matrices=False)[0]  # (m, p)


def intruder_similarities(w0: Tensor | None, w: Tensor, k: int = 10, *, base_u: Tensor | None = None,
                          exact: bool = False, top: TopSingular | None = None) -> Tensor:
    """max_j |cos(u_i(W), u_j(W0))| for each of W's top-k left singular vectors, (k,), in singular-value order.

    Args:
        w0: the pre-trained weight (m, n); unused when ``base_u`` is given.
        w: the fine-tuned weight W0 + ΔW (m, n).
        k: how many top singular vectors of W to test.
        base_u: W0's left singular vectors (m, p), e.g. from the cache ``analysis.weights.base_svd``.
        exact: full SVD of W instead of the Gram fast path.
        top: W's top triplets when already computed.
    """
    u0 = _base_left(w0, base_u)  # (m, p)
    top = top if top is not None else top_singular(w, k, exact=exact)
    return (top.u.T @ u0).abs().amax(dim=1)  # (k, p) -> (k,)


def count_intruders(w0: Tensor | None, w: Tensor, k: int = 10, eps: float = 0.5, *,
                    base_u: Tensor | None = None, exact: bool = False) -> int:
    """Intruder dimensions of W = W0 + ΔW among its top k: left singular vectors whose max |cos| with every
    left singular vector of W0 is below ``eps``."""
    return int((intruder_similarities(w0, w, k, base_u=base_u, exact=exact) < eps).sum())


def count_intruders_grid(w0: Tensor | None, w: Tensor, k: int = 10, eps: Sequence[float] = EPS_GRID, *,
                         base_u: Tensor | None = None, exact: bool = False) -> np.ndarray:
    """``count_intruders`` for every ε of ``eps`` from one decomposition: an int array shaped like ``eps``
    (non-decreasing in ε)."""
    sims = intruder_similarities(w0, w, k, base_u=base_u, exact=exact)  # (k,)
    grid = torch.as_tensor(np.asarray(eps, dtype=np.float64)).float()  # (E,)
    return (sims[None, :] < grid[:, None]).sum(dim=1).numpy()  # (E, k) -> (E,)


def intruder_components(w0: Tensor | None, w: Tensor, k: int = 10, eps: float = 0.5, *,
                        base_u: Tensor | None = None, exact: bool = False) -> TopSingular:
    """The intruder triplets (u_i, σ_i, v_i) of W: those of its top k flagged at threshold ``eps``."""
    top = top_singular(w, k, exact=exact)
    sims = intruder_similarities(w0, w, k, base_u=base_u, top=top)  # (k,)
    return top.select(sims < eps)


def mitigate(w0: Tensor | None, w: Tensor, lam: float, k: int = 10, eps: float = 0.5, *,
             base_u: Tensor | None = None, exact: bool = False) -> Tensor:
    """W_λ = W + (λ − 1)·Σ_{i ∈ intruders} σ_i u_i v_iᵀ: the intruder components of W scaled by λ.

    λ = 1 returns W; λ = 0 removes the intruder directions. The result has W's shape and dtype.
    """
    intruders = intruder_components(w0, w, k, eps, base_u=base_u, exact=exact)
    if intruders.s.numel() == 0 or lam == 1:
        return w.clone()
    update = (lam - 1.0) * intruders.product()  # (m, n)
    return (as_matrix(w).float() + update).reshape(w.shape).to(w.dtype)


# ---------------------------------------------------------------------------------------------- frames

_FRAMES: dict[tuple[Any, ...], pd.DataFrame] = {}  # memo of intruder_frame: (dir, k, eps, files) -> frame


def _fingerprint(pairs: Iterable[tuple[Mapping[str, Any], Path]]) -> tuple[tuple[str, float], ...]:
    """(run id, ΔW file mtime) of each run: a change of any ΔW invalidates the memo."""
    out = []
    for record, run_dir in pairs:
        delta = run_dir / str((record.get("artifacts") or {}).get("delta") or "delta.safetensors")
        out.append((str(record["id"]), delta.stat().st_mtime))
    return tuple(out)


def intruder_frame(results_dir: Path | str, k: int = 10, eps: Sequence[float] = EPS_GRID) -> pd.DataFrame:
    """Intruder counts of every completed run with a ΔW: one row per run × layer × ε.

    Columns: id, method, label, r (config.method.r when present), seed, task, model, layer, block, m, n, k,
    eps, intruders. Runs without a ΔW file are skipped with a warning (``MissingDeltaError`` when none has one).
    The result is memoised in-process per (results dir, k, ε grid, ΔW files), so the two intruder figures share
    one computation.
    """
    eps = tuple(sorted(float(e) for e in eps))
    pairs = records_with_deltas(results_dir)
    key = (str(Path(results_dir).resolve()), int(k), eps, _fingerprint(pairs))
    if key in _FRAMES:
        return _FRAMES[key].copy()
    rows: list[dict[str, Any]] = []
    for record, run_dir in pairs:
        deltas = load_deltas(run_dir)
        w0 = load_base_weights(record, deltas)
        head = record_columns(record)
        for name, delta in deltas.items():
            w = as_matrix(w0[name]) + as_matrix(delta)  # (m, n)
            counts = count_intruders_grid(None, w, k, eps, base_u=base_svd(record, name).u)  # (E,)
            for e, c in zip(eps, counts):
                rows.append({**head, "layer": name, "block": layer_block(name), "m": w.shape[0],
                             "n": w.shape[1], "k": int(k), "eps": e, "intruders": int(c)})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["r"] = frame["r"].astype("Int64")
    frame["block"] = frame["block"].astype("Int64")
    _FRAMES[key] = frame
    return frame.copy()


def intruder_totals(frame: pd.DataFrame) -> pd.DataFrame:
    """Per run × ε: intruders summed over the run's layers (``intruders``) and the number of layers."""
    keys = ["id", "method", "label", "r", "seed", "task", "model", "k", "eps"]
    totals = frame.groupby(keys, dropna=False, sort=True).agg(intruders=("intruders", "sum"),
                                                             layers=("layer", "nunique"))
    return totals.reset_index()


# ---------------------------------------------------------------------------------------------- mitigation


def _plain_name(key: str) -> str | None:
    """An adapter-file key as a parameter name of the plain model, or None for PEFT's frozen copy of a head.

    ``base_model.model.classifier.modules_to_save.default.weight`` → ``classifier.weight``;
    ``classifier.weight`` (full fine-tuning) is already plain.
    """
    if ".original_module." in key:
        return None
    return key.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")


def rebuild_finetuned(
    record: Mapping[str, Any], run_dir: Path | str
) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]]:
    """The fine-tuned classifier of a run, rebuilt from its base model, ΔW and saved trainable tensors.

    Starts from a copy of the base model (``analysis.weights.fresh_base_model``), loads every tensor of
    ``adapter.safetensors`` that names a parameter of the plain model (the task head for PEFT methods, found by
    suffix: ``...classifier.modules_to_save.default.weight`` → ``classifier.weight``; every parameter for full
    fine-tuning, whose trainable set is the whole model), and sets each recorded layer's weight to W0 + ΔW.
    Adapter-internal tensors of a recorded layer (``lora_A``, ``lora_B``, DoRA's magnitude) are accounted for
    by its ΔW. Raises ``ValueError`` when the adapter holds a tensor that is neither (the run cannot be
    rebuilt from ΔW) or lacks a head parameter.

    Returns (``LoadedModel`` with the fine-tuned weights, {layer: W0}, {layer: W0 + ΔW}).
    """
    run_dir = Path(run_dir)
    deltas = load_deltas(run_dir)
    w0 = load_base_weights(record, deltas)
    adapter = load_adapter(run_dir)
    loaded = fresh_base_model(record)
    model = loaded.model
    params = dict(model.named_parameters())
    loaded_names: set[str] = set()
    unexplained: list[str] = []
    with torch.no_grad():
        for key, tensor in adapter.items():
            name = _plain_name(key)
            if name is None:
                continue
            if name in params:
                params[name].copy_(tensor.to(params[name].dtype))
                loaded_names.add(name)
            elif not any(name.startswith(layer + ".") for layer in deltas):
                unexplained.append(key)
        if unexplained:
            raise ValueError(
                f"run {record.get('id')}: adapter tensors {unexplained[:4]} are neither parameters of the plain "
                f"model nor part of a layer with a recorded ΔW; the fine-tuned model cannot be rebuilt from ΔW"
            )
        head = [f"{h}.{p}" for h in loaded.head_modules for p, _ in model.get_submodule(h).named_parameters()]
        missing = [p for p in head if p not in loaded_names]
        if missing:
            raise ValueError(f"run {record.get('id')}: the trained task head {missing} is not in its adapter file")
        merged = {}
        for name, delta in deltas.items():
            weight = model.get_submodule(name).weight
            merged[name] = (w0[name] + delta).reshape(weight.shape)  # (m, n)
            weight.copy_(merged[name])
    return loaded, w0, merged


@torch.no_grad()
def sts_probe(model: nn.Module, tokenizer: Any, rows: Sequence[Any], batch_size: int = 64,
              max_length: int = 128) -> float:
    """Zero-shot STS: Spearman correlation between the cosine similarity of the two sentences' mean-pooled
    last-layer embeddings (the encoder ``model.base_model``, attention-masked mean) and the gold scores."""
    encoder = model.base_model
    encoder.eval()

    def embed(texts: list[str]) -> Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i : i + batch_size], truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt")
            hidden = encoder(**batch).last_hidden_state  # (B, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))  # (B, H)
        return torch.cat(out)  # (N, H)

    a = embed([r.text_a for r in rows])  # (N, H)
    b = embed([r.text_b for r in rows])  # (N, H)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)  # (N,)
    gold = np.array([float(r.label) for r in rows])
    return float(stats.spearmanr(cosine.numpy(), gold).statistic)


def _probe_rows(n: int = PROBE_ROWS) -> list[Any]:
    from tasks.base import subset
    from tasks.glue_data import load_offline

    return subset(load_offline("stsb", "eval"), n, PROBE_SEED)


def _task_scorer(record: Mapping[str, Any], tokenizer: Any, max_eval_samples: int | None) -> tuple[Any, Any]:
    """(task, score function) with the task's own eval split, collate and evaluate(), on the CPU in fp32."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    config = record["config"]
    task_cfg = dict(config["task"])
    if max_eval_samples is not None:
        task_cfg["max_eval_samples"] = int(max_eval_samples)
    task = instantiate(OmegaConf.create(task_cfg), _convert_="all")
    rows = sorted(task.examples("eval"), key=task.length)
    batch_size = int((config.get("train") or {}).get("eval_batch_size") or 64)
    loader = DataLoader(rows, batch_size=batch_size, collate_fn=task.collate_fn(tokenizer))

    def score(model: nn.Module) -> dict[str, float]:
        return task.evaluate(model, loader, torch.device("cpu"), None)

    return task, score


def mitigation_frame(record: Mapping[str, Any] | Path | str, lambdas: Sequence[float] = LAMBDAS, k: int = 10,
                     eps: float = 0.5, *, run_dir: Path | str | None = None, probe_rows: int = PROBE_ROWS,
                     max_eval_samples: int | None = None) -> pd.DataFrame:
    """Task score and forgetting of one run as its intruder dimensions are scaled by each λ.

    The fine-tuned classifier is rebuilt from the base model, ΔW and the trained head (``rebuild_finetuned``);
    for each λ every recorded layer's weight becomes W_λ (``mitigate``) and the model is scored with the task's
    own ``evaluate()`` on its eval split (CPU, fp32; the λ = 1 row reproduces the recorded score, given as
    ``score_recorded``, up to the recorded run's device and precision). Full fine-tuning is rebuilt exactly too:
    its adapter file holds every trained parameter, and only the recorded layers are mitigated.

    Forgetting probe: all-MiniLM-L6-v2 is a sentence-embedding model, trained contrastively so that the cosine
    of mean-pooled embeddings tracks semantic similarity. That ability is not used by the fine-tuning task (a
    classifier head on top of the encoder) and nothing in fine-tuning preserves it, so its decline measures how
    much of the pre-trained encoder's knowledge the update destroyed. The probe is zero-shot STS-B: Spearman ρ
    between the embeddings' cosine and the gold similarity on a fixed subset of ``probe_rows`` STS-B dev rows
    (seed 0), for the pre-trained encoder (``sts_spearman_base``) and each W_λ; ``forgetting`` is the drop,
    base − W_λ. (When the task itself is STS-B the probe is no longer zero-shot; for a randomly initialised
    model such as ``tiny_bert`` it is near 0 and only exercises the code.)

    Args:
        record: a record (with ``run_dir``) or a run directory.
        lambdas: the scales of the intruder components (1 = fine-tuned, 0 = removed).
        k, eps: the intruder definition (top k of W, threshold ε).
        run_dir: the run's directory when ``record`` is a record.
        probe_rows: STS-B dev rows of the probe.
        max_eval_samples: score a subset of the task's eval split (None: the split the run was scored on).

    Columns: id, method, label, r, seed, task, model, lam, k, eps, intruders (total at ε), main_metric, score,
    score_recorded, sts_spearman, sts_spearman_base, forgetting.
    """
    if isinstance(record, (str, Path)):
        run_dir = Path(record)
        record = load_record(run_dir)
    elif run_dir is None:
        raise ValueError("mitigation_frame(record) needs run_dir=<results>/runs/<id> (or pass the run directory)")
    run_dir = Path(run_dir)
    loaded, w0, merged = rebuild_finetuned(record, run_dir)
    model = loaded.model.eval()
    components = {name: intruder_components(None, w, k, eps, base_u=base_svd(record, name).u)
                  for name, w in merged.items()}
    n_intruders = sum(int(c.s.numel()) for c in components.values())
    _, score = _task_scorer(record, loaded.tokenizer, max_eval_samples)
    rows_sts = _probe_rows(probe_rows)
    base = load_base_model(record)
    sts_base = sts_probe(base.model, base.tokenizer, rows_sts)
    main_metric = str(record.get("main_metric") or "")
    recorded = (record.get("metrics") or {}).get(main_metric)
    head = record_columns(record)
    rows: list[dict[str, Any]] = []
    for lam in lambdas:
        with torch.no_grad():
            for name, w in merged.items():
                c = components[name]
                w_lam = w if c.s.numel() == 0 or lam == 1 else w + (lam - 1.0) * c.product().reshape(w.shape)
                model.get_submodule(name).weight.copy_(w_lam)
        metrics = score(model)
        sts = sts_probe(model, loaded.tokenizer, rows_sts)
        rows.append({**head, "lam": float(lam), "k": int(k), "eps": float(eps), "intruders": n_intruders,
                     "main_metric": main_metric, "score": metrics.get(main_metric, math.nan),
                     "score_recorded": float(recorded) if isinstance(recorded, (int, float)) else math.nan,
                     "sts_spearman": sts, "sts_spearman_base": sts_base, "forgetting": sts_base - sts})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- figures


def _panels(frame: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    return [((str(m), str(t)), g) for (m, t), g in frame.groupby(["model", "task"], sort=True)]


def _title(model: str, task: str, several_models: bool) -> str:
    title = plots.task_label(task)
    return f"{title} · {model}" if several_models else title


def _at_eps(frame: pd.DataFrame, eps: float) -> pd.DataFrame:
    """Totals per run at the grid value nearest ``eps`` (error if the grid lacks it)."""
    totals = intruder_totals(frame)
    grid = np.array(sorted(totals["eps"].unique()))
    nearest = grid[np.argmin(np.abs(grid - eps))]
    if abs(nearest - eps) > 1e-9:
        raise ValueError(f"ε = {eps} is not in the frame's grid {grid.tolist()}")
    return totals[np.isclose(totals["eps"], nearest)]


def _figure_legend(fig: Any, axes: Sequence[Any], ncols: int | None = None) -> None:
    """One legend below the panels with every label of every panel, once (never over the data); 2 columns,
    3 for more than 6 entries, unless ``ncols`` says otherwise."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    ncols = ncols or (3 if len(handles) > 6 else 2)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncols=max(1, min(ncols, len(handles))))


def _sd(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def plot_intruders_vs_rank(frame: pd.DataFrame, out_dir: Path | str, formats: Sequence[str] = ("png", "pdf"),
                           eps: float = 0.5, stem: str = "intruders_vs_rank") -> list[Path]:
    """Total intruder dimensions (summed over layers) at ``eps`` vs adapter rank r, one line per method, mean
    over seeds with ±1 s.d. error bars; full fine-tuning (no rank) as a horizontal reference line with a ±1 s.d.
    band. One panel per model × task."""
    at = _at_eps(frame, eps)
    panels = _panels(at)
    several_models = at["model"].nunique() > 1
    k = int(at["k"].iloc[0])
    with plots.style():
        fig, axes = plots.new_figure(len(panels))
        for ax, ((model, task), group) in zip(axes, panels):
            ranks = sorted(int(r) for r in group["r"].dropna().unique())
            ranked = list(group[group["r"].notna()].groupby("method", sort=True))
            for i, (method, rows) in enumerate(ranked):
                per_rank = rows.groupby("r")["intruders"].agg(["mean", _sd, "count"]).sort_index()
                n = int(per_rank["count"].max())
                dodge = 2 ** (0.08 * (i - (len(ranked) - 1) / 2))  # side by side at a shared rank
                ax.errorbar(per_rank.index.astype(int) * dodge, per_rank["mean"], yerr=per_rank["_sd"],
                            color=plots.method_color(method), marker=plots.method_marker(method),
                            label=f"{plots.method_label(method)} (n={n} seed{'s' if n > 1 else ''})")
            for method, rows in group[group["r"].isna()].groupby("method", sort=True):
                mean, sd, n = rows["intruders"].mean(), _sd(rows["intruders"]), len(rows)
                color = plots.method_color(method)
                ax.axhline(mean, color=color, linestyle="--", linewidth=1.0,
                           label=f"{plots.method_label(method)} (n={n} seed{'s' if n > 1 else ''})")
                if sd > 0:
                    ax.axhspan(mean - sd, mean + sd, color=color, alpha=0.12, linewidth=0)
            if ranks:
                ax.set_xscale("log", base=2)
                ax.set_xticks(ranks, [str(r) for r in ranks])
                ax.set_xticks([], minor=True)
                lo, hi = min(ranks), max(ranks)
                ax.set_xlim(lo / 1.6, hi * 1.6)
            ax.margins(y=0.15)
            ax.set_ylim(bottom=0)
            layers = int(group["layers"].max())
            ax.set_xlabel("adapter rank r")
            ax.set_ylabel(f"intruder dimensions\n(sum over {layers} layers)")
            ax.set_title(f"{_title(model, task, several_models)} · ε = {eps:g}, top-{k}")
        _figure_legend(fig, axes)
        return plots.save(fig, out_dir, stem, formats)


def plot_intruders_vs_eps(frame: pd.DataFrame, out_dir: Path | str, formats: Sequence[str] = ("png", "pdf"),
                          stem: str = "intruders_vs_eps", mark_eps: float = 0.5) -> list[Path]:
    """Total intruder dimensions vs the threshold ε, one curve per method (and rank): mean over seeds, with a
    ±1 s.d. band when there are several; a dotted line marks the default ε. One panel per model × task; the y
    axis is symlog (linear below 1) when the curves lie decades apart (``SYMLOG_ABOVE``, ``SYMLOG_RATIO``)."""
    totals = intruder_totals(frame)
    panels = _panels(totals)
    several_models = totals["model"].nunique() > 1
    k = int(totals["k"].iloc[0])
    styles = ("-", "--", ":", "-.")
    with plots.style():
        fig, axes = plots.new_figure(len(panels))
        for ax, ((model, task), group) in zip(axes, panels):
            order = group[["label", "method", "r"]].drop_duplicates()
            order = order.assign(first=order["method"] != "full", rank=order["r"].fillna(0).astype(int))
            order = order.sort_values(["first", "method", "rank"])
            seen: dict[str, int] = {}
            for label, method in zip(order["label"], order["method"]):
                curve = group[group["label"] == label].groupby("eps")["intruders"].agg(["mean", _sd, "count"])
                color = plots.method_color(method)
                dash = styles[seen.get(method, 0) % len(styles)]
                seen[method] = seen.get(method, 0) + 1
                n = int(curve["count"].max())
                ax.plot(curve.index, curve["mean"], color=color, linestyle=dash,
                        marker=plots.method_marker(method), markersize=3.5,
                        label=f"{label} (n={n} seed{'s' if n > 1 else ''})")
                if (curve["_sd"] > 0).any():
                    ax.fill_between(curve.index, curve["mean"] - curve["_sd"], curve["mean"] + curve["_sd"],
                                    color=color, alpha=0.15, linewidth=0)
            ax.axvline(mark_eps, color="0.5", linestyle=":", linewidth=0.8)
            layers = int(group["layers"].max())
            ax.set_xlabel("similarity threshold ε")
            ax.set_ylabel(f"intruder dimensions\n(sum over {layers} layers)")
            ax.set_title(f"{_title(model, task, several_models)} · top-{k}")
            maxima = group.groupby(["label", "eps"])["intruders"].mean().groupby("label").max()  # per curve
            if maxima.max() > SYMLOG_ABOVE and maxima.max() > SYMLOG_RATIO * max(maxima.min(), 1):
                ax.set_yscale("symlog", linthresh=1.0, linscale=0.6)  # curves decades apart: linear below 1
            ax.set_ylim(bottom=0)
        _figure_legend(fig, axes)
        return plots.save(fig, out_dir, stem, formats)


def figure_intruders_vs_rank(results_dir: Path | str, out_dir: Path | str,
                             formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Total intruders at ε = 0.5 (top 10) vs LoRA rank, full fine-tuning as a reference line; mean over seeds
    with error bars. Writes ``<out_dir>/intruders_vs_rank.{png,pdf}``."""
    return plot_intruders_vs_rank(intruder_frame(results_dir), out_dir, formats)


def figure_intruders_vs_eps(results_dir: Path | str, out_dir: Path | str,
                            formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Total intruders vs ε per method and rank (top 10). Writes ``<out_dir>/intruders_vs_eps.{png,pdf}``."""
    return plot_intruders_vs_eps(intruder_frame(results_dir), out_dir, formats)


def plot_mitigation(frame: pd.DataFrame, out_dir: Path | str, formats: Sequence[str] = ("png", "pdf"),
                    stem: str = "intruder_mitigation") -> list[Path]:
    """Task score vs the zero-shot STS-B probe for each λ, one line per run (labelled by λ at its ends); the
    dotted vertical line is the pre-trained encoder's probe. One panel per model × task."""
    panels = _panels(frame)
    several_models = frame["model"].nunique() > 1
    with plots.style():
        fig, axes = plots.new_figure(len(panels), single_size=(3.6, 2.7))
        for ax, ((model, task), group) in zip(axes, panels):
            x_span = float(np.ptp(group["sts_spearman"])) or 1.0
            y_span = float(np.ptp(group["score"])) or 1.0
            labelled: list[tuple[float, float]] = []
            for run_id, rows in group.groupby("id", sort=True):
                rows = rows.sort_values("lam", ascending=False)
                method = str(rows["method"].iloc[0])
                color = plots.method_color(method)
                n = int(rows["intruders"].iloc[0])
                ax.plot(rows["sts_spearman"], rows["score"], color=color, marker=plots.method_marker(method),
                        markersize=3.5, label=f"{rows['label'].iloc[0]} (seed {rows['seed'].iloc[0]}, "
                        f"{n} intruder{'' if n == 1 else 's'})")
                for _, end in rows.iloc[[0, -1]].iterrows():  # λ at both ends, once per spot
                    x, y = float(end["sts_spearman"]), float(end["score"])
                    if any(abs(x - a) < 0.04 * x_span and abs(y - b) < 0.04 * y_span for a, b in labelled):
                        continue
                    labelled.append((x, y))
                    ax.annotate(f"λ={end['lam']:g}", (x, y), fontsize=6, color=color, xytext=(3, 3),
                                textcoords="offset points")
            ax.axvline(float(group["sts_spearman_base"].iloc[0]), color="0.5", linestyle=":", linewidth=0.8,
                       label="pre-trained encoder")
            metric = str(group["main_metric"].iloc[0])
            ax.set_xlabel("zero-shot STS-B Spearman ρ (higher = less forgetting)")
            ax.set_ylabel(plots.metric_label(metric))
            ax.set_title(f"{_title(model, task, several_models)} · intruders scaled by λ (ε = "
                         f"{group['eps'].iloc[0]:g}, top-{int(group['k'].iloc[0])})")
        _figure_legend(fig, axes, ncols=1)
        return plots.save(fig, out_dir, stem, formats)


def figure_mitigation(results_dir: Path | str, out_dir: Path | str, formats: Sequence[str] = ("png", "pdf"),
                      lambdas: Sequence[float] = LAMBDAS) -> list[Path]:
    """``mitigation_frame`` of every completed run with a ΔW, drawn by ``plot_mitigation``."""
    frames = [mitigation_frame(record, lambdas, run_dir=run_dir)
              for record, run_dir in records_with_deltas(results_dir)]
    return plot_mitigation(pd.concat(frames, ignore_index=True), out_dir, formats)


"""What tuning changed: per study, the untuned (YAML default) trial against the tuned choice, the ranks of the
methods before and after, and how well the sharpness at init predicts the tuned learning rate.

    python -m analysis tuning --results results/zoo      # writes tuning.{md,csv} beside the leaderboard

Everything comes from the records of a tuned grid (hydra/sweeper=tune): the trial records (validation scores of
every value tried) and the reported reruns (the study's summary: chosen values, YAML defaults, sharpness).
Both ranks are taken on the validation holdout, where every method has a score at its default and at its tuned
value, so a rank change is the effect of tuning alone; the dev-set score of the reported reruns is beside them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from scipy import stats

from analysis.records import require_records

CONF = Path(__file__).resolve().parents[1] / "conf"
COLUMNS = ["model", "task", "method", "trials", "default_lr", "val_default", "chosen_lr", "val_tuned", "val_gain",
           "dev_mean", "dev_seeds", "rank_default", "rank_tuned", "rank_change", "sharpness"]


def yaml_default(method: str, key: str) -> Any:
    """A method's YAML value of `key` (following `defaults: [base, _self_]`), for records that predate the
    study summary's `defaults`."""
    path = CONF / "method" / f"{method}.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.load(path)
    if key in node:
        return node[key]
    bases = [d for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return yaml_default(bases[0], key) if bases else None


def study_rows(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per study with a reported rerun: untuned vs tuned validation score, dev score, ranks, sharpness."""
    trials: dict[str, list[Mapping[str, Any]]] = {}
    finals: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        tuning = r.get("tuning") or {}
        if tuning.get("role") == "trial":
            trials.setdefault(tuning.get("study"), []).append(r)
        elif tuning.get("role") == "final" and r.get("status") == "completed":
            finals.setdefault((r.get("model"), r.get("task"), r.get("method"), tuning.get("protocol")), []).append(r)
    rows = []
    for (model, task, method, _), runs in finals.items():
        effort = runs[0]["tuning"]
        tried = effort.get("trial_values") or []
        default = (effort.get("defaults") or {}).get("lr", yaml_default(method, "lr"))
        at_default = [t.get("objective") for t in tried
                      if default is not None and math.isclose(float((t.get("params") or {}).get("lr", math.nan)),
                                                              float(default), rel_tol=0.02)]
        scores = [float((r.get("metrics") or {}).get(r.get("main_metric"), math.nan)) for r in runs]
        sharp = (effort.get("sharpness") or {}).get("lambda_max")
        rows.append({
            "model": model, "task": task, "method": method, "trials": (effort.get("trials") or {}).get("total"),
            "default_lr": default, "val_default": at_default[0] if at_default and at_default[0] is not None else math.nan,
            "chosen_lr": (effort.get("chosen") or {}).get("lr"), "val_tuned": effort.get("val_objective"),
            "dev_mean": float(np.nanmean(scores)), "dev_seeds": len(scores),
            "sharpness": float(sharp) if isinstance(sharp, (int, float)) else math.nan,
        })
    df = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("val_gain", "rank_default", "rank_tuned",
                                                                      "rank_change")])
    df["val_gain"] = df["val_tuned"] - df["val_default"]
    groups = df.groupby(["model", "task"])
    df["rank_default"] = groups["val_default"].rank(ascending=False, method="average")
    df["rank_tuned"] = groups["val_tuned"].rank(ascending=False, method="average")
    df["rank_change"] = df["rank_default"] - df["rank_tuned"]  # > 0: tuning moved the method up
    return df[COLUMNS].sort_values(["model", "task", "rank_tuned", "method"]).reset_index(drop=True)


def sharpness_correlation(df: pd.DataFrame) -> pd.DataFrame:
    """Spearman's ρ between λ_max at init and the tuned learning rate, per model × task, with its p-value.
    A negative ρ is what the anchor study reports (arXiv 2602.04998: sharper methods need smaller rates)."""
    rows = []
    for (model, task), g in df.dropna(subset=["sharpness", "chosen_lr"]).groupby(["model", "task"]):
        positive = g[g["sharpness"] > 0]
        if len(positive) >= 3:
            rho, p = stats.spearmanr(positive["sharpness"], positive["chosen_lr"])
        else:
            rho, p = math.nan, math.nan
        rows.append({"model": model, "task": task, "n_methods": len(positive), "spearman_rho": rho, "p": p,
                     "left_out": ", ".join(sorted(g.loc[g["sharpness"] <= 0, "method"]))})
    return pd.DataFrame(rows, columns=["model", "task", "n_methods", "spearman_rho", "p", "left_out"])


def report(df: pd.DataFrame, corr: pd.DataFrame) -> str:
    out = ["# What tuning changed", "",
           "One row per tuned method × task: the validation score at the YAML's learning rate (`val_default`, a trial "
           "of the grid) and at the chosen one (`val_tuned`), the dev-set mean of the reported reruns, and the "
           "method's rank among the methods of its task by each validation score (`rank_change` > 0: tuning moved "
           "it up). `sharpness`: λ_max of the loss Hessian in the trainable parameters at init.", ""]
    shown = df.copy()
    for column in ("val_default", "val_tuned", "val_gain", "dev_mean"):
        shown[column] = shown[column].map(lambda v: "—" if pd.isna(v) else f"{100 * v:.1f}")
    for column in ("default_lr", "chosen_lr", "sharpness"):
        shown[column] = shown[column].map(lambda v: "—" if v is None or pd.isna(v) else f"{float(v):.3g}")
    for column in ("rank_default", "rank_tuned", "rank_change"):
        shown[column] = shown[column].map(lambda v: "—" if pd.isna(v) else f"{v:+g}" if column == "rank_change"
                                          else f"{v:g}")
    out += [shown.to_markdown(index=False, disable_numparse=True), ""]
    moved = df[df["rank_change"].abs() > 0].sort_values("rank_change")
    if len(moved):
        out += ["Ranks that changed with tuning: " + "; ".join(
            f"{r.method} ({r.task}) {r.rank_default:g} → {r.rank_tuned:g}" for r in moved.itertuples()) + ".", ""]
    out += ["## Sharpness at init vs tuned learning rate", "",
            "Spearman's ρ over the methods with a positive λ_max (power iteration finds the largest |λ|; a LoRA-style "
            "init with B = 0 can give a negative dominant eigenvalue, left out and named).", ""]
    shown = corr.copy()
    shown["spearman_rho"] = shown["spearman_rho"].map(lambda v: "—" if pd.isna(v) else f"{v:+.2f}")
    shown["p"] = shown["p"].map(lambda v: "—" if pd.isna(v) else f"{v:.2g}")
    out += [shown.to_markdown(index=False, disable_numparse=True) if len(shown) else "(no study measured sharpness)", ""]
    return "\n".join(out)


def write_tuning_report(results_dir: Path, out_dir: Path | None = None) -> list[Path]:
    records, _ = require_records(Path(results_dir))
    df = study_rows(records)
    corr = sharpness_correlation(df)
    out_dir = Path(out_dir or results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "tuning.md", out_dir / "tuning.csv"]
    paths[0].write_text(report(df, corr), encoding="utf-8")
    df.to_csv(paths[1], index=False)
    return paths

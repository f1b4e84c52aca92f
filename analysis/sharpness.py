"""Sharpness as a guide: does λ_max at init predict a method's tuned learning rate well enough to save trials?

    python -m analysis sharpness --reference results/zoo                          # part 1 only
    python -m analysis sharpness --reference results/zoo --results results/zoo_sharp   # writes results/zoo_sharp/sharpness.md

1. The guess, judged on the reference's tuned studies (protocol=cheap: each method's own 1.5-decade grid): for every
   study with a positive λ_max, the log-log line through the *other* methods' (λ_max, tuned lr) predicts its rate
   (bench.tuning.fit_sharpness, the fit the sweeper uses); its error in decades is set beside the error of the
   method's YAML default, the guess the cheap protocol centres its grid on.
2. The guided search against the full one: the studies of `--results` (protocol=sharp: a probe, then 2 trials in a
   half-decade window around the guess) beside the same method × task × model in the reference (4 trials): tuned
   validation score, dev score over the reported seeds, their difference with Welch's 95% interval, and the runs each
   protocol spent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.records import STUDY_ONLY_ROLES, edge_keys, require_records
from analysis.stats import welch
from analysis.tuning import yaml_default
from bench.tuning import TuningError, fit_sharpness, tuned_lr_points

MISSING = "—"


def studies(records: Sequence[Mapping[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Per (model, task, method, protocol): the study summary of its reported runs, their dev scores by seed, and
    the runs the study spent (trials, probes and reported reruns)."""
    out: dict[tuple, dict[str, Any]] = {}
    spent: dict[str, int] = {}
    for r in records:
        tuning = r.get("tuning") or {}
        if tuning.get("role") in STUDY_ONLY_ROLES and r.get("status") in ("completed", "pruned", "diverged"):
            spent[str(tuning.get("study"))] = spent.get(str(tuning.get("study")), 0) + 1
    for r in records:
        tuning = r.get("tuning") or {}
        if tuning.get("role") != "final" or r.get("status") != "completed":
            continue
        key = (r.get("model"), r.get("task"), r.get("method"), tuning.get("protocol"))
        entry = out.setdefault(key, {"effort": tuning, "dev": {}, "study": tuning.get("study")})
        entry["dev"][int(r.get("seed") or 0)] = float((r.get("metrics") or {}).get(r.get("main_metric"), math.nan))
    for entry in out.values():
        entry["runs"] = spent.get(str(entry["study"]), 0) + len(entry["dev"])
    return out


def guess_rows(reference: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Part 1: per tuned reference study with λ_max > 0, the leave-one-method-out guess against the tuned rate."""
    rows, points = [], {}  # model -> its (method, λ_max, tuned lr), read once
    for (model, task, method, protocol), entry in sorted(studies(reference).items(), key=lambda kv: str(kv[0])):
        effort = entry["effort"]
        if effort.get("lr_window"):
            continue  # a guided study's choice came from a guess: it neither fits nor judges one
        lam = (effort.get("sharpness") or {}).get("lambda_max")
        chosen = (effort.get("chosen") or {}).get("lr")
        if not (isinstance(lam, (int, float)) and lam > 0 and isinstance(chosen, (int, float))):
            continue
        try:
            if model not in points:
                points[model] = tuned_lr_points(reference, model)
            fit = fit_sharpness(points[model], leave_out=method)
        except TuningError:
            continue
        default = (effort.get("defaults") or {}).get("lr", yaml_default(method, "lr"))
        guess = fit.guess(float(lam))
        rows.append({"model": model, "task": task, "method": method, "lambda_max": float(lam),
                     "tuned_lr": float(chosen), "guess": guess, "guess_error": math.log10(chosen / guess),
                     "default_lr": float(default) if default else math.nan,
                     "default_error": math.log10(chosen / float(default)) if default else math.nan,
                     "at_edge": "lr" in edge_keys(effort), "fit_slope": fit.slope, "fit_n": len(fit.methods)})
    df = pd.DataFrame(rows)
    return df.sort_values(["model", "task", "guess_error"], key=lambda c: c.abs() if c.name == "guess_error"
                          else c) if len(df) else df


def guided_rows(guided: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Part 2: each guided study beside the reference's full-range study of the same cell."""
    full = studies(reference)
    rows = []
    for (model, task, method, protocol), entry in sorted(studies(guided).items(), key=lambda kv: str(kv[0])):
        window = entry["effort"].get("lr_window")
        if not window:
            continue
        base = next((v for (m, t, me, p), v in full.items() if (m, t, me) == (model, task, method)
                     and not v["effort"].get("lr_window")), None)
        if base is None:
            continue
        ours, theirs = list(entry["dev"].values()), list(base["dev"].values())
        test = welch(ours, theirs)
        rows.append({
            "model": model, "task": task, "method": method, "lambda_max": window["lambda_max"],
            "guess": window["guess"], "window": f"{window['low']:.3g} – {window['high']:.3g}",
            "full_lr": (base["effort"].get("chosen") or {}).get("lr"),
            "guided_lr": (entry["effort"].get("chosen") or {}).get("lr"),
            "full_val": base["effort"].get("val_objective"), "guided_val": entry["effort"].get("val_objective"),
            "full_dev": float(np.mean(theirs)), "guided_dev": float(np.mean(ours)),
            "dev_diff": test.diff, "ci_low": test.ci_low, "ci_high": test.ci_high, "p": test.p,
            "full_runs": base["runs"], "guided_runs": entry["runs"],
            "full_trials": (base["effort"].get("trials") or {}).get("total"),
            "guided_trials": (entry["effort"].get("trials") or {}).get("total"),
        })
    return pd.DataFrame(rows)


def _pct(v: Any) -> str:
    return MISSING if v is None or pd.isna(v) else f"{100 * float(v):.1f}"


def report(guesses: pd.DataFrame, guided: pd.DataFrame | None, reference: Path, results: Path | None,
           span: float) -> str:
    out = ["# Sharpness as a guide: does λ_max at init save tuning trials?", "",
           f"Reference: the tuned studies in `{reference}`; guided: `{results}`." if results is not None
           else f"Reference: the tuned studies in `{reference}` (no guided studies given: part 1 only).", "",
           "## 1. The guess, leaving each method out", "",
           "Per tuned study with a positive λ_max: the log-log least-squares line through the other methods' "
           "(λ_max, tuned lr) on the same model predicts the method's learning rate (bench.tuning.fit_sharpness, "
           "the fit protocol=sharp uses). Errors are log10(tuned / predicted), in decades; the YAML default is the "
           "guess the cheap protocol centres its grid on. `edge`: the tuned rate is an end of the method's grid, so "
           "its optimum may lie further out and both errors there are lower bounds.", ""]
    if not len(guesses):
        out += ["(no reference study with a positive λ_max and a fit over at least 5 other methods)", ""]
    else:
        shown = guesses.assign(
            lambda_max=guesses["lambda_max"].map(lambda v: f"{v:.3g}"),
            tuned_lr=guesses["tuned_lr"].map(lambda v: f"{v:.3g}"), guess=guesses["guess"].map(lambda v: f"{v:.3g}"),
            default_lr=guesses["default_lr"].map(lambda v: MISSING if pd.isna(v) else f"{v:.3g}"),
            guess_error=guesses["guess_error"].map(lambda v: f"{v:+.2f}"),
            default_error=guesses["default_error"].map(lambda v: MISSING if pd.isna(v) else f"{v:+.2f}"),
            at_edge=guesses["at_edge"].map(lambda v: "edge" if v else ""))
        columns = ["model", "task", "method", "lambda_max", "tuned_lr", "guess", "guess_error", "default_lr",
                   "default_error", "at_edge"]
        out += [shown[columns].to_markdown(index=False, disable_numparse=True), ""]
        g, d = guesses["guess_error"].abs(), guesses["default_error"].abs()
        half = span / 2
        out += [f"Over {len(guesses)} studies: median |error| {g.median():.2f} decades for the sharpness guess, "
                f"{d.median():.2f} for the YAML default; within ±{half:g} decade (a protocol=sharp window holds the "
                f"tuned rate): {int((g <= half + 1e-9).sum())} by the guess, {int((d <= half + 1e-9).sum())} by the "
                f"default; {int(guesses['at_edge'].sum())} tuned rates are at an end of their grid.", ""]
    out += ["## 2. The guided search against the full one", ""]
    if guided is None or not len(guided):
        out += ["(no guided study with a full-range study of the same cell in the reference: run "
                "`python -m bench +experiment=zoo_sharp -m`)", ""]
        return "\n".join(out)
    out += ["Per method: the full-range study (protocol=cheap) beside the guided one (protocol=sharp); scores ×100; "
            "`Δdev`: guided − full dev-set mean over the reported seeds, with Welch's 95% interval and p; runs: "
            "trials, probes and reported reruns each study spent.", ""]
    shown = pd.DataFrame({
        "model": guided["model"], "task": guided["task"], "method": guided["method"],
        "λ_max": guided["lambda_max"].map(lambda v: f"{v:.3g}"), "guess": guided["guess"].map(lambda v: f"{v:.3g}"),
        "window": guided["window"], "lr full → guided": [f"{a:.3g} → {b:.3g}" for a, b in
                                                         zip(guided["full_lr"], guided["guided_lr"])],
        "val full → guided": [f"{_pct(a)} → {_pct(b)}" for a, b in zip(guided["full_val"], guided["guided_val"])],
        "dev full": guided["full_dev"].map(_pct), "dev guided": guided["guided_dev"].map(_pct),
        "Δdev [95% CI]": [MISSING if pd.isna(x) else f"{100 * x:+.1f} [{_pct(lo)}, {_pct(hi)}]"
                          for x, lo, hi in zip(guided["dev_diff"], guided["ci_low"], guided["ci_high"])],
        "p": guided["p"].map(lambda v: MISSING if pd.isna(v) else f"{v:.2g}"),
        "runs full / guided": [f"{a} / {b}" for a, b in zip(guided["full_runs"], guided["guided_runs"])],
    })
    out += [shown.to_markdown(index=False, disable_numparse=True), ""]
    worse = guided[(guided["p"] < 0.05) & (guided["dev_diff"] < 0)]["method"].tolist()
    better = guided[(guided["p"] < 0.05) & (guided["dev_diff"] > 0)]["method"].tolist()
    out += [f"Runs spent: {int(guided['full_runs'].sum())} full-range, {int(guided['guided_runs'].sum())} guided "
            f"(trials {int(guided['full_trials'].sum())} → {int(guided['guided_trials'].sum())}). Mean Δdev "
            f"{100 * guided['dev_diff'].mean():+.1f} points; significantly worse guided (p < 0.05): "
            f"{', '.join(worse) or 'none'}; significantly better: {', '.join(better) or 'none'}; the rest are within "
            "the seed noise.", ""]
    return "\n".join(out)


def write_sharpness_report(reference: Path, results: Path | None = None, out_dir: Path | None = None,
                           span: float = 0.5) -> list[Path]:
    ref, _ = require_records(Path(reference))
    guided = guided_rows(require_records(Path(results))[0], ref) if results is not None else None
    out_dir = Path(out_dir or results or reference)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sharpness.md"
    path.write_text(report(guess_rows(ref), guided, Path(reference), Path(results) if results else None, span),
                    encoding="utf-8")
    return [path]

"""The method catalogue: one row per conf/method/*.yaml, from the configs, the method classes and the committed tables.

    python -m bench --list methods          # the table, in the terminal (configs and committed tables only)
    python -m bench.catalogue               # docs/methods.md, export kinds measured (about half a minute)

What each column comes from (nothing is typed by hand, so nothing goes stale unseen; tests/bench/test_catalogue.py
regenerates docs/methods.md and compares):

- name, paper, reference repository, update rule: the YAML's header comment (`# Name (Authors, arXiv ID;
  owner/repo@commit) ...: rule`), which every method YAML opens with.
- family: `Method.family` (methods/base.py FAMILIES); model kinds: the head kinds of bench.models.LOADERS less
  `Method.unsupported_heads`, and "conv" where `Method.supported_layers` holds nn.Conv2d.
- export: what bench.export gives for a run, measured here: the method trains 3 steps on real SST-2 rows, then its
  post_train runs (as in a run), on a one-layer random BERT with the offline MiniLM's layer shapes (384 × 1536), so
  rank thresholds fall as they do on MiniLM, and the export is made and checked against the trained model.
- trainable parameters, tuned scores: results/zoo/leaderboard.csv (the tuned zoo, offline MiniLM; mean over seeds ±
  the half-width of the 95% CI); claims: results/claims/claims.csv; step time: the side-by-side ratio to LoRA of
  results/zoo/steptime*.csv where the method was measured there (every measurement, as they differ by noise), else
  the ratio of the cells' own median step times (separate processes, marked †).
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
ZOO = REPO / "results" / "zoo"
CLAIMS = REPO / "results" / "claims" / "claims.csv"
DOC = REPO / "docs" / "methods.md"
ARXIV = re.compile(r"arXiv[: ]\s*(\d{4}\.\d{4,5})")
REPO_AT = re.compile(r"\b([A-Za-z0-9][\w-]*/[\w.-]*[\w-])(?:@([0-9a-f]{7,40}))?")
#: head kind (bench.models.LOADERS) -> the short name of the model kind in the catalogue
KINDS = {"seq_cls": "text", "causal_lm": "LM", "image_cls": "image", "diffusion": "diffusion"}
#: the layer shapes of the offline MiniLM on one layer: the export's rank thresholds fall as they do there
EXPORT_MODEL = ["model=tiny_bert", "model.random_config.hidden_size=384", "model.random_config.intermediate_size=1536",
                "model.random_config.num_hidden_layers=1", "model.random_config.num_attention_heads=12"]


@dataclass
class Entry:
    option: str
    name: str
    papers: list[str]
    repo: str  # owner/repo[@commit], or "" where the header names none
    rule: str
    family: str
    kinds: list[str]
    trainable: int | None = None
    scores: dict[str, str] = field(default_factory=dict)  # task -> "0.815 ± 0.013 (3)"
    claims: list[tuple[str, str]] = field(default_factory=list)  # (claim, verdict)
    step_ratio: str = ""
    export: str = ""  # peft_lora, merged or none, with the reason where not LoRA


def header_lines(option: str, group: str = "method") -> list[str]:
    """The opening comment of conf/<group>/<option>.yaml, line by line (without Hydra's `# @package` line)."""
    lines = []
    for line in (CONF / group / f"{option}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line.lstrip("#").strip())
    return lines


def header(option: str) -> str:
    """The opening comment of conf/method/<option>.yaml, as one line."""
    return " ".join(header_lines(option))


def parse_header(text: str) -> tuple[str, list[str], str, str]:
    """(name, arXiv ids, reference repository, rule) of a header `Name (Authors, arXiv ID; repo@sha) ...: rule`."""
    m = re.match(r"(.+?) \(([^()]*)\)[^:]*?: (.*)", text) or re.match(r"(.+?): (.*)", text)
    if m is None:
        return text, [], "", ""
    if m.lastindex == 2:  # no parenthesis before the colon
        return m.group(1), ARXIV.findall(text), "", m.group(2)
    name, paren, rule = m.groups()
    papers = ARXIV.findall(paren)
    repo = next((f"{r}@{sha}" if sha else r for r, sha in REPO_AT.findall(paren)
                 if papers and not r.endswith(".py") and "et al" not in r), "")
    return name, papers or ARXIV.findall(text), repo, rule


def method_options() -> list[str]:
    from bench.__main__ import group_options

    return group_options("method")


def _compose(overrides: list[str]) -> Any:
    from bench.run import compose_config

    return compose_config(overrides)


def _method(option: str, cfg: Any) -> Any:
    from bench.run import build

    return build(cfg.method, "method", option)


def entries(results: Path = ZOO, claims: Path = CLAIMS) -> list[Entry]:
    """Every method's row from its config, its class and the committed tables (no training)."""
    import torch.nn as nn

    from bench.models import LOADERS

    board = _read_csv(results / "leaderboard.csv")
    side: dict[str, list[float]] = {}  # every side-by-side measurement of the method (the tables disagree by noise)
    for path in sorted(results.glob("steptime*.csv")):
        for r in _read_csv(path):
            side.setdefault(r["method"], []).append(float(r["vs_lora_median"]))
    verdicts: dict[str, dict[str, str]] = {}
    for r in _read_csv(claims):
        verdicts.setdefault(r["method"], {})[r["claim"]] = r["verdict"].split(" (")[0]
    out = []
    for option in method_options():
        name, papers, repo, rule = parse_header(header(option))
        method = _method(option, _compose([f"method={option}"]))
        kinds = [KINDS.get(k, k) for k in LOADERS if k not in method.unsupported_heads]
        if nn.Conv2d in method.supported_layers:
            kinds.append("conv")
        e = Entry(option, name, papers, repo, rule, method.family, kinds,
                  claims=sorted(verdicts.get(option, {}).items()))
        rows = [r for r in board if r["method"] == option and r["model"] == "minilm"]
        for r in rows:
            if r["score_mean"]:
                high, low = r["score_ci95_high"], r["score_ci95_low"]
                half = (float(high) - float(low)) / 2 if high else math.nan
                spread = f" ± {half:.3f}" if math.isfinite(half) else ""
                e.scores[r["task"]] = f"{float(r['score_mean']):.3f}{spread} ({r['n_completed']})"
            if r["trainable"] and e.trainable is None:
                e.trainable = int(float(r["trainable"]))
        if option in side:
            e.step_ratio = ", ".join(f"{v:.2f}" for v in side[option])
        else:
            cells = [float(r["step_s_vs_lora"]) for r in rows if r["step_s_vs_lora"]]
            e.step_ratio = f"{cells[0]:.2f} †" if cells else ""
        out.append(e)
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def measure_export(option: str) -> str:
    """What bench.export makes of the method after 3 steps on real SST-2 rows, on a one-layer random BERT with
    MiniLM's layer shapes: "LoRA adapter", "merged model (reason)" or "none (reason)"."""
    import torch
    from torch.utils.data import DataLoader

    from bench.export import export
    from bench.train import train
    from methods.base import WrapContext

    cfg = _compose([f"method={option}", "task=glue/sst2", *EXPORT_MODEL, "+experiment=smoke"])
    loaded, rows, collate = _export_data()
    ctx = WrapContext(head_modules=loaded.head_modules, seed=0)
    method = _method(option, cfg)
    torch.manual_seed(0)  # the method's own random init: the same whichever method was measured before
    model = method.prepare(copy.deepcopy(loaded.model), ctx)
    method.calibrate(model, iter([collate(rows[8 * i:8 * i + 8]) for i in range(1, 3)]), lambda m, b: m(**b).loss)
    loader = DataLoader(rows, batch_size=8, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    steps = argparse.Namespace(max_steps=3, grad_accum=1, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
                               log_every=1, eval_every=0)
    train(model, method, loader, steps, torch.device("cpu"), None, lambda m: {}, progress=False)
    ctx.train_batches = lambda: iter([collate(rows[8 * i:8 * i + 8]) for i in range(3)])
    method.post_train(model, ctx)  # as a run does before it exports (compression, LoRAM's recovery)
    with tempfile.TemporaryDirectory() as tmp:
        result = export(model, method, copy.deepcopy(loaded.model), ctx, collate(rows[:8]), Path(tmp) / "export")
    label = {"peft_lora": "LoRA adapter", "merged": "merged model", "none": "none"}[result.kind]
    return f"{label} ({_reason(result.reason)})" if result.reason else label


@functools.cache
def _export_data() -> tuple[Any, list[Any], Any]:
    """The random model (seeded), SST-2 rows and collate function every export measurement starts from."""
    import torch

    from bench.models import load_model
    from bench.run import build

    cfg = _compose(["task=glue/sst2", *EXPORT_MODEL, "+experiment=smoke"])
    task = build(cfg.task, "task", "glue/sst2")
    torch.manual_seed(0)
    loaded = load_model(cfg.model, task.head)
    return loaded, task.examples("train", seed=0), task.collate_fn(loaded.tokenizer)


def _reason(reason: str) -> str:
    """The export's reason without the layer it names or the difference it measured (this model's, not the
    user's; a float that rounding may change from one machine to the next)."""
    return re.sub(r" \(e\.g\. [^)]*\)| by \S+ \(> \S+\)", "", reason)


def table(rows: list[Entry], tasks: list[str], with_export: bool) -> list[list[str]]:
    head = ["method", "name", "paper", "family", "models", "trainable (MiniLM)", *tasks, "step × LoRA", "claims"]
    if with_export:
        head.insert(6, "export")
    body = [head]
    for e in rows:
        papers = ", ".join(f"[{p}](https://arxiv.org/abs/{p})" if with_export else p for p in e.papers) or "—"
        claims = ", ".join(v for _, v in e.claims) or "—"
        row = [e.option, e.name, papers, e.family, ", ".join(e.kinds),
               f"{e.trainable:,}" if e.trainable else "—", *(e.scores.get(t, "—") for t in tasks),
               e.step_ratio or "—", claims]
        if with_export:
            row.insert(6, e.export.split(" (")[0] or "—")
        body.append(row)
    return body


def score_tasks(rows: list[Entry]) -> list[str]:
    return sorted({t for e in rows for t in e.scores}, key=lambda t: (t != "glue/sst2", t))


def markdown(rows: list[Entry]) -> str:
    from methods.base import FAMILIES

    tasks = score_tasks(rows)
    cells = table(rows, tasks, with_export=True)
    lines = ["# Method catalogue", "",
             "Generated by `python -m bench.catalogue` (do not edit; tests/bench/test_catalogue.py checks it is "
             "current). One row per conf/method/*.yaml; how each column is obtained is in bench/catalogue.py.", "",
             "- **models**: the task kinds the method trains (text classification, causal LM, image classification, "
             "text-to-image diffusion); *conv*: it also adapts convolutions (EfficientNet).",
             "- **export**: what `export=true` writes, measured after 3 steps on a one-layer random BERT with the "
             "offline MiniLM's layer shapes: a PEFT LoRA adapter (`PeftModel.from_pretrained`), the merged model in "
             "Hugging Face format where ΔW is not low-rank or LoRA cannot express the update, or none for methods "
             "whose update depends on the input.",
             f"- **scores**: the tuned zoo on the offline MiniLM ({', '.join(tasks) or 'no task yet'}): the dev-set "
             "mean over the best learning rate's seeds ± the half-width of its 95% CI (seeds); results/zoo has the "
             "significance tests.",
             "- **step × LoRA**: step time relative to LoRA measured side by side in one process "
             "(results/zoo/steptime*.md); † the ratio of the cells' own medians, measured in separate processes.",
             "- **claims**: the method's paper claims checked by `python -m analysis claims` (results/claims).", "",
             *_md_table(cells), "", "## Families", ""]
    lines += [f"- **{f}** ({', '.join(e.option for e in rows if e.family == f) or 'none yet'}): {what}"
              for f, what in FAMILIES.items()]
    lines += ["", "## Methods", ""]
    for e in rows:
        lines += [f"### {e.option}: {e.name}", ""]
        src = [f"paper {', '.join(f'[arXiv {p}](https://arxiv.org/abs/{p})' for p in e.papers)}"] if e.papers else []
        if e.repo:
            src.append(f"reference `{e.repo}`")
        src.append(f"config `conf/method/{e.option}.yaml`")
        lines += ["; ".join(src) + ".", "", e.rule, ""]
        if e.export:
            lines += [f"Export: {e.export}.", ""]
        for claim, verdict in e.claims:
            lines.append(f"- claim `{claim}`: {verdict}")
        if e.claims:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _md_table(cells: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in row] for row in cells]
    return ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in esc[0]) + "|",
            *("| " + " | ".join(row) + " |" for row in esc[1:])]


def text_table(rows: list[Entry]) -> str:
    """The catalogue as aligned plain text (the terminal's `python -m bench --list methods`)."""
    cells = table(rows, score_tasks(rows), with_export=False)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n\nscores: tuned zoo on the offline MiniLM, mean ± 95% CI half-width (seeds); " \
        "step × LoRA: side by side, † from the cells; docs/methods.md has papers, rules and export kinds.\n"


def build_doc(results: Path = ZOO, claims: Path = CLAIMS, progress: bool = False,
              rows: list[Entry] | None = None) -> str:
    """docs/methods.md's text: `rows` (entries(); built from `results` and `claims` when None) with their exports
    measured."""
    rows = copy.deepcopy(rows) if rows is not None else entries(results, claims)
    for e in rows:
        if progress:
            print(f"export: {e.option}", flush=True)
        e.export = measure_export(e.option)
    return markdown(rows)


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench.catalogue", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOC, help="where the catalogue goes (default docs/methods.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # deterministic and quick on tiny layers
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(build_doc(progress=True))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

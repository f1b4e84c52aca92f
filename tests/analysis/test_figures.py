"""Paper figures from synthetic run records."""

from __future__ import annotations

import json
import subprocess
import sys
import types
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analysis import plots
from analysis.figures import FIGURES, FigureDataError, render
from analysis.plots import pareto_front, pareto_steps
from analysis.records import NoRecordsError

REPO = Path(__file__).resolve().parents[2]
DRAWN_HERE = sorted(name for name, spec in FIGURES.items() if not spec.external)
EXTERNAL = {
    "intruders_vs_rank": ("analysis.intruders", "figure_intruders_vs_rank"),
    "intruders_vs_eps": ("analysis.intruders", "figure_intruders_vs_eps"),
    "spectrum": ("analysis.spectral", "figure_spectrum"),
    "spectral_layers": ("analysis.spectral", "figure_spectral_layers"),
}
# method -> (trainable params, score offset, train seconds, peak memory bytes)
METHODS = {
    "full": (22_713_986, 0.02, 150.0, 1.8e9),
    "lora": (338_690, 0.0, 120.0, 2.0e9),
    "dora": (359_810, 0.005, 150.0, 2.5e9),
    "pissa": (338_690, -0.01, 146.0, 2.1e9),
    "sora": (170_000, -0.02, 130.0, 1.9e9),  # not in the fixed colour map
}
TASKS = {"glue/sst2": ("accuracy", True, 0.85), "glue/cola": ("matthews_corr", True, 0.45), "lm/wiki": ("perplexity", False, 12.0)}


def record(method: str, task: str, seed: int, model: str = "minilm", kind: str = "rss") -> dict[str, Any]:
    trainable, offset, train_s, memory = METHODS[method]
    metric, higher, base = TASKS[task]
    rng = np.random.default_rng(zlib.crc32(f"{method}/{task}/{seed}/{model}".encode()))
    value = base + (offset if higher else -offset * 50) + rng.normal(0, 0.005 if higher else 0.2)
    steps = [1] + list(range(10, 201, 10))
    curve = [
        {"step": s, "loss": float(0.7 * np.exp(-s / (80 + 40 * offset)) + 0.2 + rng.normal(0, 0.02)), "lr": 1e-4}
        for s in steps
    ]
    return {
        "id": f"{task.replace('/', '-')}__{method}__{model}__s{seed}",
        "cell_key": f"{model}-{method}-{task}-{seed}",
        "status": "completed",
        "method": method,
        "task": task,
        "suite": "glue" if task.startswith("glue/") else None,
        "model": model,
        "seed": seed,
        "metrics": {metric: float(value)},
        "main_metric": metric,
        "higher_is_better": {metric: higher},
        "eval_split": "dev",
        "curve": curve,
        "params": {"trainable": trainable, "total": 22_713_986, "adapter_bytes": 4 * trainable},
        "cost": {
            "train_s": train_s + seed,
            "step_s": 0.3,
            "peak_mem_bytes": memory * (1.5 if kind != "rss" else 1.0),
            "peak_mem_kind": kind,
            "device": "cpu" if kind == "rss" else "cuda",
        },
        "timestamps": {"finished": "2026-11-24T03:00:00+00:00"},
        "error": None,
    }


def write(results: Path, rec: dict[str, Any]) -> None:
    run = results / "runs" / rec["id"]
    run.mkdir(parents=True)
    (run / "record.json").write_text(json.dumps(rec))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five methods × three tasks × three seeds on one model (one lower-is-better task), a second model on a
    GPU (CUDA memory), a single-seed method, and a failed run that must not be drawn."""
    out = tmp_path_factory.mktemp("results")
    for method in METHODS:
        for task in TASKS:
            for seed in range(1 if method == "sora" else 3):
                write(out, record(method, task, seed))
    for method in ("full", "lora"):
        for seed in range(2):
            write(out, record(method, "glue/sst2", seed, model="smollm", kind="cuda_max_allocated"))
    failed = record("dora", "glue/sst2", 9)
    failed.update(id="failed-run", cell_key="failed", status="failed", metrics={}, error={"type": "RuntimeError"})
    write(out, failed)
    return out


@pytest.mark.parametrize("name", DRAWN_HERE)
def test_figure_renders_png_and_pdf(name: str, results: Path, tmp_path: Path) -> None:
    paths = render(name, results, tmp_path)
    assert paths == [tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"]
    png, pdf = (p.read_bytes() for p in paths)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert pdf.startswith(b"%PDF") and len(pdf) > 5_000
    assert not list(tmp_path.glob(".*.tmp"))


def test_drawn_here_covers_the_paper_figures() -> None:
    assert DRAWN_HERE == ["loss_curves", "pareto_memory", "pareto_params", "pareto_time"]
    assert {name for name, spec in FIGURES.items() if spec.external} == set(EXTERNAL)
    for name, spec in FIGURES.items():
        assert spec.name == name and spec.description


def test_memory_axis_names_the_kind(results: Path, tmp_path: Path) -> None:
    (svg,) = render("pareto_memory", results, tmp_path, formats=("svg",))
    text = svg.read_text()
    assert "Peak memory (GB, RSS)" in text and "Peak memory (GB, CUDA max allocated)" in text
    (svg,) = render("loss_curves", results, tmp_path, formats="svg")
    assert "moving average of 5 logged points" in svg.read_text()


def test_unknown_figure_lists_the_names(results: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        render("pareto_bogus", results, tmp_path)
    for name in FIGURES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="png"):
        render("pareto_params", results, tmp_path, formats=("bmp",))
    assert not list(tmp_path.iterdir())


def test_missing_records_and_data(tmp_path: Path) -> None:
    with pytest.raises(NoRecordsError):
        render("pareto_params", tmp_path, tmp_path / "out")
    rec = record("lora", "glue/sst2", 0)
    rec.update(status="failed", metrics={})
    write(tmp_path, rec)
    with pytest.raises(FigureDataError, match="no completed run"):
        render("loss_curves", tmp_path, tmp_path / "out")


@pytest.mark.parametrize("name", sorted(EXTERNAL))
def test_external_figures_are_delegated_lazily(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    module_name, function = EXTERNAL[name]
    calls = []
    fake = types.ModuleType(module_name)
    setattr(fake, function, lambda *args: calls.append(args) or [Path("drawn.png")])
    monkeypatch.setitem(sys.modules, module_name, fake)
    assert render(name, "res", tmp_path, formats=["png"]) == [Path("drawn.png")]
    assert calls == [(Path("res"), tmp_path, ("png",))]


def test_figures_import_without_the_other_analyses() -> None:
    code = (
        "import sys, analysis.figures as f; "
        "print(sorted(m for m in ('analysis.intruders', 'analysis.spectral') if m in sys.modules)); "
        "print('matplotlib.pyplot' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "False"]


def test_pareto_front_on_a_constructed_case() -> None:
    cost = [1.0, 2.0, 2.0, 3.0, 4.0, float("nan"), 0.5, 4.0]
    score = [0.5, 0.7, 0.6, 0.7, 0.9, 1.0, 0.4, 0.9]
    # 2 loses to 1 (same cost, lower score), 3 to 1 (higher cost, same score), 5 has no cost;
    # 4 and 7 are the same point and both stay.
    assert pareto_front(cost, score).tolist() == [6, 0, 1, 4, 7]
    # Lower is better: the cheapest point also has the best score and dominates the rest.
    assert pareto_front(cost, score, higher_is_better=False).tolist() == [6]
    assert pareto_front([], []).tolist() == []

    xs, ys = pareto_steps([1.0, 2.0, 4.0], [0.5, 0.7, 0.9], x_end=10.0)
    assert xs.tolist() == [1.0, 2.0, 2.0, 4.0, 4.0, 10.0]
    assert ys.tolist() == [0.5, 0.5, 0.7, 0.7, 0.9, 0.9]


def test_method_style_is_stable() -> None:
    assert plots.method_color("full") == "#000000"
    colors = {plots.method_color(m) for m in ("full", "lora", "dora", "pissa")}
    assert len(colors) == 4
    # An unknown method gets the same colour and marker every time, and not a fixed method's colour.
    assert plots.method_color("sora") == plots.method_color("sora") not in plots.METHOD_COLORS.values()
    assert plots.method_marker("sora") in plots.FALLBACK_MARKERS
    assert plots.method_label("pissa") == "PiSSA" and plots.task_label("glue/sst2") == "SST-2"


def test_save_writes_each_format(tmp_path: Path) -> None:
    with plots.style():
        fig, (ax,) = plots.new_figure(1)
        ax.plot([0, 1], [0, 1])
        paths = plots.save(fig, tmp_path / "sub", "line", formats=("png", "pdf", "svg"))
    assert [p.name for p in paths] == ["line.png", "line.pdf", "line.svg"]
    assert all(p.stat().st_size > 0 for p in paths)
    with pytest.raises(ValueError):
        plots.save(fig, tmp_path, "line", formats=("jpg",))

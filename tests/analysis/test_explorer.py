"""The explorer (analysis/explorer.py): the committed pages are current and self-contained, their data is the
leaderboard's, and in a real browser (headless Chromium) the table renders, a filter from the link applies and the
plots are drawn."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from analysis.explorer import build_html
from analysis.leaderboard import load_leaderboard

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
COMMITTED = ["results/zoo", "results"]  # the tuned zoo and the demo grid


def page_data(html: str) -> dict:
    return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S).group(1))


@pytest.fixture(scope="module")
def zoo_page():
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # the page names its results directory as given: relative, so a rebuild anywhere is identical
        return build_html(Path("results/zoo"))


@pytest.mark.parametrize("results", COMMITTED)
def test_committed_explorer_is_current(results, zoo_page, monkeypatch):
    monkeypatch.chdir(REPO)
    fresh = zoo_page if results == "results/zoo" else build_html(Path(results))
    committed = (REPO / results / "explorer.html").read_text()
    assert committed == fresh, f"{results}/explorer.html is stale: python -m analysis explore --results {results}"


def test_page_is_self_contained_and_holds_the_leaderboard(zoo_page):
    assert "<script src" not in zoo_page and "<link" not in zoo_page  # no file or network fetch: opens from disk
    data = page_data(zoo_page)
    summary = load_leaderboard(REPO / "results/zoo").summary
    assert len(data["rows"]) == len(summary)
    assert {(r["method"], r["task"]) for r in data["rows"]} == set(zip(summary["method"], summary["task"]))
    lora = next(r for r in data["rows"] if r["method"] == "lora" and r["task"] == "glue/sst2")
    assert lora["family"] == "low-rank adapter" and lora["paper"] == "2106.09685" and lora["tuned"]
    runs = data["curves"][lora["key"]]
    assert len(runs) == lora["n"] and all(run["steps"] and run["eval"] for run in runs)
    final = [run["eval"][-1] for run in runs]  # the last point of each metric curve is that seed's final score
    assert sum(final) / len(final) == pytest.approx(lora["score"], abs=1e-5)


def _chromium(url: str, *extra: str) -> str:
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--virtual-time-budget=20000", *extra, url], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make browser installs Debian's chromium)")
def test_the_page_renders_filters_and_plots_in_chromium(tmp_path):
    page = REPO / "results/zoo/explorer.html"
    data = page_data(page.read_text())
    family = "optimizer"
    expected = [r for r in data["rows"] if r["task"] == "glue/sst2" and r["family"] == family]
    assert expected, "the zoo should hold optimizer-family rows on SST-2"
    dom = _chromium(f"{page.as_uri()}#task=glue/sst2&family={family}", "--dump-dom")
    body = dom.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    shown = re.findall(r'<tr class="row[^"]*" data-key="([^"]+)"', body)
    assert sorted(shown) == sorted(r["key"] for r in expected)  # the filter from the link applied
    assert f">{len(expected)} of {len(data['rows'])} rows<" in dom
    assert dom.count('class="main-svg"') >= 5, "plotly drew fewer plots than the page has"
    assert "score vs trainable parameters" in dom
    shot = tmp_path / "explorer.png"
    _chromium(page.as_uri(), f"--screenshot={shot}", "--window-size=1400,1800")
    assert shot.stat().st_size > 20_000, "the screenshot is (nearly) blank"

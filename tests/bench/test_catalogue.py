"""The method catalogue (bench/catalogue.py): docs/methods.md is current, every method YAML's header names its
paper, and `python -m bench --list` prints what it says."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bench.__main__ import main
from bench.catalogue import DOC, REPO, build_doc, entries, header, method_options, parse_header
from methods.base import FAMILIES

#: method YAMLs that are not one paper's method
NO_PAPER = {"full", "peft"}


@pytest.fixture(scope="module")
def rows():
    return entries()


def test_docs_methods_is_current(rows):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as python -m bench.catalogue measures the exports
    try:
        fresh = build_doc(rows=rows)
    finally:
        torch.set_num_threads(threads)
    assert DOC.read_text() == fresh, "docs/methods.md is stale: regenerate it with `python -m bench.catalogue`"


def test_parse_header_forms():
    assert parse_header("LoRA (Hu et al., arXiv 2106.09685) through PEFT: y = W0 x + (alpha/r) B A x.") == (
        "LoRA", ["2106.09685"], "", "y = W0 x + (alpha/r) B A x.")
    assert parse_header("GaLore (Zhao et al., arXiv 2403.03507; jiaweizzhao/GaLore@2cc66f8): full fine-tuning") == (
        "GaLore", ["2403.03507"], "jiaweizzhao/GaLore@2cc66f8", "full fine-tuning")
    assert parse_header("Full fine-tuning: every parameter trained") == ("Full fine-tuning", [], "",
                                                                        "every parameter trained")
    # a parenthesis without a paper names a file, not a reference repository
    assert parse_header("Any PEFT tuner (methods/peft_config.py): get_peft_model")[2] == ""


@pytest.mark.parametrize("option", method_options())
def test_every_method_header_names_its_paper_and_rule(option):
    name, papers, _, rule = parse_header(header(option))
    assert name and len(name) < 40, f"conf/method/{option}.yaml: the header should open with the method's name"
    assert rule, f"conf/method/{option}.yaml: the header should say `Name (Authors, arXiv ID): update rule`"
    assert papers or option in NO_PAPER, f"conf/method/{option}.yaml: the header names no arXiv id"


def test_every_method_has_a_known_family_and_model_kinds(rows):
    assert [e.option for e in rows] == method_options()
    for e in rows:
        assert e.family in FAMILIES, f"{e.option}: family {e.family!r} is not in methods.base.FAMILIES"
        assert "text" in e.kinds
    ba_lora = next(e for e in rows if e.option == "ba_lora")
    assert "diffusion" not in ba_lora.kinds  # BALoRA.unsupported_heads
    assert "conv" in next(e for e in rows if e.option == "lora").kinds
    assert "conv" not in next(e for e in rows if e.option == "pissa").kinds  # PiSSA factors W0 as a matrix


def test_list_methods_prints_every_method(capsys):
    main(["--list", "methods"])
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines()[2:] if line.strip() and not line.startswith("scores")]
    assert listed == method_options()


def test_list_of_an_unknown_group_names_the_choices():
    out = subprocess.run([sys.executable, "-m", "bench", "--list", "nope"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "choose one of methods, tasks" in out.stderr
    out = subprocess.run([sys.executable, "-m", "bench", "--list", "tasks"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "glue/sst2" in out.stdout.split()

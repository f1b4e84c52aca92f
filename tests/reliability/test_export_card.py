"""The PEFT export carries a filled model card and the base model's hub id, not PEFT's empty template and a path
inside the virtual environment."""

from __future__ import annotations

import json

from bench.export import paper_reference
from bench.run import run
from methods.full import Full
from methods.lora_ga import LoRAGA
from tests.helpers import compose_cfg


def test_export_readme_and_adapter_config_come_from_the_record(tmp_path):
    cfg = compose_cfg(["method=lora", "model=tiny_bert", "+experiment=smoke", f"results_dir={tmp_path}",
                       "export=true", "method.lr=1e-2", "progress=false"])
    record = run(cfg)
    assert record["status"] == "completed" and record["artifacts"]["export"]["kind"] == "peft_lora"
    folder = tmp_path / "runs" / record["id"] / "export"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == cfg.model.id == "sentence-transformers/all-MiniLM-L6-v2"
    card = (folder / "README.md").read_text()
    assert "More Information Needed" not in card
    score = f"accuracy = {record['metrics']['accuracy']:.4f}"
    for text in ("base_model: sentence-transformers/all-MiniLM-L6-v2", "library_name: peft", "`method=lora`",
                 "arXiv 2106.09685", "`task=glue/sst2`", score, record["id"], "PeftModel.from_pretrained",
                 "random weights"):  # tiny_bert is a random test model: the card says so
        assert text in card, (text, card)


def test_paper_id_falls_back_to_the_class_docstring():
    line, arxiv = paper_reference("lora_ga_peft", object.__new__(LoRAGA))  # its YAML's first line names no paper
    assert "PEFT" in line and arxiv == "2407.05000"
    line, arxiv = paper_reference("full", object.__new__(Full))
    assert line.startswith("Full fine-tuning") and arxiv is None  # no paper to cite: the card says "not recorded"

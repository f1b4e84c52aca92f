"""python -m analysis import-peft: PEFT method-comparison results as records, never mixed with the suite's own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from analysis.__main__ import main
from analysis.leaderboard import build_leaderboard
from analysis.peft_import import MARK, to_peft_result, to_record
from analysis.records import load_records, records_frame


def peft_result(experiment: str = "lora/llama-3.2-3B-rank32", test_accuracy: float = 0.478,
                status: str = "success") -> dict[str, Any]:
    """A result file in the format PEFT's method comparison writes (method_comparison/MetaMathQA/README.md)."""
    return {
        "run_info": {
            "created_at": "2026-07-15T04:01:48+00:00", "total_time": 1660.2, "experiment_name": experiment,
            "peft_branch": "main",
            "train_config": {"model_id": "meta-llama/Llama-3.2-3B", "dtype": "bfloat16", "max_seq_length": 768,
                             "batch_size": 4, "batch_size_eval": 50, "max_steps": 5000, "eval_steps": 250,
                             "seed": 0, "grad_norm_clip": 1.0, "optimizer_type": "AdamW",
                             "optimizer_kwargs": {"lr": 1e-4, "weight_decay": 0.1}, "lr_scheduler": "cosine"},
            "peft_config": {"peft_type": "LORA", "r": 32, "lora_alpha": 64, "target_modules": ["q_proj", "v_proj"]},
            "error_msg": "" if status == "success" else "CUDA out of memory",
        },
        "train_info": {
            "accelerator_memory_reserved_avg": 16_071_874_995, "accelerator_memory_max": 23_907_532_800,
            "accelerator_memory_reserved_99th": 21_843_935_232, "train_time": 1396.96, "file_size": 73_429_560,
            "num_trainable_params": 9_175_040, "num_total_params": 3_221_924_864, "status": status,
            "metrics": [
                {"step": 250, "valid accuracy": 0.10, "train loss": 1.29, "train samples": 1000,
                 "tokens / sec": 4400.0},
                {"step": 500, "valid accuracy": 0.30, "train loss": 0.80, "train samples": 2000,
                 "tokens / sec": 4500.0},
                {"step": 5000, "test accuracy": test_accuracy, "train loss": 0.66, "train samples": 20000,
                 "train total tokens": 4_198_051, "forgetting": 0.0325},
            ],
        },
        "meta_info": {"package_info": {"peft-version": "0.19.2.dev0", "transformers-version": "5.13.1",
                                       "torch-version": "2.13.0+cu130"},
                      "system_info": {"system": "Linux", "accelerator": "NVIDIA L40S"}},
    }


def test_a_result_file_becomes_a_marked_record_and_round_trips(tmp_path: Path) -> None:
    source = tmp_path / "peft_results"
    source.mkdir()
    original = peft_result()
    (source / "lora--llama-3.2-3B-rank32.json").write_text(json.dumps(original))
    (source / "notes.json").write_text(json.dumps({"unrelated": True}))
    assert main(["import-peft", str(source), "--results", str(tmp_path / "out")]) == 0
    (record,) = load_records(tmp_path / "out")
    assert record["method"] == "peft/lora/llama-3.2-3B-rank32" + MARK and record["model"] == "Llama-3.2-3B"
    assert record["status"] == "completed" and record["metrics"]["exact_match"] == 0.478
    assert record["source"]["kind"] == "peft-method-comparison" and record["source"]["accelerator"] == "NVIDIA L40S"
    assert record["tuning"]["protocol"] == "peft_metamath" and "NVIDIA L40S" in record["eval_note"]
    assert record["params"]["trainable"] == 9_175_040 and record["cost"]["peak_mem_bytes"] == 23_907_532_800
    assert [c["step"] for c in record["curve"]] == [250, 500]
    assert [h["metrics"]["exact_match"] for h in record["eval_history"]] == [0.10, 0.30]
    assert to_peft_result(record) == original  # the file comes back as read


def test_imported_rows_stay_apart_from_ours_and_are_marked(tmp_path: Path) -> None:
    out = tmp_path / "out"
    from bench.store import RunStore

    store = RunStore(out)
    store.write(to_record(peft_result(), "a.json"))
    ours = to_record(peft_result(test_accuracy=0.40), "b.json")  # the same experiment, run by the suite
    ours.update(method="peft/lora/llama-3.2-3B-rank32", id=ours["id"].replace("-imported", ""), source=None,
                eval_note="", tuning={"protocol": "peft_metamath", "role": None})
    store.write(ours)
    board = build_leaderboard(records_frame(load_records(out)))
    table = board.model_tables["Llama-3.2-3B"].set_index("method")
    assert {"peft/lora/llama-3.2-3B-rank32", "peft/lora/llama-3.2-3B-rank32" + MARK} <= set(table.index)
    assert "imported from PEFT's method comparison" in board.to_markdown()


def test_a_failed_peft_run_is_a_failed_record_and_an_empty_folder_an_error(tmp_path: Path, capsys) -> None:
    record = to_record(peft_result(status="canceled"), "c.json")
    assert record["status"] == "failed" and "out of memory" in record["error"]["message"] and not record["metrics"]
    (tmp_path / "empty").mkdir()
    assert main(["import-peft", str(tmp_path / "empty"), "--results", str(tmp_path / "out")]) == 1
    assert "no PEFT result JSON" in capsys.readouterr().err
    assert main(["import-peft", str(tmp_path / "missing"), "--results", str(tmp_path / "out")]) == 1

"""Every bad input ends `python -m bench` with one line on stderr, `error: <message>` naming the fix, and exit
status 2; HYDRA_FULL_ERROR=1 shows the traceback; a real crash keeps its traceback; a bad config never leaves a
completed record."""

from __future__ import annotations

from tests.reliability.cli import bench, lines, records


def one_error_line(out, *expected: str) -> str:
    """The single stderr line of a project error, with everything `expected` in it."""
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    err = out.stderr.splitlines()
    assert len(err) == 1, out.stderr[-3000:]
    assert err[0].startswith("error: "), err[0]
    for text in expected:
        assert text in err[0], (text, err[0])
    assert "Traceback" not in out.stdout + out.stderr
    return err[0]


def test_negative_max_steps_is_refused_before_training_and_leaves_no_completed_record(tmp_path):
    out = bench(tmp_path, "train.max_steps=-5")
    one_error_line(out, "train.max_steps=-5", "must be >= 1", "set train.max_steps=")
    (record,) = records(tmp_path)
    assert record["status"] == "failed" and record["error"]["type"] == "ConfigError"
    assert record["metrics"] == {} and record["curve"] == []
    assert not any(r["status"] == "completed" for r in records(tmp_path))


def test_seed_that_is_not_a_number_names_seed(tmp_path):
    one_error_line(bench(tmp_path, "seed=abc"), "seed='abc'", "integer", "set seed=0")
    assert records(tmp_path) == []  # the run id holds the seed: no record can be named


def test_rank_zero_is_one_line_and_a_failed_record(tmp_path):
    one_error_line(bench(tmp_path, "method.r=0"), "method.r=0", "rank r must be >= 1", "set method.r=8")
    (record,) = records(tmp_path)
    assert record["status"] == "failed" and record["error"]["type"] == "ConfigError"
    assert "rank r must be >= 1" in record["error"]["message"] and "method=lora" in record["error"]["message"]


def test_nan_learning_rate_is_one_line(tmp_path):
    one_error_line(bench(tmp_path, "method.lr=nan"), "method.lr=nan", "must be > 0", "set method.lr=0.001")


def test_target_modules_that_match_nothing_is_one_line(tmp_path):
    one_error_line(bench(tmp_path, "method.target_modules=[no_such_layer]"), "target_modules", "method.target_modules")
    (record,) = records(tmp_path)
    assert record["status"] == "failed" and record["error"]["type"] == "ConfigError"


def test_hub_id_offline_is_one_line_listing_only_offline_models(tmp_path):
    line = one_error_line(bench(tmp_path, "model=hf", "model.id=no-such-org/no-such-model"),
                          "no-such-org/no-such-model", "model=minilm")
    assert "model=hf" not in line  # the hub path is not an offline model


def test_full_error_shows_the_traceback(tmp_path):
    out = bench(tmp_path, "method.r=0", HYDRA_FULL_ERROR="1")
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_a_real_crash_keeps_its_traceback(tmp_path):
    out = bench(tmp_path, "method._target_=tests.reliability.crashing.CrashingLoRA")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" in out.stderr and "RuntimeError: boom" in out.stderr
    assert not out.stderr.startswith("error: ")


def test_unknown_method_and_task_suggest_the_close_option(tmp_path):
    line = one_error_line(bench(tmp_path, "+method=lorra"), "unknown method 'lorra'; did you mean lora?",
                          "(options: ", "pissa")
    assert line.endswith(")")
    line = one_error_line(bench(tmp_path, "+task=glue/sst3"), "unknown task 'glue/sst3'; did you mean glue/sst2?")
    assert "glue/cola" in line and "vision/cifar10" in line  # subtasks are options too
    one_error_line(bench(tmp_path, "model=tinybert"), "did you mean tiny_bert?")
    assert not (tmp_path / "runs").exists()


def test_tuning_errors_are_one_line(tmp_path):
    one_error_line(bench(tmp_path, "hydra/sweeper=tune", "-m"), "needs a tuning protocol", "protocol=cheap")
    one_error_line(bench(tmp_path, "hydra/sweeper=tune", "protocol=cheap", "protocol.trials=0", "-m"),
                   "trials must be >= 1")


def test_exploding_loss_ends_the_run_diverged_with_its_step(tmp_path):
    out = bench(tmp_path, "method.lr=1e3")
    assert out.returncode == 1, out.stderr[-3000:]
    err = lines(out.stderr)
    assert len(err) == 1 and err[0].startswith("diverged: ") and "loss exploded" in err[0], out.stderr[-3000:]
    (record,) = records(tmp_path)
    assert record["status"] == "diverged" and record["error"]["type"] == "Diverged"
    assert 1 <= record["error"]["step"] <= 6 and record["metrics"] == {}

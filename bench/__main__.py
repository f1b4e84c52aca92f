"""`python -m bench`: the Hydra entry point.

    python -m bench                                   # the embedded default (LoRA, SST-2, offline MiniLM)
    python -m bench +method=dora +task=glue/rte       # one cell
    python -m bench +method=lora,dora +task=glue -m   # a grid: one job per cell, GLUE suite expanded
    python -m bench --list methods                    # the method catalogue (also tasks, models, protocols, ...)

Two conveniences on top of plain Hydra, both applied to the command line before Hydra parses it:
- `+method=X` / `+task=X` / `+model=X` (the form users type) and `method=X` (the override form) mean the same:
  these groups always have a default, so the `+` is dropped.
- `-m` may stand anywhere among the overrides (plain argparse rejects overrides after it).
- A task that is a suite (conf/task/<name>.yaml with a `suite:` list, e.g. glue) expands into its subtasks and
  turns the command into a multirun.
- An unknown option of a group (`+method=lorra`, `task=glue/sst3`) ends the command at once with the close matches
  among every option, subfolders included (`glue/sst2`), instead of Hydra's list of the top level.

Errors: the project's own (a bad config value, a model that cannot be loaded, a search space that cannot be tuned,
a method's rejection of its configuration) print one line, `error: <message>` with the fix, on stderr and exit with
status 2; HYDRA_FULL_ERROR=1 shows their traceback. Any other exception is a crash and keeps its traceback. A single
run that diverged exits with status 1 (as a grid with a diverged cell does).
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bench.grid import LAST_GRID_PROBLEMS, write_cell_status

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS_WITH_DEFAULTS = ("method", "task", "model")
CHECKED_GROUPS = ("method", "task", "model", "experiment", "protocol", "tracker")  # conf/<group>/**/*.yaml
#: The project's error types (module, class name): printed as one line, not as a traceback. Matched by name so
#: that catching them imports nothing heavy (bench.models imports transformers, bench.tuning optuna).
PROJECT_ERRORS = {("bench.validate", "ConfigError"), ("bench.models", "ModelUnavailableError"),
                  ("bench.tuning", "TuningError"), ("bench.__main__", "UnknownOptionError")}
log = logging.getLogger("bench")
#: What the single run of this process left for main() to report: a project error, or a diverged record.
_OUTCOME: dict[str, Any] = {}


class UnknownOptionError(ValueError):
    """A group option (method, task, model, ...) that has no YAML file under conf/<group>."""


def group_options(group: str) -> list[str]:
    """Every option of a config group: conf/<group>/**/*.yaml without files starting with `_`, subfolders
    included (task: glue, glue/sst2, ..., vision/cifar10)."""
    root = CONF / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")
                  if not p.name.startswith("_"))


def check_option(group: str, value: str) -> None:
    """Raise UnknownOptionError naming the close matches when `value` is not an option of `group`."""
    options = group_options(group)
    if not options or value in options:
        return
    close = difflib.get_close_matches(value, options, n=3, cutoff=0.6)
    if close:  # the best match, and any other as close as it (within 0.05 of its similarity)
        score = {o: difflib.SequenceMatcher(None, value, o).ratio() for o in close}
        close = [o for o in close if score[o] >= score[close[0]] - 0.05]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UnknownOptionError(f"unknown {group} '{value}'{hint} (options: {', '.join(options)})")


def check_options(argv: list[str]) -> None:
    """Every `[+]group=a,b` of a checked group names existing options (sweep functions and interpolations are left
    to Hydra; so is everything when an extra config dir is given)."""
    if any(a.split("=")[0] in ("--config-dir", "-cd", "--config-path", "-cp") for a in argv):
        return
    for arg in argv:
        body = arg.lstrip("+~")
        group, sep, value = body.partition("=")
        if not sep or group not in CHECKED_GROUPS or any(c in value for c in "()[]{}$'\"\\"):
            continue
        for v in value.split(","):
            if v and v != "null":
                check_option(group, v.strip())


def is_project_error(e: BaseException) -> bool:
    """Whether `e`, or an exception it was raised from, is one of the project's error types, or Hydra's plain
    HydraException raised by this project's code (the tuning sweeper's messages name their fix too)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if any((k.__module__, k.__name__) in PROJECT_ERRORS for k in type(cur).__mro__):
            return True
        cur = cur.__cause__  # `raise ConfigError(...) from e`, the sweeper's `HydraException(...) from TuningError`
    if type(e).__name__ == "HydraException" and e.__traceback__ is not None:
        tb = e.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        where = Path(tb.tb_frame.f_code.co_filename).resolve()
        return CONF.parent in where.parents and ".venv" not in where.parts
    return False


def one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())


def report(e: BaseException) -> None:
    """The one line of a project error, on stderr, and exit status 2."""
    sys.stdout.flush()
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    sys.exit(2)


def full_error() -> bool:
    return bool(os.environ.get("HYDRA_FULL_ERROR"))


def suite_members(task: str) -> list[str] | None:
    """The subtasks of a suite option (conf/task/<task>.yaml with a `suite:` key), else None."""
    path = CONF / "task" / f"{task}.yaml"
    if not path.is_file():
        return None
    suite = OmegaConf.load(path).get("suite")
    return list(suite) if suite else None


def normalize_argv(argv: list[str]) -> list[str]:
    """Drop `+` on groups that have a default; expand suites (and ask for a multirun when one is expanded).
    Raises UnknownOptionError for an option that conf/<group> does not have."""
    check_options(argv)
    out, expanded = [], False
    for arg in argv:
        body = arg[1:] if arg.startswith("+") and not arg.startswith("++") else arg
        group, sep, value = body.partition("=")
        if sep and group in GROUPS_WITH_DEFAULTS:
            arg = body
        if sep and group == "task":
            values = []
            for v in value.split(","):
                members = suite_members(v)
                values += members or [v]
                expanded |= members is not None
            arg = f"task={','.join(values)}"
        out.append(arg)
    # argparse takes one run of positional overrides: `a=1 -m b=2` would reject `b=2`, so the flag goes first
    multirun = expanded or bool({"-m", "--multirun"} & set(out))
    rest = [a for a in out if a not in ("-m", "--multirun")]
    return ["--multirun", *rest] if multirun else rest


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> dict[str, Any]:
    from bench.run import run  # heavy imports after Hydra has parsed the command line

    hc = HydraConfig.get()
    try:
        record = run(cfg)
    except Exception as e:
        record = {"status": "failed", "id": getattr(e, "run_id", hc.job.override_dirname),
                  "error": {"type": type(e).__name__, "message": str(e)}}
        write_cell_status(hc.runtime.output_dir, record)
        if hc.mode.name != "MULTIRUN":  # a single run fails loudly; in a grid a failing cell never stops the others
            if is_project_error(e) and not full_error():
                _OUTCOME["error"] = e  # main() prints its one line once Hydra has finished the job
                return record
            raise
        if is_project_error(e):
            log.error("cell failed: %s (its record says why); the grid goes on", one_line(e))
        else:
            log.exception("cell failed (its record says why); the grid goes on")
        return record
    write_cell_status(hc.runtime.output_dir, record)
    if hc.mode.name != "MULTIRUN" and record.get("status") == "diverged":
        _OUTCOME["diverged"] = record
    return record


def _reporting_project_errors(run_and_report: Any) -> Any:
    """Hydra's run_and_report (it prints an exception's stack) with the project's errors printed as one line:
    those raised outside a job (the tuning sweeper checks every study before training)."""
    def wrapper(func: Any) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except Exception as e:
                if is_project_error(e) and not full_error():
                    report(e)
                raise
        return run_and_report(guarded)
    return wrapper


def list_group(what: str) -> str:
    """`--list methods`: the method catalogue (bench/catalogue.py); `--list <group>`: the group's options, each with
    the first line of its YAML's header comment."""
    group = what[:-1] if what.endswith("s") and what[:-1] in CHECKED_GROUPS + ("claim",) else what
    if group not in CHECKED_GROUPS + ("claim",):
        groups = ", ".join(g + "s" for g in (*CHECKED_GROUPS, "claim"))
        raise UnknownOptionError(f"--list {what}: nothing to list; choose one of {groups}")
    if group == "method":
        from bench.catalogue import entries, text_table

        return text_table(entries())
    from bench.catalogue import header_lines

    lines = []
    for option in group_options(group):
        head = header_lines(option, group)
        lines.append(f"{option:<28} {head[0] if head else ''}".rstrip())
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import hydra._internal.utils as hydra_utils

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--list":
        try:
            print(list_group(argv[1] if len(argv) > 1 else "methods"), end="")
        except UnknownOptionError as e:
            report(e)
        return
    try:
        sys.argv = [sys.argv[0], *normalize_argv(argv)]
    except UnknownOptionError as e:
        if full_error():
            raise
        report(e)
    _OUTCOME.clear()
    original = getattr(hydra_utils, "run_and_report", None)  # Hydra's private printer: wrapped while it runs
    if original is not None:
        hydra_utils.run_and_report = _reporting_project_errors(original)
    try:
        _hydra_main()
    finally:
        if original is not None:
            hydra_utils.run_and_report = original
    if "error" in _OUTCOME:
        report(_OUTCOME["error"])
    if "diverged" in _OUTCOME:
        record = _OUTCOME["diverged"]
        print(f"diverged: {record['id']}: {one_line_message(record)}", file=sys.stderr, flush=True)
        sys.exit(1)
    if LAST_GRID_PROBLEMS:
        sys.exit(1)


def one_line_message(record: dict[str, Any]) -> str:
    return " ".join(str((record.get("error") or {}).get("message") or "").split())


if __name__ == "__main__":
    main()

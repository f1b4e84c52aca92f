"""Command line: ``python -m analysis <command>``.

    python -m analysis leaderboard [--results results] [--out DIR]
    python -m analysis spectral    [--results results] [--out results/analysis] [--k 8]
    python -m analysis intruders   [--results results] [--out results/analysis] [--k 10] [--eps 0.5] [--mitigate]
    python -m analysis figure NAME [--results results] [--out results/figures]
    python -m analysis figure --list
    python -m analysis tuning      [--results results] [--out DIR]
    python -m analysis sharpness   [--reference results/zoo] [--results results/zoo_sharp] [--out DIR]
    python -m analysis claims      [--results-root .] [--out results/claims]
    python -m analysis merge       [--results results/merge] [--out DIR]
    python -m analysis continual   [--results results/merge] [--out DIR]
    python -m analysis unlearn     [--results results/unlearn] [--out DIR]
    python -m analysis generate    [--results results/generate] [--out DIR]
    python -m analysis explore     [--results results] [--out <results>/explorer.html]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pandas as pd

from analysis.leaderboard import NoRecordsError, load_leaderboard


#: The intruder table gets one column per run up to this many runs, one per method label beyond.
MAX_RUN_COLUMNS = 8


def _leaderboard(args: argparse.Namespace) -> int:
    """Write leaderboard.{md,csv,html}; print the paths and the Markdown tables."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            board = load_leaderboard(args.results)
        except NoRecordsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    out_dir = args.out if args.out is not None else args.results
    for path in board.write(out_dir):
        print(f"wrote {path}")
    print()
    print(board.to_markdown(details=False), end="")
    return 0


# ---------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _reported_warnings() -> Iterator[None]:
    """Collect warnings (skipped records, ...) and print them to stderr as ``warning: ...``, once each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            seen: set[str] = set()
            for warning in caught:
                text = str(warning.message)
                if text not in seen and not issubclass(warning.category, (DeprecationWarning, FutureWarning)):
                    seen.add(text)
                    print(f"warning: {text}", file=sys.stderr)


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the data errors an analysis raises (no records, no ΔW file) into ``error: ...`` and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        from analysis.weights import MissingDeltaError  # imports torch: only when an analysis runs

        try:
            with _reported_warnings():
                return command(args)
        except (NoRecordsError, MissingDeltaError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _out_dir(args: argparse.Namespace, default: str) -> Path:
    return args.out if args.out is not None else args.results / default


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def _print_paths(paths: Sequence[Path]) -> None:
    for path in paths:
        print(f"wrote {path}")


def _short_layers(names: Sequence[str]) -> dict[str, str]:
    """Layer names without their common leading components (``bert.encoder.layer.0.x`` → ``encoder.layer.0.x``)."""
    parts = [n.split(".") for n in names]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return {n: ".".join(p[common:]) for n, p in zip(names, parts)}


def _run_names(frame: pd.DataFrame) -> dict[str, str]:
    """A short column name per run id: ``LoRA r=8 s0``, with task/model added when they tell runs apart."""
    runs = frame.drop_duplicates("id").set_index("id")
    names = {i: f"{row.label} s{row.seed}" for i, row in runs.iterrows()}
    if len(set(names.values())) < len(names):
        names = {i: f"{row.label} s{row.seed} {row.task} {row.model}" for i, row in runs.iterrows()}
    if len(set(names.values())) < len(names):
        names = {i: str(i) for i in runs.index}
    return names


def _fmt(frame: pd.DataFrame, digits: int = 3) -> str:
    return frame.to_string(index=False, float_format=lambda x: f"{x:.{digits}g}")


# ---------------------------------------------------------------------------------------------- spectral


def _spectral(args: argparse.Namespace) -> int:
    """spectral.csv, spectrum.{png,pdf}, spectral_layers.{png,pdf}; prints a per-method summary."""
    from analysis.spectral import plot_spectral_layers, plot_spectrum, spectral_analysis, spectral_summary

    out = _out_dir(args, "analysis")
    result = spectral_analysis(args.results, k=args.k)
    _write_csv(result.frame, out / "spectral.csv")
    _print_paths(plot_spectrum(result, out))
    if result.frame["block"].notna().any():
        _print_paths(plot_spectral_layers(result.frame, out))
    summary = spectral_summary(result.frame)
    print(f"\nΔW spectra, median over runs × layers (energy and alignment over the top {args.k}; "
          f"alignment 1 = inside W0's top subspace, ≈ k/m for a random one):")
    print(_fmt(summary))
    return 0


# ---------------------------------------------------------------------------------------------- intruders


def _intruders(args: argparse.Namespace) -> int:
    """intruders.csv (run × layer × ε), intruders_total.csv, the two figures; mitigation.csv with --mitigate."""
    from analysis.intruders import (
        EPS_GRID,
        intruder_frame,
        intruder_totals,
        mitigation_frame,
        plot_intruders_vs_eps,
        plot_intruders_vs_rank,
        plot_mitigation,
    )
    from analysis.weights import records_with_deltas

    out = _out_dir(args, "analysis")
    grid = sorted(set(EPS_GRID) | {float(args.eps)})
    frame = intruder_frame(args.results, k=args.k, eps=grid)
    totals = intruder_totals(frame)
    _write_csv(frame, out / "intruders.csv")
    _write_csv(totals, out / "intruders_total.csv")
    _print_paths(plot_intruders_vs_rank(frame, out, eps=args.eps))
    _print_paths(plot_intruders_vs_eps(frame, out, mark_eps=args.eps))

    at = frame[(frame["eps"] - args.eps).abs() < 1e-9]
    names = _run_names(at)
    layers = _short_layers(list(dict.fromkeys(at["layer"])))
    many = len(names) > MAX_RUN_COLUMNS  # too many runs for one column each: mean over the seeds of a label
    columns = at["label"] if many else at["id"].map(names)
    per_layer = at.assign(run=columns, layer=at["layer"].map(layers)).pivot_table(
        index="layer", columns="run", values="intruders", aggfunc="mean" if many else "sum", sort=False)
    per_layer.loc["total"] = per_layer.sum()
    print(f"\nIntruder dimensions per layer at ε = {args.eps:g} (top {args.k} singular vectors of W0 + ΔW)"
          f"{', mean over runs of each method' if many else ''}:")
    print(per_layer.to_string(float_format=lambda x: f"{x:.3g}"))
    curve = totals.assign(run=totals["id"].map(names)).pivot_table(
        index="run", columns="eps", values="intruders", aggfunc="sum", sort=False)
    curve.columns = [f"ε={e:g}" for e in curve.columns]
    print("\nTotal intruder dimensions per run over ε:")
    print(curve.to_string())

    if args.mitigate:
        frames = []
        for record, run_dir in records_with_deltas(args.results):
            print(f"\nmitigating {record['id']} (λ = {', '.join(f'{x:g}' for x in args.lambdas)}) ...", flush=True)
            try:
                frames.append(mitigation_frame(record, args.lambdas, k=args.k, eps=args.eps, run_dir=run_dir,
                                               max_eval_samples=args.eval_limit))
            except (ValueError, FileNotFoundError) as exc:
                print(f"warning: skipping {record['id']}: {exc}", file=sys.stderr)
        if frames:
            mitigation = pd.concat(frames, ignore_index=True)
            _write_csv(mitigation, out / "mitigation.csv")
            _print_paths(plot_mitigation(mitigation, out))
            show = mitigation.assign(run=mitigation["id"].map(_run_names(mitigation)))[
                ["run", "lam", "intruders", "main_metric", "score", "score_recorded", "sts_spearman", "forgetting"]]
            print(f"\nIntruder mitigation (task score vs zero-shot STS-B Spearman of the encoder; pre-trained: "
                  f"{mitigation['sts_spearman_base'].iloc[0]:.4f}):")
            print(_fmt(show, 4))
        else:
            print("warning: no run could be mitigated", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- figure


def _figure(args: argparse.Namespace) -> int:
    """Render one named figure of ``analysis.figures``, or `all` of them (list them with --list)."""
    try:
        from analysis import figures
    except ImportError as exc:
        print(f"error: the figure registry analysis.figures could not be imported: {exc}", file=sys.stderr)
        return 1
    if args.list:
        for name, spec in figures.FIGURES.items():
            description = getattr(spec, "description", "")
            print(f"{name:<20} {description}".rstrip())
        return 0
    if not args.name:
        print("error: name a figure, or all (python -m analysis figure --list shows them)", file=sys.stderr)
        return 2
    if args.name != "all" and args.name not in figures.FIGURES:
        print(f"error: unknown figure {args.name!r}; known: all, {', '.join(figures.FIGURES)}", file=sys.stderr)
        return 2
    out = _out_dir(args, "figures")
    names = list(figures.FIGURES) if args.name == "all" else [args.name]
    failed = 0
    for name in names:
        try:
            _print_paths(figures.render(name, args.results, out))
        except ValueError as exc:  # includes the registry's FigureDataError (nothing to draw)
            print(f"error: {name}: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- parser


def _sharpness(args: argparse.Namespace) -> int:
    from analysis.sharpness import write_sharpness_report

    for path in write_sharpness_report(args.reference, args.results, args.out):
        print(f"wrote {path}")
    return 0


def _tuning(args: argparse.Namespace) -> int:
    from analysis.tuning import write_tuning_report

    paths = write_tuning_report(args.results, args.out)
    _print_paths(paths)
    print(paths[0].read_text(), end="")
    return 0


def _import_peft(args: argparse.Namespace) -> int:
    """PEFT method-comparison result JSONs -> records under <results>/runs (marked as PEFT's runs)."""
    from analysis.peft_import import import_dir

    if not args.source.exists():
        print(f"error: {args.source}: no such file or folder (give PEFT's method_comparison/MetaMathQA/results)",
              file=sys.stderr)
        return 1
    written, skipped = import_dir(args.source, args.results)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    print(f"imported {len(written)} PEFT result(s) into {args.results / 'runs'}"
          + (f"; skipped {len(skipped)}" if skipped else ""))
    if not written:
        print(f"error: no PEFT result JSON under {args.source}", file=sys.stderr)
        return 1
    print(f"next: python -m analysis leaderboard --results {args.results}")
    return 0


def _claims(args: argparse.Namespace) -> int:
    """claims.{md,csv} and one figure per claim with records: each paper's headline result checked on the records."""
    from analysis.claims import ClaimError, write_claims_report

    try:
        paths, results = write_claims_report(args.results_root, args.out, args.conf)
    except ClaimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_paths(paths[:2])
    print(f"figures: {len(paths) - 2} files (PNG and PDF, unchanged ones not redrawn)")
    print()
    for result in results:
        print(f"{result.claim.name:<28} {result.verdict_text}")
    return 0


#: the reports of the composite task families: command -> (writer "module:function", default results directory,
#: --help of the command, --help of --results); each writes its files, prints their paths and its Markdown report
FAMILY_REPORTS = {
    "merge": ("analysis.merging:write_merge_report", "results/merge",
              "adapter merging: each merger's share of the members' scores", "merge cells"),
    "continual": ("analysis.merging:write_continual_report", "results/merge",
                  "continual learning: average, backward and forward transfer",
                  "continual cells, beside the merge cells whose GLUE members they share"),
    "unlearn": ("analysis.unlearning:write_unlearn_report", "results/unlearn",
                "knowledge unlearning: forget and retain accuracy per objective", "unlearning cells"),
    "generate": ("analysis.generation:write_generation_report", "results/generate",
                 "adapter generation: generated against real adapters' scores", "generation cells"),
}


def _family_report(writer: str) -> Callable[[argparse.Namespace], int]:
    """The command of one FAMILY_REPORTS entry: write the report, print its paths, then its Markdown (the first
    path)."""
    def command(args: argparse.Namespace) -> int:
        module, function = writer.split(":")
        paths = getattr(importlib.import_module(module), function)(args.results, args.out)
        _print_paths(paths)
        print()
        print(paths[0].read_text(encoding="utf-8"), end="")
        return 0

    return command


def _explore(args: argparse.Namespace) -> int:
    """explorer.html: the leaderboard, Pareto plots and curves in one standalone page."""
    from analysis.explorer import write_explorer

    _print_paths([write_explorer(args.results, args.out)])
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per analysis."""
    parser = argparse.ArgumentParser(prog="python -m analysis", description="Analyse deltabench results.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def results_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--results", type=Path, default=Path("results"), help="results directory (default: results)")

    board = commands.add_parser("leaderboard", help="aggregate run records into leaderboard.{md,csv,html}")
    results_arg(board)
    board.add_argument("--out", type=Path, default=None, help="output directory (default: the results directory)")
    board.set_defaults(func=_leaderboard)

    spectral = commands.add_parser("spectral", help="singular values, effective rank, energy and alignment of each ΔW")
    results_arg(spectral)
    spectral.add_argument("--out", type=Path, default=None, help="output directory (default: <results>/analysis)")
    spectral.add_argument("--k", type=int, default=8, help="top-k of the energy and alignment (default: 8)")
    spectral.set_defaults(func=_guarded(_spectral))

    intruders = commands.add_parser("intruders", help="intruder dimensions of W0 + ΔW (arXiv 2410.21228)")
    results_arg(intruders)
    intruders.add_argument("--out", type=Path, default=None, help="output directory (default: <results>/analysis)")
    intruders.add_argument("--k", type=int, default=10, help="top-k singular vectors of W tested (default: 10)")
    intruders.add_argument("--eps", type=float, default=0.5, help="cosine threshold ε (default: 0.5)")
    intruders.add_argument("--mitigate", action="store_true",
                           help="also scale intruders by λ and score task vs forgetting (mitigation.csv; slow)")
    intruders.add_argument("--lambdas", type=_floats, default=[1.0, 0.75, 0.5, 0.25, 0.0],
                           help="λ grid of --mitigate, comma-separated (default: 1,0.75,0.5,0.25,0)")
    intruders.add_argument("--eval-limit", type=int, default=None,
                           help="--mitigate: score a fixed subset of this many eval rows (default: the whole split)")
    intruders.set_defaults(func=_guarded(_intruders))

    tuning = commands.add_parser("tuning", help="what tuning changed: default vs tuned scores, ranks, sharpness")
    results_arg(tuning)
    tuning.add_argument("--out", type=Path, default=None, help="output directory (default: the results directory)")
    tuning.set_defaults(func=_guarded(_tuning))

    sharp = commands.add_parser("sharpness", help="does λ_max at init predict the tuned lr and save trials?")
    sharp.add_argument("--reference", type=Path, default=Path("results/zoo"),
                       help="results directory of full-range tuned studies (default: results/zoo)")
    sharp.add_argument("--results", type=Path, default=None,
                       help="results directory of sharpness-guided studies (protocol=sharp), compared with them")
    sharp.add_argument("--out", type=Path, default=None, help="output directory (default: --results or --reference)")
    sharp.set_defaults(func=_guarded(_sharpness))

    explore = commands.add_parser("explore", help="explorer.html: sortable leaderboard, Pareto plots, curves (one file)")
    results_arg(explore)
    explore.add_argument("--out", type=Path, default=None, help="output file (default: <results>/explorer.html)")
    explore.set_defaults(func=_guarded(_explore))

    imp = commands.add_parser("import-peft", help="PEFT method-comparison result JSONs -> records (marked as PEFT's)")
    imp.add_argument("source", type=Path, help="a result JSON or a folder of them (method_comparison/MetaMathQA/results)")
    imp.add_argument("--results", type=Path, default=Path("results/peft"),
                     help="results directory to write records into (default: results/peft)")
    imp.set_defaults(func=_import_peft)

    claims = commands.add_parser("claims", help="each paper's headline claim (conf/claim) checked on the records")
    claims.add_argument("--results-root", type=Path, default=Path("."),
                        help="where the claims' results_dir paths start (default: .)")
    claims.add_argument("--out", type=Path, default=None,
                        help="output directory (default: <results-root>/results/claims)")
    claims.add_argument("--conf", type=Path, default=None, help="claim files (default: the repository's conf/claim)")
    claims.set_defaults(func=_guarded(_claims))

    for name, (writer, default, about, cells) in FAMILY_REPORTS.items():
        report = commands.add_parser(name, help=about)
        report.add_argument("--results", type=Path, default=Path(default),
                            help=f"results directory of {cells} (default: {default})")
        report.add_argument("--out", type=Path, default=None, help="output directory (default: the results directory)")
        report.set_defaults(func=_guarded(_family_report(writer)))

    figure = commands.add_parser("figure", help="render a named figure of analysis.figures")
    figure.add_argument("name", nargs="?", help="figure name (see --list), or all")
    figure.add_argument("--list", action="store_true", help="list the figure names and exit")
    results_arg(figure)
    figure.add_argument("--out", type=Path, default=None, help="output directory (default: <results>/figures)")
    figure.set_defaults(func=_guarded(_figure))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

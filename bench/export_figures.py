"""`make bench-export`: what the export measured, for exported files side by side.

For each ``--model NAME=FILE``: the file's size and kind, and the parity check re-run
against its own checkpoint (`meli-export --check`, on all titles of the run's validation
file): the graph against the torch module that computes what it computes, and the trained
checkpoint against onnxruntime. Then the calibration of the first model's run (the
temperature in the graph, the expected calibration error before and after, the coverage
table), measured out of sample by training (`meli.calibration.calibrate`). Writes one
Markdown page with ``--write``.

    python bench/export_figures.py --model default=artifacts/model.onnx --write docs/results-export.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
from pathlib import Path

from meli.calibration import coverage_table
from meli.export.export import choose_checkpoint, recheck
from meli.onnx_model import load_onnx_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=FILE (repeatable; the first one's calibration is shown)")
    ap.add_argument("--parity-rows", type=int, default=None, help="check only the first N titles (default: all)")
    ap.add_argument("--write", type=Path, help="also write the page to this Markdown file")
    args = ap.parse_args()
    models = [m.partition("=")[::2] for m in args.model]

    lines = [f"{dt.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} cores, onnxruntime CPU", "",
             "| export | file | kind | graph vs its torch module: max \\|Δp\\|, top-1 | checkpoint vs onnxruntime: max \\|Δp\\| (bound) "
             "| top-1 agreement with the checkpoint (floor) | titles |",
             "|---|---|---|---|---|---|---|"]
    first_run = None
    for name, file in models:
        card = load_onnx_model(file, provider="cpu").card
        first_run = first_run or card.provenance.get("mlflow_run_id")
        report = recheck(Path(file))
        lines.append(
            f"| {name} | {Path(file).stat().st_size / 1e6:.1f} MB | {card.encoding} ids, {report.precision} table, "
            f"{report.matmuls} products | {report.max_abs_diff:.1e}, {report.top1_agreement:.2%} | "
            f"{report.checkpoint_max_abs_diff:.1e} ({report.checkpoint_bound:.0e}) | "
            f"{report.checkpoint_top1_agreement:.2%} ({report.checkpoint_top1_agreement * report.rows:,.0f} of "
            f"{report.rows:,}; {report.min_checkpoint_agreement:.1%}) | {report.source} |")
    lines += ["", "The graph column holds onnxruntime to the torch module that computes what the graph computes "
              "(for int8 products: the twin that redoes the integer arithmetic); the checkpoint column holds it to the "
              "trained model on its full ids, which proves the compact encoding, the fused rows and the rounding together."]
    if first_run:
        m = choose_checkpoint(run_id=first_run).checkpoint.metrics
        folds = int(m.get("calibration_folds", 1))
        lines += ["", f"## Calibration of {models[0][0]}", "",
                  f"Measured by training on the validation titles of the train-only fit, "
                  f"{'out of sample (%d-fold cross-fit)' % folds if folds > 1 else 'in sample (this checkpoint holds no cross-fitted figures)'}: "
                  f"temperature {m['calibration_temperature']:.3f}; expected calibration error "
                  f"{m['calibration_ece_before']:.3f} → {m['calibration_ece_after']:.3f}; share of titles that can be "
                  f"taken at 99% accuracy (most confident first) {m['calibration_coverage_at_99_before']:.1%} → "
                  f"{m['calibration_coverage_at_99_after']:.1%}.", "", coverage_table(m)]
    print("\n".join(lines))
    if args.write:
        from results import write_results

        write_results(args.write, "Export: parity and calibration (`make bench-export`)", lines)


if __name__ == "__main__":
    main()

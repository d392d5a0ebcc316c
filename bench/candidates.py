"""`make bench-candidates`: every candidate tried for a more accurate default model, judged once.

One protocol for all: ``DATA/train`` is split 85/15 (seed 0) into fit' and choose'. Every
choice (each model's best epoch, early stopping) is made on choose'; every candidate is
judged once on ``DATA/validation``, which no choice touched. The refit rows then fit again on
fit' + choose' for the chosen epochs, as ``make train`` does with train + validation, and are
judged on the same validation titles. Scores are the checkpoints' own (torch, float); the
export's int8 products change them by under 0.0005 (`make bench-accuracy`).

The rows, in the order they run (each written to the page as soon as it is measured):

- single models of the members' shape and variants of it (wider embedding, wider hidden
  layer, more word dropout, other label smoothing, word vectors trained on the titles) and
  the word-level CNN;
- the TF-IDF + LinearSVC baseline, and ensembles (probabilities averaged) of five MLPs, with
  the CNN and with the SVM;
- students distilled from the five MLPs (`meli.train.distill`): today's recipe (over
  ``--student-seeds`` seeds, 3 by default, as is its refit below), new
  recombined titles every epoch, a 256-wide student, a student with less dropout, a student
  of five MLPs trained without label smoothing;
- the refit (``--only refit``): today's student refit, the five MLPs refit, and a student
  refit taught by the refit MLPs (``distill.refit_teachers``);
- teachers of another kind (``--only bigru``): a BiGRU over words and subword vectors
  (`bigru.py`), the five MLPs + the BiGRU (its weight chosen on choose'), their student, and
  that student refit;
- today's recipe 256 wide (``--only wide``): five MLPs with a 256-wide embedding, their
  ensemble, a 256-wide student of them, and its refit;
- a patient student (``--only patient``): twice the epochs on new recombined titles every
  epoch, and its refit.

    python bench/candidates.py --data ../shared/data/meli-es --write docs/results-candidates.md

About two and a half hours on 2 cores. ``--only SECTION`` measures one section (``main``:
single models, ensembles and students; ``refit``; ``bigru``; ``wide``; ``patient``) and keeps
the page's other rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meli.calibration import softmax  # noqa: E402
from meli.checkpoint import Checkpoint  # noqa: E402
from meli.dataset import LabelledSplit, load_labelled, split_holdout  # noqa: E402
from meli.metrics import balanced_accuracy  # noqa: E402
from meli.train.config import TrainConfig, load_config  # noqa: E402
from meli.train.distill import CheckpointTeacher, Teacher, WeightedTeachers, model_scores  # noqa: E402
from meli.train.recipe import ensemble_checkpoint, student_config  # noqa: E402
from meli.train.train import resolve_data  # noqa: E402
from meli.train.trainer import TrainResult, label_indices, train_model  # noqa: E402

CONFIGS = ROOT / "train" / "configs"


def with_settings(config: TrainConfig, **settings) -> TrainConfig:
    """`config` with ``section__key=value`` (or top-level ``key=value``) settings replaced."""
    for name, value in settings.items():
        section, _, key = name.rpartition("__")
        if section:
            config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{key: value})})
        else:
            config = dataclasses.replace(config, **{key: value})
    return config


@dataclasses.dataclass
class Bench:
    fit: LabelledSplit  # fit' (85% of train)
    choose: LabelledSplit  # choose' (15% of train): every choice
    judged: LabelledSplit  # DATA/validation: judged once
    labels: tuple[str, ...] = ()
    fits: dict = dataclasses.field(default_factory=dict)  # (name, seed) -> (checkpoint, best epoch)
    students: dict = dataclasses.field(default_factory=dict)  # (name, seed) -> TrainResult
    student_seeds: int = 3  # seeds of today's student and of its refit (the other students: seed 0)
    rows: list = dataclasses.field(default_factory=list)
    mlp: TrainConfig = dataclasses.field(default_factory=lambda: load_config(CONFIGS / "mlp.toml"))  # today's default

    @property
    def both(self) -> LabelledSplit:
        return LabelledSplit(pa.concat_arrays([self.fit.titles, self.choose.titles]),
                             pa.concat_arrays([self.fit.categories, self.choose.categories]), "fit' + choose'")

    def probabilities(self, checkpoint: Checkpoint, titles: pa.Array) -> np.ndarray:
        scores = model_scores(checkpoint.build_model(), checkpoint.tokenizer().encode_batch(titles), torch.device("cpu"))
        order = [checkpoint.labels.index(c) for c in self.labels]
        return softmax(scores)[:, order]

    def judge(self, probs: np.ndarray) -> float:
        return balanced_accuracy(label_indices(self.judged.categories, self.labels), probs.argmax(1))

    def single(self, name: str, config: TrainConfig, seed: int) -> tuple[Checkpoint, int]:
        """One model on fit', its epoch chosen on choose' (cached by name and seed)."""
        if (name, seed) not in self.fits:
            r = train_model(dataclasses.replace(config, seed=seed, members=1, refit=False), self.fit, self.choose, quiet=True)
            self.fits[name, seed] = (r.checkpoint, r.best_epoch)
        return self.fits[name, seed]

    def teachers(self) -> Checkpoint:
        """Today's teachers: five MLPs of mlp.toml (seeds 0-4) on fit', as one ensemble checkpoint."""
        return ensemble_checkpoint([self.single(MEMBERS, self.mlp, s)[0] for s in range(5)])

    @property
    def student_base(self) -> TrainConfig:
        """Today's student's settings, without the refit."""
        return student_config(dataclasses.replace(self.mlp, refit=False))

    def student(self, name: str, config: TrainConfig, teacher: Checkpoint | Teacher) -> TrainResult:
        """One student on fit', taught by `teacher` (trained on fit'), its epoch chosen on choose' (cached by
        name and seed)."""
        if (name, config.seed) not in self.students:
            self.students[name, config.seed] = train_model(config, self.fit, self.choose, quiet=True, teacher=teacher,
                                                           teacher_saw=len(self.fit))
        return self.students[name, config.seed]

    def refit(self, config: TrainConfig, student: TrainResult, teacher: Checkpoint | Teacher,
              teacher_saw: int | None = None) -> Checkpoint:
        """`student`'s refit on fit' + choose' for its chosen epochs, taught by `teacher`, which trained on
        the first `teacher_saw` of them (by default fit': the selection fits)."""
        saw = len(self.fit) if teacher_saw is None else teacher_saw
        return train_model(dataclasses.replace(config, epochs=student.best_epoch), self.both, self.choose, quiet=True,
                           keep="last", teacher=teacher, teacher_saw=saw).checkpoint

    def record(self, group: str, name: str, scores: list[float], seconds: float) -> None:
        spread = f" ({min(scores):.4f}-{max(scores):.4f})" if len(scores) > 1 else ""
        self.rows.append(f"| {group} | {name} | {np.mean(scores):.4f}{spread} | {len(scores)} | {seconds:.0f} s |")
        print(self.rows[-1], file=sys.stderr, flush=True)


MEMBERS = "one MLP of the members' shape (mlp.toml)"
TODAYS_STUDENT = "today's student: recombined titles x2, one set"
WIDE = "one MLP, embedding 256 wide (128)"


def singles(bench: Bench, write, name: str, config: TrainConfig, seeds: range) -> None:
    """One row: single models of `config` (cached by name and seed), over `seeds`."""
    t = time.perf_counter()
    scores = [bench.judge(bench.probabilities(bench.single(name, config, s)[0], bench.judged.titles)) for s in seeds]
    bench.record("single model", name, scores, (time.perf_counter() - t) / len(seeds))
    write()


def student_and_refit(bench: Bench, write, name: str, refit_name: str, config: TrainConfig,
                      teacher: Checkpoint | Teacher) -> None:
    """Two rows: a student (seed 0) taught by `teacher`, and its refit."""
    t = time.perf_counter()
    r = bench.student(name, config, teacher)
    bench.record("student (one MLP distilled from an ensemble)", name,
                 [bench.judge(bench.probabilities(r.checkpoint, bench.judged.titles))], time.perf_counter() - t)
    write()
    t = time.perf_counter()
    refit = bench.refit(config, r, teacher)
    bench.record("refit on fit' + choose'", refit_name, [bench.judge(bench.probabilities(refit, bench.judged.titles))],
                 time.perf_counter() - t)
    write()


def run_main(bench: Bench, write) -> None:
    """Single models, ensembles and students, all on fit'."""
    mlp, cnn = bench.mlp, load_config(CONFIGS / "cnn.toml")

    singles(bench, write, MEMBERS, mlp, range(5))
    singles(bench, write, WIDE, with_settings(mlp, mlp__embedding_dim=256), range(2))
    singles(bench, write, "one MLP, hidden layer 1,024 wide (512)", with_settings(mlp, mlp__hidden=(1024,)), range(2))
    singles(bench, write, "one MLP, word dropout 0.4 (0.3)", with_settings(mlp, mlp__embedding_dropout=0.4), range(2))
    singles(bench, write, "one MLP, label smoothing 0.3 (0.2)", with_settings(mlp, label_smoothing=0.3), range(2))
    singles(bench, write, "one MLP, no label smoothing (0.2)", with_settings(mlp, label_smoothing=0.0), range(5))
    singles(bench, write, "one MLP, word vectors trained on the fit' titles (gensim FastText skip-gram; random)",
            with_settings(mlp, embeddings__init="fasttext"), range(1))
    singles(bench, write, "one word-level CNN (cnn.toml)", cnn, range(1))

    t = time.perf_counter()
    svm = svm_probabilities(bench)
    bench.record("single model", "TF-IDF word 1-2 + char_wb 2-5, LinearSVC (decision x 5 as scores)",
                 [bench.judge(svm)], time.perf_counter() - t)
    judged_probs = [bench.probabilities(bench.single(MEMBERS, mlp, s)[0], bench.judged.titles) for s in range(5)]
    cnn_probs = bench.probabilities(bench.single("one word-level CNN (cnn.toml)", cnn, 0)[0], bench.judged.titles)
    for name, parts in (("five MLPs (seeds 0-4): the teachers", judged_probs),
                        ("five MLPs + the CNN", judged_probs + [cnn_probs]),
                        ("five MLPs + the SVM", judged_probs + [svm])):
        bench.record("ensemble (probabilities averaged)", name, [bench.judge(sum(parts) / len(parts))], 0.0)
    write()

    teachers = bench.teachers()
    ls0 = ensemble_checkpoint([bench.single("one MLP, no label smoothing (0.2)", with_settings(mlp, label_smoothing=0.0), s)[0]
                               for s in range(5)])
    base = bench.student_base
    students = [
        (TODAYS_STUDENT, base, teachers),
        ("new recombined titles every epoch (distill.fresh)", with_settings(base, distill__fresh=True), teachers),
        ("student 256 wide", with_settings(base, mlp__embedding_dim=256), teachers),
        ("student with dropout and word dropout 0.1 (0.3)", with_settings(base, mlp__dropout=0.1, mlp__embedding_dropout=0.1),
         teachers),
        ("student of five MLPs trained without label smoothing", base, ls0),
    ]
    for name, config, teacher in students:
        seeds = range(bench.student_seeds if name == TODAYS_STUDENT else 1)
        t = time.perf_counter()
        scores = [bench.judge(bench.probabilities(bench.student(name, with_settings(config, seed=s), teacher).checkpoint,
                                                  bench.judged.titles)) for s in seeds]
        bench.record("student (one MLP distilled from an ensemble)", name, scores, (time.perf_counter() - t) / len(seeds))
        write()


def run_refit(bench: Bench, write) -> None:
    """The refit, as `make train` does it: fit' + choose' for the epochs chosen on choose'."""
    mlp, teachers, both = bench.mlp, bench.teachers(), bench.both
    t, scores = time.perf_counter(), []
    for seed in range(bench.student_seeds):
        student = with_settings(bench.student_base, seed=seed)
        refit = bench.refit(student, bench.student(TODAYS_STUDENT, student, teachers), teachers)
        scores.append(bench.judge(bench.probabilities(refit, bench.judged.titles)))
    bench.record("refit on fit' + choose'", "today's recipe: the student refit, taught by the teachers' selection fits",
                 scores, (time.perf_counter() - t) / bench.student_seeds)
    write()
    t = time.perf_counter()
    refits = []
    for s in range(5):
        epochs = bench.single(MEMBERS, mlp, s)[1]
        refits.append(train_model(dataclasses.replace(mlp, seed=s, members=1, refit=False, epochs=epochs), both, bench.choose,
                                  quiet=True, keep="last").checkpoint)
    refit_teachers = ensemble_checkpoint(refits)
    bench.record("refit on fit' + choose'", "the five MLPs refit (ensemble)",
                 [bench.judge(bench.probabilities(refit_teachers, bench.judged.titles))], (time.perf_counter() - t) / 5)
    write()
    t = time.perf_counter()
    refit = bench.refit(bench.student_base, bench.student(TODAYS_STUDENT, bench.student_base, teachers), refit_teachers,
                        teacher_saw=len(both))
    bench.record("refit on fit' + choose'", "the student refit, taught by the refit MLPs (distill.refit_teachers)",
                 [bench.judge(bench.probabilities(refit, bench.judged.titles))], time.perf_counter() - t)
    write()


def run_bigru(bench: Bench, write) -> None:
    """Teachers of another kind: does a BiGRU beside the five MLPs make a better student?"""
    from bigru import fit_bigru

    t = time.perf_counter()
    gru, _ = fit_bigru(bench.fit, bench.choose, bench.labels)
    bench.record("single model", "one BiGRU over words + subword vectors (bench/bigru.py)",
                 [bench.judge(gru.probabilities(bench.judged.titles))], time.perf_counter() - t)
    write()
    teachers = bench.teachers()

    # (five MLPs, BiGRU) probabilities of each split, once: the weight is chosen on choose'
    choose_p, judged_p = [(bench.probabilities(teachers, titles), gru.probabilities(titles))
                          for titles in (bench.choose.titles, bench.judged.titles)]

    def mixed(weight: float, probs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return (1 - weight) * probs[0] + weight * probs[1]

    choose_y = label_indices(bench.choose.categories, bench.labels)
    weight = max((0.1, 0.2, 0.3, 0.4, 0.5), key=lambda w: balanced_accuracy(choose_y, mixed(w, choose_p).argmax(1)))
    bench.record("ensemble (probabilities averaged)", f"five MLPs + the BiGRU (its weight {weight}, chosen on choose')",
                 [bench.judge(mixed(weight, judged_p))], 0.0)
    write()
    panel = WeightedTeachers((CheckpointTeacher(teachers), gru), (1 - weight, weight))
    student_and_refit(bench, write, "student of five MLPs + the BiGRU",
                      "the student of five MLPs + the BiGRU refit, taught by their selection fits", bench.student_base, panel)


def run_wide(bench: Bench, write) -> None:
    """Today's whole recipe 256 wide: five teachers with a 256-wide embedding, their student of
    the same width, and its refit (the file would need an int8 table to stay under 64 MB)."""
    wide = with_settings(bench.mlp, mlp__embedding_dim=256)
    singles(bench, write, WIDE, wide, range(5))
    teachers = ensemble_checkpoint([bench.single(WIDE, wide, s)[0] for s in range(5)])
    bench.record("ensemble (probabilities averaged)", "five MLPs 256 wide (seeds 0-4)",
                 [bench.judge(bench.probabilities(teachers, bench.judged.titles))], 0.0)
    write()
    student_and_refit(bench, write, "student 256 wide of five MLPs 256 wide",
                      "today's recipe 256 wide: its student refit, taught by its teachers' selection fits",
                      with_settings(bench.student_base, mlp__embedding_dim=256), teachers)


def run_patient(bench: Bench, write) -> None:
    """A patient student: twice the epochs, new recombined titles every epoch, and the early
    stopping's patience doubled so that the longer schedule runs out (today's teachers)."""
    student_and_refit(bench, write, "patient student: 30 epochs (15), new recombined titles every epoch, patience 10 (5)",
                      "the patient student refit, taught by the teachers' selection fits",
                      with_settings(bench.student_base, epochs=30, patience=10, distill__fresh=True), bench.teachers())


def svm_probabilities(bench: Bench) -> np.ndarray:
    from accuracy import svm_pipeline

    model = svm_pipeline()
    model.fit(bench.fit.titles.to_pylist(), bench.fit.categories.to_pylist())
    order = [list(model.classes_).index(c) for c in bench.labels]
    return softmax(model.decision_function(bench.judged.titles.to_pylist())[:, order] * 5.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "meli-es"))
    ap.add_argument("--write", type=Path, help="also write the table to this Markdown file (make bench-candidates: "
                    "docs/results-candidates.md)")
    ap.add_argument("--only", choices=SECTIONS, help="measure one section and keep the --write page's other rows")
    ap.add_argument("--student-seeds", type=int, default=Bench.student_seeds, metavar="N",
                    help="seeds of today's student and of its refit (seed 0 alone for the other students)")
    args = ap.parse_args()
    source = resolve_data(args.data)
    if source.validation is None:
        sys.exit(f"{args.data}: needs a validation file")
    fit, choose = split_holdout(load_labelled(source.train), 0.15, seed=0)
    bench = Bench(fit, choose, load_labelled(source.validation), student_seeds=args.student_seeds)
    bench.labels = tuple(sorted(set(fit.categories.to_pylist())))
    started = time.perf_counter()
    kept = kept_rows(args.write) if args.only and args.write else []

    def write() -> None:
        lines = [f"{dt.date.today()}, {platform.machine()} {os.cpu_count()} cores; fit' {len(fit):,} and choose' "
                 f"{len(choose):,} titles (85/15 of {source.train.name}, seed 0; every choice on choose'), judged once "
                 f"on {len(bench.judged):,} ({source.validation.name}); {(time.perf_counter() - started) / 60:.0f} minutes "
                 "so far" + (f" (--only {args.only}; {len(kept)} rows kept from earlier runs)" if kept else ""), "",
                 "In brackets: the setting of today's default. Seeds: runs of that row (the mean, then the lowest and "
                 "highest).", "",
                 "| kind | candidate | balanced accuracy on the judged titles | seeds | seconds per fit |",
                 "|---|---|---|---|---|", *merged(kept, bench.rows)]
        if args.write:
            from results import write_results

            write_results(args.write, "Accuracy candidates for the default model (`make bench-candidates`)", lines)
        else:
            print("\n".join(lines))

    for name, section in SECTIONS.items():
        if args.only in (None, name):
            section(bench, write)


SECTIONS = {"main": run_main, "refit": run_refit, "bigru": run_bigru, "wide": run_wide, "patient": run_patient}


def kept_rows(page: Path) -> list[str]:
    """The table rows of an earlier run's page (none if there is no page yet)."""
    if not page.is_file():
        return []
    return [line for line in page.read_text().splitlines() if line.startswith("| ") and not line.startswith("| kind ")]


def merged(kept: list[str], new: list[str]) -> list[str]:
    """The earlier rows, each replaced by this run's row of the same kind and candidate (its
    name without the brackets, which may hold what a run chose, such as a weight); this run's
    other rows after them."""
    def key(row: str) -> tuple[str, str]:
        kind, candidate = row.split(" | ")[:2]
        return kind, re.sub(r" \([^)]*\)", "", candidate)

    fresh = {key(r): r for r in new}
    out = [fresh.pop(key(r), r) for r in kept]
    return out + [r for r in new if key(r) in fresh]


if __name__ == "__main__":
    main()

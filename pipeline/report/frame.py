"""Runs -> the study frame: run records, epoch histories and evaluation.json payloads as one
`Study` of pandas DataFrames (no MLflow here).

runs.compare_runs fetches the runs (tracking.run_records), metric histories and artifacts
through tracking.py and hands them to `build_study`, as scripts/untracked.py does with runs that
were never tracked; report.tables and report.render read the Study it returns. What the report
reasons on (norm, norm_batch, the row's label) is a column, never parsed back from a label.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.config import BATCH_STATISTICS_NORMS, NORMS, TTA_BEFORE_PARAM, TrainConfig
from pipeline.engine import EpochMetrics
from pipeline.records import RunRecord, recipe_value

# tracking.DIVERGED_TAG (the report does not import tracking.py, which imports MLflow).
DIVERGED_TAG = "diverged"
# Parameters shown per norm; a value that differs between a norm's runs is shown as "a/b".
TABLE_PARAMS = (
    "num_params",
    "groups",
    "epochs",
    "batch_size",
    "norm_batch",
    "optimizer",
    "learning_rate",
    "momentum",
    "weight_decay",
    "dropout",
    "label_smoothing",
    "warmup_epochs",
    "activation",
    "pool",
    "val_size",
)
# What a train run trains: every TrainConfig setting but its seed, its data and split (pairing
# covers those) and where and how it computes. A lever table holds those that vary among a
# norm's runs and are not grouped by at the norm's recipe (report.levers).
_NOT_TRAINING = (
    "norm",
    "seed",
    "data",
    "stats",
    "val_size",
    "device",
    "precision",
    "compile",
    "cuda_graphs",
    "registered_model",
    "resume",
)
TRAINING_SETTINGS = tuple(
    field.name for field in dataclasses.fields(TrainConfig) if field.name not in _NOT_TRAINING
)
# An evaluate run's metrics the study frame keeps (evaluation.py logs them), and its cells'.
EVALUATION_METRICS = (
    "test_ece",
    "test_nll",
    "test_brier",
    "temperature",
    "test_ece_calibrated",
    "corruption_acc",
    "corruption_ece",
)
CELL_PREFIX = "corruption_acc/"
# A row of the per-norm table and a line of the curves, keyed by the train runs' columns.
LINE_COLUMNS = ["label", "norm", "statistics_group"]


@dataclass(frozen=True)
class Study:
    """A study's runs as tables: one row per train run, per epoch, and per evaluated class."""

    # run_id, run_name, norm, statistics_group, label, seed, TABLE_PARAMS... (norm_batch an int,
    # 0 = the whole batch), group_by params..., val_digest, diverged, run_minutes
    train: pd.DataFrame
    history: pd.DataFrame  # run_id, norm, label, seed, epoch, train_loss, ..., epoch_seconds
    per_class: pd.DataFrame  # run_id, norm, seed, class, accuracy (from evaluation.json)
    misclassified: dict[str, Path]  # norm -> plots/misclassified.png of its first seed
    source: str  # what was compared, for the report's first line
    # Train-run params whose values split each norm's runs into the rows of the lever table.
    group_by: tuple[str, ...] = ()
    # One row per evaluate run: run_id, run_name, norm, seed, source_run_id, test_acc, tta,
    # bn_stats, the calibration metrics (test_ece, ...) and, where it evaluated a corruption
    # suite, corruption_acc, corruption_ece and a column per cell (corruption_acc/<name>/<s>).
    evaluated: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)
    # evaluate run id -> its evaluation.json's `calibration` (metrics, reliability bins).
    reliability: dict[str, dict] = dataclasses.field(default_factory=dict)
    # Train runs that stopped on a non-finite loss (FAILED, tagged `diverged`), as `train`'s
    # rows with the error in `diverged`: named by the findings, counted in no mean.
    diverged: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)
    # One row per train run, diverged ones too: run_id and each of TRAINING_SETTINGS as the
    # run trained with it (its resolved recipe value); "" where the run predates the setting.
    settings: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)

    @property
    def norms(self) -> list[str]:
        return ordered_norms(self.train["norm"])

    @property
    def lines(self) -> pd.DataFrame:
        """The rows of the per-norm table and the lines of the curves: label, norm and
        statistics_group, in the registry's norm order, each norm's from its smallest
        statistics group up (the whole batch last)."""
        rows = self.train.assign(_groups=self.train["norm_batch"].where(lambda n: n > 0, math.inf))
        ordered = [
            rows[rows["norm"] == norm].sort_values("_groups", kind="stable") for norm in self.norms
        ]
        if not ordered:
            return pd.DataFrame(columns=LINE_COLUMNS)
        lines = pd.concat(ordered)[LINE_COLUMNS]
        return lines.drop_duplicates("label").reset_index(drop=True)

    @property
    def labels(self) -> list[str]:
        return list(self.lines["label"])

    def line_names(self, name: str) -> dict[str, str]:
        """label -> the same row named by `row_label(..., name=name)` (a figure's title)."""
        return {
            line.label: row_label(line.norm, line.statistics_group, name=name)
            for line in self.lines.itertuples(index=False)
        }


def row_label(norm: str, statistics_group: str = "", *, name: str = "{norm}") -> str:
    """What a row of the per-norm table and a line of the curves is called, the one place it is
    spelled: the norm, `name` formatted with it ("**{norm}** norm" in the findings), followed by
    its statistics group where the norm's runs are split by one: `batch (norm_batch 8)`."""
    head = name.format(norm=norm)
    return f"{head} ({statistics_group})" if statistics_group else head


def statistics_groups(train: pd.DataFrame) -> pd.Series:
    """Per train run: "" or, for a norm with batch statistics whose runs differ in `norm_batch`
    (a batch-dependence sweep), its statistics group, `norm_batch 8` or `whole batch`, so that
    runs of different statistics are never pooled into one mean."""
    groups = pd.Series("", index=train.index, dtype=object)
    for norm in BATCH_STATISTICS_NORMS:
        mine = train["norm"] == norm
        if train.loc[mine, "norm_batch"].nunique() < 2:
            continue
        groups[mine] = [
            f"norm_batch {size}" if size > 0 else "whole batch"
            for size in train.loc[mine, "norm_batch"]
        ]
    return groups


def norm_batch_value(value) -> int:
    """A logged `norm_batch` as the images per statistics group: 0, the whole batch, where it is
    0 or was not logged (runs from before the parameter)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0
    return int(number) if number > 0 else 0


def ordered_norms(names) -> list[str]:
    """The distinct norms in `names`: the registered ones in the registry's order (batch,
    group, layer, ...), anything else after, sorted."""
    present = set(names)
    return [n for n in NORMS if n in present] + sorted(present - set(NORMS))


def build_study(
    runs: Sequence[RunRecord],
    histories: Mapping[str, Sequence[EpochMetrics]],
    *,
    evaluations: Mapping[str, dict] | None = None,
    misclassified: Mapping[str, Path] | None = None,
    source: str = "",
    group_by: Sequence[str] = (),
) -> Study:
    """Assemble a Study from the runs' records (tracking.run_records, or made by hand for runs
    never tracked), each train run's epoch records, the evaluate runs' evaluation.json payloads
    and the train runs' misclassified grids (by run id)."""
    runs = list(runs)
    group_by = tuple(group_by)
    trained = train_runs(runs, extra_params=group_by)
    is_diverged = trained["diverged"] != ""
    train = trained[~is_diverged].reset_index(drop=True)
    at = train.columns.get_loc("norm") + 1
    train.insert(at, "statistics_group", statistics_groups(train))
    train.insert(
        at + 1,
        "label",
        [row_label(*row) for row in zip(train["norm"], train["statistics_group"], strict=True)],
    )
    evaluated = _evaluated(runs)
    return Study(
        train=train,
        history=_history(train, histories),
        per_class=_per_class(_one_evaluation_per_model(evaluated, runs), evaluations or {}),
        misclassified=_first_grids(train, misclassified or {}),
        source=source,
        group_by=group_by,
        evaluated=evaluated,
        diverged=trained[is_diverged].reset_index(drop=True),
        settings=training_settings(runs, trained["run_id"]),
        reliability={
            run_id: payload["calibration"]
            for run_id, payload in (evaluations or {}).items()
            if isinstance(payload.get("calibration"), dict)
        },
    )


def _history(train: pd.DataFrame, histories: Mapping[str, Sequence[EpochMetrics]]) -> pd.DataFrame:
    """One row per train run and epoch: run_id, norm, label, seed and the epoch's record."""
    rows = [
        {
            "run_id": run.run_id,
            "norm": run.norm,
            "label": run.label,
            "seed": run.seed,
            **vars(record),
        }
        for run in train.itertuples(index=False)
        for record in histories.get(run.run_id, ())
    ]
    fields = [field.name for field in dataclasses.fields(EpochMetrics)]
    return pd.DataFrame(rows, columns=["run_id", "norm", "label", "seed", *fields])


def _evaluated(runs: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per evaluate run: its model's train run (`source_run_id`), its test accuracy
    and the test-time augmentation it evaluated with."""
    evaluated = step_runs(runs, "evaluate")
    picked = [runs[index] for index in evaluated.index]
    evaluated["source_run_id"] = [_unquote(run.tags.get("source_run_id")) for run in picked]
    evaluated["test_acc"] = pd.to_numeric(
        pd.Series(
            [run.metrics.get("test_acc") for run in picked], index=evaluated.index, dtype=object
        ),
        errors="coerce",
    )
    evaluated["tta"] = [_logged_tta(run) for run in picked]
    # Batch norm's statistics at evaluation; runs from before the tag used the running ones.
    evaluated["bn_stats"] = [_unquote(run.tags.get("bn_stats")) or "running" for run in picked]
    names = dict.fromkeys(
        name
        for run in picked
        for name in run.metrics
        if name in EVALUATION_METRICS or name.startswith(CELL_PREFIX)
    )
    for name in names:
        values = [run.metrics.get(name) for run in picked]
        evaluated[name] = pd.to_numeric(
            pd.Series(values, index=evaluated.index, dtype=object), errors="coerce"
        )
    return evaluated.reset_index(drop=True)


def _per_class(evaluated: pd.DataFrame, evaluations: Mapping[str, dict]) -> pd.DataFrame:
    """One row per evaluated model and class, from its evaluation.json."""
    rows = [
        {
            "run_id": run.run_id,
            "norm": run.norm,
            "seed": run.seed,
            "class": name,
            "accuracy": float(accuracy),
        }
        for run in evaluated.itertuples(index=False)
        for name, accuracy in (evaluations.get(run.run_id) or {})
        .get("per_class_accuracy", {})
        .items()
    ]
    return pd.DataFrame(rows, columns=["run_id", "norm", "seed", "class", "accuracy"])


def _first_grids(train: pd.DataFrame, misclassified: Mapping[str, Path]) -> dict[str, Path]:
    """norm -> the misclassified grid of its first seed that has one."""
    grids: dict[str, Path] = {}
    for run in train.sort_values(["norm", "seed"]).itertuples(index=False):
        path = misclassified.get(run.run_id)
        if path is not None and run.norm not in grids:
            grids[run.norm] = Path(path)
    return grids


def _logged_tta(run: RunRecord) -> str:
    """The `tta` param of a run; runs from before the param existed evaluated with flip."""
    tta = _unquote(run.params.get("tta"))
    return TTA_BEFORE_PARAM if tta is None else tta


def _one_evaluation_per_model(evaluated: pd.DataFrame, runs: Sequence[RunRecord]) -> pd.DataFrame:
    """One evaluate run per model: the one that used the test-time augmentation its training
    run evaluated with (what `evaluate` does by default), else the first. A model evaluated
    several ways (for the TTA table) thus counts once, as its training saw it, per class."""
    trained_tta = pd.Series(
        [_logged_tta(run) for run in runs], index=[run.run_id for run in runs], dtype=object
    )
    # A model trained outside the compared runs: evaluated as train's default would have.
    expected = evaluated["source_run_id"].map(trained_tta).fillna(TrainConfig().tta)
    ranked = evaluated.assign(_mismatch=evaluated["tta"] != expected)
    ranked = ranked.sort_values("_mismatch", kind="stable")
    model = ranked["source_run_id"].fillna(ranked["run_id"])
    return ranked[~model.duplicated()].drop(columns="_mismatch").sort_index()


def train_runs(runs: Sequence[RunRecord], *, extra_params: Sequence[str] = ()) -> pd.DataFrame:
    """One row per train run: run id and name, norm, seed, the TABLE_PARAMS and `extra_params`
    (a recipe parameter as the run resolved it: `recipe_value`), and the run's wall time in
    minutes (start to end, as the tracking store recorded them)."""
    rows = step_runs(runs, "train")
    picked = [runs[index] for index in rows.index]
    for name in dict.fromkeys([*TABLE_PARAMS, *extra_params]):
        rows[name] = pd.Series(
            [_unquote(recipe_value(run.params, name)) for run in picked],
            index=rows.index,
            dtype=object,
        )
    rows["norm_batch"] = [norm_batch_value(value) for value in rows["norm_batch"]]
    # Which training images validated: only runs on the same split are ever paired. Runs from
    # before the split existed, or with val_size 0, have none ("").
    rows["val_digest"] = [run.params.get("val_digest") or "" for run in picked]
    # The error of a training stopped on a non-finite loss; "" for every other run.
    rows["diverged"] = [run.tags.get(DIVERGED_TAG) or "" for run in picked]
    started = pd.to_datetime(pd.Series([run.start_time for run in picked], dtype=object), utc=True)
    ended = pd.to_datetime(pd.Series([run.end_time for run in picked], dtype=object), utc=True)
    rows["run_minutes"] = ((ended - started).dt.total_seconds() / 60).to_numpy()
    return rows.reset_index(drop=True)


def training_settings(runs: Sequence[RunRecord], run_ids: Sequence[str]) -> pd.DataFrame:
    """run_id and each of TRAINING_SETTINGS per run in `run_ids`, as the run resolved it;
    "" where it logged no such param (it predates the setting)."""
    by_id = {run.run_id: run for run in runs}
    rows = []
    for run_id in run_ids:
        params = by_id[run_id].params
        row = {name: _unquote(recipe_value(params, name)) for name in TRAINING_SETTINGS}
        row = {name: "" if value is None else value for name, value in row.items()}
        rows.append({"run_id": run_id, **row})
    return pd.DataFrame(rows, columns=["run_id", *TRAINING_SETTINGS], dtype=object)


def step_runs(runs: Sequence[RunRecord], step: str) -> pd.DataFrame:
    """Runs of one step (`train`, `evaluate`) with run id, run name, norm and seed, indexed by
    their position in `runs`."""
    rows = {
        index: {
            "run_id": run.run_id,
            "run_name": run.run_name,
            "norm": _unquote(_param_or_tag(run, "norm")),
            "seed": _unquote(_param_or_tag(run, "seed")),
        }
        for index, run in enumerate(runs)
        if run.is_step(step)
    }
    frame = pd.DataFrame(
        list(rows.values()), index=list(rows), columns=["run_id", "run_name", "norm", "seed"]
    )
    frame["seed"] = pd.to_numeric(frame["seed"], errors="coerce").astype("Int64")
    return frame[frame["norm"].notna()]


def _param_or_tag(run: RunRecord, name: str) -> str | None:
    """The param `name`, else the tag (evaluate runs tag their model's norm and seed)."""
    value = run.params.get(name)
    return run.tags.get(name) if value is None else value


def _unquote(value):
    """Params that `mlflow run` logged shell-quoted (`'~/data'`) read back as typed."""
    if isinstance(value, str) and value[:1] in ("'", '"'):
        try:
            return " ".join(shlex.split(value))
        except ValueError:
            return value
    return value

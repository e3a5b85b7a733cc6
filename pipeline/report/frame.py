"""Runs -> the study frame: `mlflow.search_runs` rows, epoch histories and evaluation.json
payloads as one `Study` of pandas DataFrames (no MLflow here).

cli.compare fetches the runs, metric histories and artifacts through tracking.py and hands them
to `build_study`; report.tables and report.render read the Study it returns.
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

# The tag tracking.DIVERGED_TAG as mlflow.search_runs names its column.
DIVERGED_COLUMN = "tags.diverged"
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


@dataclass(frozen=True)
class Study:
    """A study's runs as tables: one row per train run, per epoch, and per evaluated class."""

    # run_id, run_name, norm, label, seed, TABLE_PARAMS..., val_digest, diverged, run_minutes
    train: pd.DataFrame
    history: pd.DataFrame  # run_id, norm, label, seed, epoch, train_loss, ..., epoch_seconds
    per_class: pd.DataFrame  # run_id, norm, seed, class, accuracy (from evaluation.json)
    misclassified: dict[str, Path]  # norm -> plots/misclassified.png of its first seed
    source: str  # what was compared, for the report's first line
    # Train-run params whose values split each norm's runs into the rows of the lever table.
    group_by: tuple[str, ...] = ()
    # One row per evaluate run: run_id, norm, seed, source_run_id, tta, test_acc.
    evaluated: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)
    # Train runs that stopped on a non-finite loss (FAILED, tagged `diverged`), as `train`'s
    # rows with the error in `diverged`: named by the findings, counted in no mean.
    diverged: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)

    @property
    def norms(self) -> list[str]:
        return ordered_norms(self.train["norm"])

    @property
    def labels(self) -> list[str]:
        """The rows of the per-norm table and the lines of the curves: `norm_labels`' values
        in the registry's norm order, each norm's from its smallest statistics group up."""
        rows = self.train.assign(_groups=_images_per_group_key(self.train["norm_batch"]))
        ordered = []
        for norm in self.norms:
            mine = rows[rows["norm"] == norm].sort_values("_groups", kind="stable")
            ordered += list(dict.fromkeys(mine["label"]))
        return ordered


def norm_labels(train: pd.DataFrame) -> pd.Series:
    """What a run's row in the per-norm table is called: its norm, or, for a norm with batch
    statistics whose runs differ in `norm_batch` (a batch-dependence sweep), the norm and its
    statistics group, `batch (norm_batch 8)` or `batch (whole batch)`, so that runs of
    different statistics are never pooled into one mean."""
    groups = _images_per_group_key(_column(train, "norm_batch"))
    labels = train["norm"].astype(object).copy()
    for norm in BATCH_STATISTICS_NORMS:
        mine = train["norm"] == norm
        if groups[mine].nunique() < 2:
            continue
        labels[mine] = [
            f"{norm} (norm_batch {int(g)})" if g < math.inf else f"{norm} (whole batch)"
            for g in groups[mine]
        ]
    return labels


def _images_per_group_key(norm_batch: pd.Series) -> pd.Series:
    """`norm_batch` as a sort key: its value, the whole batch (0, or not logged) last."""
    values = pd.to_numeric(norm_batch, errors="coerce").fillna(0)
    return values.where(values > 0, math.inf)


def ordered_norms(names) -> list[str]:
    """The distinct norms in `names`: the registered ones in the registry's order (batch,
    group, layer, ...), anything else after, sorted."""
    present = set(names)
    return [n for n in NORMS if n in present] + sorted(present - set(NORMS))


def build_study(
    runs: pd.DataFrame,
    histories: Mapping[str, Sequence[EpochMetrics]],
    *,
    evaluations: Mapping[str, dict] | None = None,
    misclassified: Mapping[str, Path] | None = None,
    source: str = "",
    group_by: Sequence[str] = (),
) -> Study:
    """Assemble a Study from `mlflow.search_runs` rows, each train run's epoch records, the
    evaluate runs' evaluation.json payloads and the train runs' misclassified grids (by run id).
    """
    group_by = tuple(group_by)
    runs = runs.reset_index(drop=True)  # rows are looked up by index below
    trained = train_runs(runs, extra_params=group_by)
    is_diverged = trained["diverged"] != ""
    train = trained[~is_diverged].reset_index(drop=True)
    train.insert(train.columns.get_loc("norm") + 1, "label", norm_labels(train))
    diverged = trained[is_diverged].reset_index(drop=True)
    rows = []
    for run in train.itertuples(index=False):
        for record in histories.get(run.run_id, ()):
            rows.append(
                {
                    "run_id": run.run_id,
                    "norm": run.norm,
                    "label": run.label,
                    "seed": run.seed,
                    **vars(record),
                }
            )
    fields = [field.name for field in dataclasses.fields(EpochMetrics)]
    history = pd.DataFrame(rows, columns=["run_id", "norm", "label", "seed", *fields])

    evaluate = step_runs(runs, "evaluate")
    evaluated = evaluate.copy()
    for column, key in (
        ("source_run_id", "tags.source_run_id"),
        ("test_acc", "metrics.test_acc"),
    ):
        evaluated[column] = _column(runs.loc[evaluate.index], key).map(_unquote)
    evaluated["tta"] = _logged_tta(runs.loc[evaluate.index])
    evaluated["test_acc"] = pd.to_numeric(evaluated["test_acc"], errors="coerce")

    per_class_rows = []
    for run in _one_evaluation_per_model(evaluated, runs).itertuples(index=False):
        payload = (evaluations or {}).get(run.run_id)
        if not payload:
            continue
        for name, accuracy in payload.get("per_class_accuracy", {}).items():
            per_class_rows.append(
                {
                    "run_id": run.run_id,
                    "norm": run.norm,
                    "seed": run.seed,
                    "class": name,
                    "accuracy": float(accuracy),
                }
            )
    per_class = pd.DataFrame(
        per_class_rows, columns=["run_id", "norm", "seed", "class", "accuracy"]
    )

    grids: dict[str, Path] = {}
    for run in train.sort_values(["norm", "seed"]).itertuples(index=False):
        path = (misclassified or {}).get(run.run_id)
        if path is not None and run.norm not in grids:
            grids[run.norm] = Path(path)
    return Study(
        train=train,
        history=history,
        per_class=per_class,
        misclassified=grids,
        source=source,
        group_by=group_by,
        evaluated=evaluated.reset_index(drop=True),
        diverged=diverged,
    )


def _logged_tta(runs: pd.DataFrame) -> pd.Series:
    """The `tta` param of each run; runs from before the param existed evaluated with flip."""
    return _column(runs, "params.tta").map(_unquote).fillna(TTA_BEFORE_PARAM)


def _one_evaluation_per_model(evaluated: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One evaluate run per model: the one that used the test-time augmentation its training
    run evaluated with (what `evaluate` does by default), else the first. A model evaluated
    several ways (for the TTA table) thus counts once, as its training saw it, per class."""
    trained_tta = pd.Series(_logged_tta(runs).to_numpy(), index=runs["run_id"].to_numpy())
    # A model trained outside the compared runs: evaluated as train's default would have.
    expected = evaluated["source_run_id"].map(trained_tta).fillna(TrainConfig().tta)
    ranked = evaluated.assign(_mismatch=evaluated["tta"] != expected)
    ranked = ranked.sort_values("_mismatch", kind="stable")
    model = ranked["source_run_id"].fillna(ranked["run_id"])
    return ranked[~model.duplicated()].drop(columns="_mismatch").sort_index()


def train_runs(runs: pd.DataFrame, *, extra_params: Sequence[str] = ()) -> pd.DataFrame:
    """One row per train run: run id and name, norm, seed, the TABLE_PARAMS and `extra_params`,
    and the run's wall time in minutes (start to end, as the tracking store recorded them)."""
    rows = step_runs(runs, "train")
    for name in dict.fromkeys([*TABLE_PARAMS, *extra_params]):
        rows[name] = _column(runs.loc[rows.index], f"params.{name}").map(_unquote)
    # Which training images validated: only runs on the same split are ever paired. Runs from
    # before the split existed, or with val_size 0, have none ("").
    rows["val_digest"] = _column(runs.loc[rows.index], "params.val_digest").fillna("")
    # The error of a training stopped on a non-finite loss; "" for every other run.
    rows["diverged"] = _column(runs.loc[rows.index], DIVERGED_COLUMN).fillna("")
    started = pd.to_datetime(_column(runs.loc[rows.index], "start_time"), utc=True)
    ended = pd.to_datetime(_column(runs.loc[rows.index], "end_time"), utc=True)
    rows["run_minutes"] = (ended - started).dt.total_seconds() / 60
    return rows.reset_index(drop=True)


def step_runs(runs: pd.DataFrame, step: str) -> pd.DataFrame:
    """Runs of one step (`train`, `evaluate`) with run id, run name, norm and seed."""
    is_step = (_column(runs, "tags.step") == step) | (
        _column(runs, "tags.mlflow.project.entryPoint") == step
    )
    selected = runs[is_step.fillna(False).astype(bool)]
    norm = _column(selected, "params.norm").fillna(_column(selected, "tags.norm"))
    seed = _column(selected, "params.seed").fillna(_column(selected, "tags.seed"))
    frame = pd.DataFrame(
        {
            "run_id": selected["run_id"] if len(selected) else pd.Series(dtype=object),
            "run_name": _column(selected, "tags.mlflow.runName"),
            "norm": norm.map(_unquote),
            "seed": pd.to_numeric(seed.map(_unquote), errors="coerce").astype("Int64"),
        },
        index=selected.index,
    )
    return frame[frame["norm"].notna()]


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    if name in frame.columns:
        return frame[name]
    return pd.Series([None] * len(frame), index=frame.index, dtype=object)


def _unquote(value):
    """Params that `mlflow run` logged shell-quoted (`'~/data'`) read back as typed."""
    if isinstance(value, str) and value[:1] in ("'", '"'):
        try:
            return " ".join(shlex.split(value))
        except ValueError:
            return value
    return value

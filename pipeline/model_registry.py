"""The model registry: register a trained model, keep `champion` on the best validation
accuracy, move an alias by hand, list the versions. It talks to MLflow, as tracking.py does."""

from __future__ import annotations

import logging

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import stores
from pipeline.tracking import MODEL_ARTIFACT, TrackingError, tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"


def register_model(
    model_uri: str,
    *,
    name: str,
    run_id: str,
    tags: dict[str, str],
    model_description: str = "",
    version_description: str = "",
) -> str:
    """Register `model_uri` as a new version of `name` and return the version number; the
    registered model's description (what every version of it is) and the version's (its own
    accuracy and run) are set when given.

    The version is created only after the model is fully logged, so the registry never
    holds a version without its files.
    """
    try:
        version = mlflow.register_model(model_uri, name, tags=tags)
    except MlflowException as error:
        raise TrackingError(f"cannot register model {name!r}: {error.message}") from None
    client = MlflowClient()
    client.set_model_version_tag(name, version.version, "run_id", run_id)
    if version_description:
        client.update_model_version(name, version.version, description=version_description)
    if model_description:
        client.update_registered_model(name, description=model_description)
    return str(version.version)


def _version_score(version) -> tuple[float, float]:
    """A version's rank for `champion`: its validation accuracy; versions trained without a
    validation split rank after every one with it, by test accuracy (how they were chosen
    before validation existed). NaN where the tag is missing."""

    def tag(name: str) -> float:
        try:
            return float(version.tags.get(name, "nan"))
        except ValueError:
            return float("nan")

    val = tag("val_acc")
    return (1.0, val) if val == val else (0.0, tag("test_acc"))


def update_champion(name: str, *, max_rounds: int = 20) -> str | None:
    """Point the `champion` alias at the version with the best `val_acc` tag; return it.

    Correct when trainings on different machines finish at once, with no lock they share:
    each writer recomputes the best from every version and re-reads after its write until
    what it read is what the alias holds. A version registers before its writer's update, so
    the last writer's final read sees every version and the alias settles on the best. A
    write refused because another writer created the alias first is one more round. (The
    file lock only saves same-host writers the extra rounds.)
    """
    client = MlflowClient()
    last_error = None
    with stores.file_lock("registry", f"{tracking_uri()}|{name}"):
        for _ in range(max_rounds):
            best = _best_version(client, name)
            if best is None:
                return None
            try:
                current = client.get_model_version_by_alias(name, CHAMPION).version
            except MlflowException:
                current = None
            if str(current) == best:
                return best
            try:
                client.set_registered_model_alias(name, CHAMPION, best)
            except MlflowException as error:
                # Two writers that both found no alias both insert one; the store's unique
                # key refuses the second. The next round re-reads what the winner wrote.
                last_error = error.message.splitlines()[0] if error.message else str(error)
                log.debug("%s@%s write lost a race: %s", name, CHAMPION, last_error)
                continue
            log.info("%s@%s -> version %s", name, CHAMPION, best)
    detail = f" (last error: {last_error})" if last_error else ""
    raise TrackingError(f"{name}@{CHAMPION} did not settle in {max_rounds} rounds{detail}")


def _best_version(client: MlflowClient, name: str) -> str | None:
    scored = [(v, _version_score(v)) for v in client.search_model_versions(f"name = '{name}'")]
    scored = [(v, s) for v, s in scored if s[1] == s[1]]
    if not scored:
        return None
    # Highest accuracy wins; on a tie the older version keeps the title.
    best, _ = max(scored, key=lambda item: (item[1], -int(item[0].version)))
    return str(best.version)


def promote(name: str, version: str, *, alias: str = CHAMPION) -> None:
    client = MlflowClient()
    try:
        client.get_model_version(name, version)
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as error:
        raise TrackingError(f"cannot promote {name} version {version}: {error.message}") from None


def registry_rows(name: str | None = None) -> list[dict[str, str]]:
    """One row per model version: name, version, aliases, tags the pipeline sets, run id."""
    client = MlflowClient()
    try:
        models = [client.get_registered_model(name)] if name else client.search_registered_models()
    except MlflowException as error:
        raise TrackingError(f"cannot read registered model {name!r}: {error.message}") from None
    rows = []
    for model in models:
        aliases: dict[str, list[str]] = {}
        for alias, number in (model.aliases or {}).items():
            aliases.setdefault(str(number), []).append(alias)
        for version in client.search_model_versions(f"name = '{model.name}'"):
            rows.append(
                {
                    "name": model.name,
                    "version": str(version.version),
                    "aliases": ",".join(sorted(aliases.get(str(version.version), []))),
                    "norm": version.tags.get("norm", ""),
                    "groups": version.tags.get("groups", ""),
                    "seed": version.tags.get("seed", ""),
                    "val_acc": version.tags.get("val_acc", ""),
                    "test_acc": version.tags.get("test_acc", ""),
                    "run_id": version.run_id or "",
                    "status": version.status,
                }
            )
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def registered_model_uri(run_id: str, name: str) -> str:
    """`models:/<name>/<version>` of the version registered from `run_id`, else its run URI."""
    if name:
        versions = MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if versions:
            newest = max(versions, key=lambda v: int(v.version))
            return f"models:/{name}/{newest.version}"
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"

"""The ``malaria`` command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, cast

import typer

from malaria.config import Settings, get_settings
from malaria.logging_setup import configure_logging

if TYPE_CHECKING:
    from malaria.registry import ChampionGate

# Prefect's temporary local server otherwise logs a harmless telemetry lock error.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(
    help="Malaria cell classifier: data, training, registry, serving helpers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Locate, validate, split and report on the cell images.", no_args_is_help=True)
app.add_typer(data_app, name="data")
docs_app = typer.Typer(help="Regenerate the generated parts of the docs.", no_args_is_help=True)
app.add_typer(docs_app, name="docs")
smear_app = typer.Typer(help="Smear fields: analyse slides, evaluate against annotated fields.", no_args_is_help=True)
app.add_typer(smear_app, name="smear")
feedback_app = typer.Typer(help="The review queue's labels: export them for training.", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")


def _settings(**overrides) -> Settings:
    settings = get_settings().model_copy(update={k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings.log_level, settings.log_dir)
    return settings


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _guarded(action):
    """Run ``action``; known failures become one red line and exit 1, not a traceback."""
    from malaria.data import DataError
    from malaria.registry import RegistryError

    try:
        return action()
    except (DataError, RegistryError) as exc:
        _fail(str(exc))


@data_app.command("prepare")
def data_prepare() -> None:
    """Validate the images and write the patient-grouped split manifest (data/splits.csv)."""
    from malaria.data import prepare

    settings = _settings()
    frame, report = _guarded(lambda: prepare(settings))
    typer.echo(f"{report.summary()}; manifest: {settings.splits_path}")


@data_app.command("fetch")
def data_fetch() -> None:
    """Download the NIH archive into data/cell_images (falls back to synthetic data offline)."""
    from malaria.data import ensure_dataset

    settings = _settings()
    typer.echo(f"data ready at {_guarded(lambda: ensure_dataset(settings))}")


@data_app.command("report")
def data_report(out: Annotated[Path, typer.Option(help="Output folder.")] = Path("reports/data")) -> None:
    """Write a dataset report (markdown + PNG): counts per class and patient, sizes, sample cells."""
    from malaria.data import ensure_dataset, scan_dataset, split_by_patient
    from malaria.report import dataset_report

    settings = _settings()

    def run() -> Path:
        root = ensure_dataset(settings)
        frame, validation = scan_dataset(root, settings)
        frame = split_by_patient(frame, settings.seed, settings.val_fraction, settings.test_fraction)
        return dataset_report(frame, root, validation, out, seed=settings.seed)

    typer.echo(f"report written: {_guarded(run)}")


@data_app.command("synthetic")
def data_synthetic(
    out: Path, per_class: Annotated[int, typer.Option()] = 200, patients: Annotated[int, typer.Option()] = 20
) -> None:
    """Generate a synthetic NIH-layout set (for demos and tests; it is not malaria)."""
    from malaria.data import generate_synthetic

    typer.echo(f"synthetic data written to {generate_synthetic(out, per_class, patients)}")


@app.command()
def train(
    profile: Annotated[str | None, typer.Option(help="quick (CPU) or full (GPU VGG16).")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    force: Annotated[bool, typer.Option(help="Move @champion even if not better.")] = False,
) -> None:
    """Train, write training_artifacts/, log to MLflow, register, and gate the champion alias."""
    from malaria.train import train as run_training

    settings = _settings(profile=profile, epochs=epochs)
    record = _guarded(lambda: run_training(settings, force=force))
    typer.echo(
        json.dumps(
            {
                "version": record.version,
                "champion": record.is_champion,
                **{k: round(v, 4) for k, v in record.metrics.items() if k.startswith("test_")},
            }
        )
    )


@app.command()
def register(
    model: Annotated[Path, typer.Option(help="A trained Keras model (.keras or .h5).")],
    labels: Annotated[str | None, typer.Option(help="Class order, e.g. 'Parasitized,Uninfected'.")] = None,
    sigmoid_class: Annotated[str | None, typer.Option(help="Class a 1-unit sigmoid output means.")] = None,
    force: Annotated[bool, typer.Option(help="Move @champion even if not better.")] = False,
) -> None:
    """Register an existing Keras model after checking that it loads safely and fits the contract."""
    from malaria.registry import (
        RegistryError,
        TrainingRun,
        check_keras_model,
        log_register_and_gate,
        read_label_sidecar,
    )

    settings = _settings()

    def run():
        sidecar = read_label_sidecar(model) or {}
        class_names = labels.split(",") if labels else sidecar.get("class_names")
        if not class_names:
            raise RegistryError("give the label order: --labels 'A,B' or a <model>.labels.json sidecar")
        keras_model, spec = check_keras_model(
            model, [c.strip() for c in class_names], sigmoid_class or sidecar.get("sigmoid_class")
        )
        metrics, gate = _validation_gate(settings, keras_model, spec)
        gate.force = force
        run = TrainingRun(params={"source": str(model)}, metrics=metrics, tags={"origin": "external"})
        return log_register_and_gate(keras_model, spec, settings, run, gate)

    record = _guarded(run)
    typer.echo(f"registered {record.name} version {record.version}" + (" (champion)" if record.is_champion else ""))


def _validation_gate(settings: Settings, model, spec) -> tuple[dict[str, float], ChampionGate]:
    """Validation metrics of a model on the current split, and the champion gate that compares them."""
    from malaria.registry import ChampionGate

    if not settings.splits_path.is_file():
        return {}, ChampionGate()
    from malaria import evaluation
    from malaria.data import images_fingerprint, read_manifest, source_roots
    from malaria.train import load_split, predict_probability, validation_scorer

    roots = source_roots(settings)
    val = load_split(read_manifest(settings.splits_path), roots, "val", spec, None, settings.seed)
    probability = predict_probability(model, val.images, spec)
    metrics = {f"val_{k}": v for k, v in evaluation.classification_metrics(val.labels, probability).items()}
    return metrics, ChampionGate(images_fingerprint(val.frame), validation_scorer(settings, roots, val))


@app.command("import-model")
def import_model(version: Annotated[str | None, typer.Option(help="Default: @champion.")] = None) -> None:
    """Import the MLflow champion into the BentoML model store (BENTOML_HOME is respected)."""
    from malaria.bento import import_model as run_import

    settings = _settings()
    stored = _guarded(lambda: run_import(settings, version))
    typer.echo(f"imported {stored.tag}")


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders.")],
    url: Annotated[str, typer.Option(envvar="MALARIA_URL", help="Service URL.")] = "http://localhost:3000",
    token: Annotated[str | None, typer.Option(envvar="MALARIA_API_TOKEN", help="Bearer token.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    chunk: Annotated[int, typer.Option(min=1, help="Images per request.")] = 32,
    wait: Annotated[float, typer.Option(min=0, help="Seconds to wait for the service to be ready.")] = 10,
) -> None:
    """Classify images with a running service and print a table (or JSON).

    A file the service rejects gets its error in place of a result (exit code 1); the others are still classified.
    """
    from malaria.client import MalariaClient, collect_images

    try:
        images = collect_images(paths)
    except FileNotFoundError as exc:
        _fail(str(exc))
    if not images:
        _fail("no image files found")
    results: list[dict] = []
    failure = None
    try:
        with MalariaClient(url, token=token, server_ready_timeout=wait) as client:
            for start in range(0, len(images), chunk):
                results += client.classify_files(images[start : start + chunk])
    except Exception as exc:  # noqa: BLE001 - connection errors come from httpx as well as BentoML
        hint = "" if results else " (is it running, and is the token right?)"
        failure = f"service at {url}: {exc}{hint}; {len(images) - len(results)} of {len(images)} images not classified"
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    elif results:
        width = max(len(r["path"]) for r in results)
        typer.echo(f"{'image':<{width}}  {'label':<11}  {'P(parasitized)':>14}  decision")
        for r in results:
            if "error" in r:
                typer.echo(f"{r['path']:<{width}}  rejected: {r['error']}")
            else:
                typer.echo(
                    f"{r['path']:<{width}}  {r['label']:<11}  {r['probability_parasitized']:>14.4f}  {r['decision']}"
                )
    rejected = sum("error" in r for r in results)
    if failure:
        _fail(failure)
    if rejected:
        _fail(f"{rejected} of {len(images)} files rejected by the service")


@app.command()
def evaluate(
    version: Annotated[str | None, typer.Option(help="Default: @champion.")] = None,
    version_file: Annotated[
        Path | None, typer.Option(help="Evaluate the version a training run registered (its registered.json).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/evaluation"),
    objective: Annotated[
        str, typer.Option(help="Threshold: calibrated (0.5), youden, or sensitivity (>= 0.95 on validation).")
    ] = "calibrated",
) -> None:
    """Evaluate a registered model on unseen patients; save its threshold and refer band (Prefect flow)."""
    from flows.evaluate import evaluate_flow
    from malaria.evaluate import ThresholdObjective

    settings = _settings()
    if version_file is not None:
        if version is not None:
            _fail("give --version or --version-file, not both")
        if not version_file.is_file():
            _fail(f"{version_file} not found: run `malaria train` first")
        version = str(json.loads(version_file.read_text())["version"])
    result = _guarded(
        lambda: evaluate_flow(
            version=version, out_dir=out, objective=cast("ThresholdObjective", objective), settings=settings
        )
    )
    typer.echo(f"threshold {result.spec.threshold:.3f}, refer band {result.spec.refer_band}; plots in {out}")


@app.command()
def drift(
    hours: Annotated[float | None, typer.Option(help="Window: the last N hours of predictions (0 = all).")] = 24.0,
    log_dir: Annotated[Path | None, typer.Option(help="Prediction log folder.")] = None,
    reference: Annotated[Path | None, typer.Option(help="Reference CSV (default: the champion's).")] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/drift"),
    min_predictions: Annotated[int, typer.Option()] = 50,
) -> None:
    """Drift of recent predictions vs training images (Evidently) and accuracy on reviewed cells (Prefect flow).

    Exit 0: fine; 3: drift; 4: no drift, but the live accuracy on reviewed audit cells is below the setting.
    """
    from flows.drift import drift_flow
    from malaria.monitoring import NotEnoughPredictions

    settings = _settings()
    try:
        result = _guarded(
            lambda: drift_flow(
                hours=hours or None,
                log_dir=log_dir,
                reference_path=reference,
                out_dir=out,
                min_predictions=min_predictions,
                settings=settings,
            )
        )
    except NotEnoughPredictions as exc:
        _fail(str(exc))
    typer.echo(result.summary())
    typer.echo(f"report: {result.html}")
    raise typer.Exit(3 if result.drift_detected else 4 if result.alerts else 0)


@app.command("batch-predict")
def batch_predict(
    folder: Annotated[str, typer.Argument(help="A folder, or with --engine spark any URI Spark reads (s3a://...).")],
    url: Annotated[str, typer.Option(envvar="MALARIA_URL")] = "http://localhost:3000",
    token: Annotated[str | None, typer.Option(envvar="MALARIA_API_TOKEN")] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("reports/batch"),
    engine: Annotated[
        str, typer.Option(help="service: through the running service at --url; spark: the registered model on Spark.")
    ] = "service",
    master: Annotated[str, typer.Option(help="Spark master (engine spark): local[*], spark://host:7077, ...")] = (
        "local[*]"
    ),
    version: Annotated[str | None, typer.Option(help="Registered version (engine spark); default: champion.")] = None,
    parquet: Annotated[
        str | None, typer.Option(help="Where Spark writes the Parquet rows (a cluster: s3a://...); default: OUT.")
    ] = None,
    fields: Annotated[
        bool, typer.Option(help="Smear fields (engine spark): one row per red cell; cell size: MALARIA_SMEAR_*.")
    ] = False,
) -> None:
    """Classify every image under FOLDER; CSV, JSON and summary (Prefect flow), plus Parquet with Spark."""
    from flows.batch_predict import Engine, batch_predict_flow

    if engine not in ("service", "spark"):
        _fail(f"--engine must be service or spark, not {engine!r}")
    if fields and engine != "spark":
        _fail("--fields needs --engine spark (through the service: `malaria smear analyze`)")
    settings = _settings()
    summary = batch_predict_flow(
        folder,
        url=url,
        token=token,
        out_dir=out,
        engine=cast("Engine", engine),
        settings=settings,
        spark_master=master,
        model_version=version,
        parquet_uri=parquet,
        fields=fields,
    )
    failed = "unusable" if fields else "unreadable"
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != failed} | {failed: len(summary[failed])}))


@app.command()
def pipeline(
    force: Annotated[bool, typer.Option(help="Move @champion even if not better.")] = False,
    build: Annotated[bool, typer.Option(help="Finish with `bentoml build`.")] = True,
) -> None:
    """prepare -> train -> evaluate -> champion gate -> BentoML import -> bento build (cached Prefect flow)."""
    from flows.pipeline import training_pipeline

    _settings()
    typer.echo(json.dumps(_guarded(lambda: training_pipeline(force=force, build=build)), indent=2, default=str))


@app.command("deploy-flows")
def deploy_flows() -> None:
    """Serve the flows as Prefect deployments (drift daily, evaluation weekly); keeps running."""
    from prefect import serve

    from flows.deploy import deployments

    serve(*deployments())


@app.command()
def champion(
    set_version: Annotated[
        str | None,
        typer.Option("--set", help="Point @champion at this registered version (a rollback; no gate)."),
    ] = None,
) -> None:
    """Show the current champion: version, run, spec and metrics (``--set V`` moves the alias first)."""
    from malaria.registry import get_version, set_champion

    settings = _settings()
    if set_version is not None:
        previous = _guarded(lambda: set_champion(settings, set_version))
        typer.echo(f"@{settings.champion_alias}: version {previous or 'none'} -> {set_version}", err=True)
    record = _guarded(lambda: get_version(settings))
    typer.echo(
        json.dumps(
            {
                "version": record.version,
                "run_id": record.run_id,
                "spec": record.spec.model_dump(mode="json"),
                "metrics": record.metrics,
            },
            indent=2,
        )
    )


@feedback_app.command("export")
def feedback_export(
    out: Annotated[Path, typer.Argument(help="Folder to write Parasitized/, Uninfected/ and manifest.csv into.")],
    db: Annotated[str | None, typer.Option(help="Review database URL; default: the service's setting.")] = None,
) -> None:
    """Write the reviewed cells in the NIH folder layout with a manifest (unsure and disputed cells left out)."""
    from malaria.serving.reviews import ReviewStore

    settings = _settings()
    summary = ReviewStore(db or settings.review_database_url(), settings.review_keep_days).export(out)
    typer.echo(json.dumps(summary))


UrlOption = Annotated[str, typer.Option(envvar="MALARIA_URL", help="Service URL.")]
TokenOption = Annotated[str | None, typer.Option(envvar="MALARIA_API_TOKEN", help="Bearer token.")]
DiameterOption = Annotated[
    float | None, typer.Option(min=8, max=1000, help="Expected red-cell diameter in pixels (default: the server's).")
]


def _fmt_parasitemia(result: dict) -> str:
    if result.get("parasitemia_percent") is None:
        return "-"
    low, high = result["parasitemia_ci95"]
    return f"{result['parasitemia_percent']:.2f} % [{low:.2f}, {high:.2f}]"


@smear_app.command("analyze")
def smear_analyze(
    paths: Annotated[list[Path], typer.Argument(help="Field images and/or folders (a folder is one slide).")],
    out: Annotated[Path | None, typer.Option(help="Write annotated fields and summary.json here.")] = None,
    cell_diameter_px: DiameterOption = None,
    url: UrlOption = "http://localhost:3000",
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    wait: Annotated[float, typer.Option(min=0, help="Seconds to wait for the service to be ready.")] = 10,
) -> None:
    """Count red cells and parasitemia per field and per slide with a running service.

    A slide counted on fewer red cells than MALARIA_SMEAR_MIN_SLIDE_CELLS is flagged; a field the service
    rejects gets its error in its row (exit code 1).
    """
    from malaria.client import MalariaClient
    from malaria.smear.slides import analyze_slides, collect_slides

    settings = _settings()
    try:
        slides = collect_slides(paths)
    except FileNotFoundError as exc:
        _fail(str(exc))
    if not any(slides.values()):
        _fail("no image files found")
    try:
        with MalariaClient(url, token=token, server_ready_timeout=wait, timeout=300) as client:
            report = analyze_slides(slides, client, out, settings.smear_min_slide_cells, cell_diameter_px)
    except Exception as exc:  # noqa: BLE001 - connection errors come from httpx as well as BentoML
        _fail(f"service at {url}: {exc} (is it running, and is the token right?)")
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        for slide, entry in report["slides"].items():
            typer.echo(f"slide {slide}")
            for field in entry["fields"]:
                name = Path(field["path"]).name
                if "error" in field:
                    typer.echo(f"  {name}: rejected: {field['error']}")
                elif not field["usable"]:
                    typer.echo(f"  {name}: not counted: {field['reason']}")
                else:
                    counts = field["counts"]
                    typer.echo(
                        f"  {name}: {counts['parasitized']}/{counts['cells']} parasitized, "
                        f"{counts['refer']} to review, parasitemia {_fmt_parasitemia(field)}"
                    )
            summary = entry["summary"]
            flag = (
                "" if summary["enough_cells"] else f"  (fewer than {summary['min_cells']} red cells: count more fields)"
            )
            fields = f"{summary['usable_fields']} of {summary['fields']} fields"
            typer.echo(
                f"  slide total: {summary['parasitized']}/{summary['cells']} parasitized over {fields}, "
                f"parasitemia {_fmt_parasitemia(summary)}{flag}"
            )
    rejected = sum(e["summary"]["rejected_files"] for e in report["slides"].values())
    if rejected:
        _fail(f"{rejected} files rejected by the service")


@smear_app.command("evaluate")
def smear_evaluate(
    smear_dir: Annotated[
        Path | None, typer.Argument(help="Annotated fields (images/, annotations.json); default MALARIA_SMEAR_DIR.")
    ] = None,
    split: Annotated[
        str, typer.Option(help="Fields to score: test, val, train (capture-block split) or all.")
    ] = "test",
    out: Annotated[Path | None, typer.Option(help="Write per-field scores and the summary (JSON) here.")] = None,
    cell_diameter_px: DiameterOption = None,
    url: UrlOption = "http://localhost:3000",
    token: TokenOption = None,
    wait: Annotated[float, typer.Option(min=0, help="Seconds to wait for the service to be ready.")] = 10,
) -> None:
    """Score the service on annotated fields: recall, sensitivity, specificity, parasitemia error, seconds per field.

    Fields go to the service one at a time (the seconds are per field, sequential, HTTP included).
    """
    import time

    from malaria.client import MalariaClient
    from malaria.smear.annotations import SPLIT_NAMES, load_annotations, split_fields
    from malaria.smear.evaluation import score_field, scores_table, summarise_scores

    settings = _settings()
    folder = smear_dir or settings.smear_dir
    if folder is None or not (Path(folder) / "annotations.json").is_file():
        _fail(f"no annotations.json under {folder} (give a folder or set MALARIA_SMEAR_DIR)")
    if split not in (*SPLIT_NAMES, "all"):
        _fail(f"--split must be one of {', '.join(SPLIT_NAMES)} or all")
    annotations = load_annotations(Path(folder))
    names = sorted(annotations)
    if split != "all":
        parts = split_fields(names, settings.seed)
        names = [n for n in names if parts[n] == split]
    from bentoml.exceptions import BentoMLException

    scores, rejected = [], []
    try:
        with MalariaClient(url, token=token, server_ready_timeout=wait, timeout=300) as client:
            for name in names:
                path = Path(folder) / "images" / name
                started = time.perf_counter()
                try:
                    analysis = client.analyze_smear(path, cell_diameter_px=cell_diameter_px)
                except BentoMLException as exc:
                    if int(exc.error_code) >= 500:
                        raise
                    rejected.append({"field": name, "error": str(exc)})
                    continue
                scores.append(score_field(name, annotations[name], analysis, time.perf_counter() - started))
    except Exception as exc:  # noqa: BLE001 - connection errors come from httpx as well as BentoML
        _fail(f"service at {url}: {exc} (is it running, and is the token right?)")
    summary = {"split": split, "seed": settings.seed, "rejected_fields": rejected, **summarise_scores(scores)}
    typer.echo(json.dumps(summary, indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"summary": summary, "fields": scores_table(scores)}, indent=2))


@docs_app.command("settings")
def docs_settings(
    markdown: Annotated[Path, typer.Argument(help="The page holding the settings table.")] = Path("docs/serving.md"),
    check: Annotated[bool, typer.Option(help="Only check: exit 1 if the table is stale.")] = False,
) -> None:
    """Write the settings table (every MALARIA_* variable, its default and meaning) from malaria/config.py."""
    from malaria.config import settings_table, write_settings_table

    if check:
        if settings_table() not in markdown.read_text():
            _fail(f"the settings table in {markdown} is stale: run `malaria docs settings`")
        typer.echo(f"{markdown}: settings table up to date")
        return
    changed = write_settings_table(markdown)
    typer.echo(f"{markdown}: settings table {'rewritten' if changed else 'already up to date'}")


@app.command("model-card")
def model_card(
    out: Annotated[Path, typer.Option(help="Where to write the card.")] = Path("docs/model-card.md"),
    version: Annotated[str | None, typer.Option(help="Default: @champion.")] = None,
    smear_eval: Annotated[
        Path | None, typer.Option(help="A `malaria smear evaluate --out` file to include (field-level figures).")
    ] = None,
) -> None:
    """Write the model card of a registered version from the registry (and a smear evaluation)."""
    from malaria.model_card import render
    from malaria.registry import get_version

    settings = _settings()
    record = _guarded(lambda: get_version(settings, version))
    evaluation = json.loads(smear_eval.read_text()) if smear_eval else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(record, evaluation))
    typer.echo(f"model card of {record.name} v{record.version}: {out}")


if __name__ == "__main__":
    app()

"""A slide report from smear fields: every field through the service, annotated, summed per slide.

Writes ``report.md`` and ``report.html`` (the annotated fields shown inline, relative links) and
``summary.json`` under ``out_dir``, and flags each slide counted on fewer red cells than
``min_cells`` (default ``MALARIA_SMEAR_MIN_SLIDE_CELLS``).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.batch_predict import _is_transient
from malaria.client import MalariaClient
from malaria.config import Settings
from malaria.smear.slides import analyze_field, annotated_name, collect_slides, summarise_slide


@task(retries=3, retry_delay_seconds=[1, 4, 10], retry_condition_fn=_is_transient)
def analyze_field_task(
    path: Path, url: str, token: str | None, out_dir: Path, slide: str, name: str, cell_diameter_px: float | None
) -> dict:
    """One field through the service; its annotated picture under ``out_dir/slide/``. A 4xx is a row."""
    with MalariaClient(url, token=token, timeout=300) as client:
        row = analyze_field(client, path, out_dir / slide / name, cell_diameter_px)
    if "annotated" in row:  # relative: report.html links it from out_dir
        row["annotated"] = str(Path(row["annotated"]).relative_to(out_dir))
    return row


def _percent(summary: dict) -> str:
    if summary.get("parasitemia_percent") is None:
        return "not counted"
    low, high = summary["parasitemia_ci95"]
    return f"{summary['parasitemia_percent']:.2f} % (95 % CI {low:.2f} to {high:.2f})"


def render_markdown(report: dict) -> str:
    lines = ["# Smear report", ""]
    for slide, entry in report["slides"].items():
        s = entry["summary"]
        lines += [f"## Slide `{slide}`", ""]
        lines += [
            f"- parasitemia: **{_percent(s)}**, {s['parasitized']} of {s['cells']} red cells, "
            f"{s['refer']} flagged for review, {s['usable_fields']} of {s['fields']} fields counted",
        ]
        if not s["enough_cells"]:
            lines.append(f"- **counted on fewer than {s['min_cells']} red cells: count more fields before reporting**")
        lines += [
            "",
            "| field | red cells | parasitized | to review | parasitemia | picture |",
            "|---|---|---|---|---|---|",
        ]
        for f in entry["fields"]:
            name = Path(f["path"]).name
            if "error" in f:
                lines.append(f"| {name} | rejected: {f['error']} | | | | |")
            elif not f["usable"]:
                lines.append(f"| {name} | not counted: {f['reason']} | | | | ![]({f['annotated']}) |")
            else:
                c = f["counts"]
                counts = f"{c['cells']} | {c['parasitized']} | {c['refer']}"
                lines.append(f"| {name} | {counts} | {_percent(f)} | ![]({f['annotated']}) |")
        lines.append("")
    lines.append("Research use only: a count to check under the microscope, not a diagnosis on its own.")
    return "\n".join(lines) + "\n"


def render_html(report: dict) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>Smear report</title>",
        "<style>body{font-family:sans-serif;margin:2em}img{max-width:480px}td,th{padding:4px 8px;"
        "border-bottom:1px solid #ccc}.warn{color:#b00}</style><h1>Smear report</h1>",
    ]
    for slide, entry in report["slides"].items():
        s = entry["summary"]
        parts.append(
            f"<h2>Slide {html.escape(slide)}</h2><p>Parasitemia <b>{html.escape(_percent(s))}</b>: "
            f"{s['parasitized']} of {s['cells']} red cells, {s['refer']} to review, "
            f"{s['usable_fields']} of {s['fields']} fields counted.</p>"
        )
        if not s["enough_cells"]:
            parts.append(f"<p class='warn'>Counted on fewer than {s['min_cells']} red cells: count more fields.</p>")
        parts.append("<table><tr><th>field</th><th>result</th><th>picture</th></tr>")
        for f in entry["fields"]:
            name = html.escape(Path(f["path"]).name)
            if "error" in f:
                result, picture = f"rejected: {html.escape(f['error'])}", ""
            else:
                result = html.escape(_percent(f)) if f["usable"] else f"not counted: {html.escape(f['reason'])}"
                picture = f"<img src='{html.escape(f['annotated'])}' alt='{name}'>"
            parts.append(f"<tr><td>{name}</td><td>{result}</td><td>{picture}</td></tr>")
        parts.append("</table>")
    parts.append("<p>Research use only: a count to check under the microscope, not a diagnosis on its own.</p>")
    return "\n".join(parts) + "\n"


@flow(
    name="smear-report",
    task_runner=ThreadPoolTaskRunner(max_workers=2),  # type: ignore[arg-type]  # its generic type is inferred as Never
    log_prints=True,
)
def smear_report_flow(
    paths: list[Path],
    url: str = "http://localhost:3000",
    token: str | None = None,
    out_dir: Path = Path("reports/smear"),
    min_cells: int | None = None,
    cell_diameter_px: float | None = None,
) -> dict:
    """Analyse the fields of each slide (a folder is a slide) and write the slide report.

    ``cell_diameter_px``: this microscope's red-cell diameter (default: the server's).
    """
    min_cells = min_cells or Settings().smear_min_slide_cells
    slides = collect_slides([Path(p) for p in paths])
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"slides": {}}
    for slide, images in slides.items():
        futures = [
            analyze_field_task.submit(path, url, token, out_dir, slide, annotated_name(path, images), cell_diameter_px)
            for path in images
        ]
        fields = [future.result() for future in futures]
        report["slides"][slide] = {"summary": summarise_slide(fields, min_cells), "fields": fields}
    (out_dir / "summary.json").write_text(json.dumps(report, indent=2))
    markdown = render_markdown(report)
    (out_dir / "report.md").write_text(markdown)
    (out_dir / "report.html").write_text(render_html(report))
    create_markdown_artifact(key="smear-report", markdown=markdown)
    for slide, entry in report["slides"].items():
        get_run_logger().info("slide %s: %s", slide, _percent(entry["summary"]))
    return report


if __name__ == "__main__":
    import sys

    smear_report_flow([Path(p) for p in sys.argv[1:]])

"""The dataset report: one self-contained HTML page per run, built from the data stages' outputs.

`build_report(workdir, manifests, run_dir)` reads the stage manifests and shards (see `collect`) and
writes `run_dir/dataset-report.html`: the funnel (rows in → downloaded → kept by filter → captioned
→ encoded), failures by reason per stage with examples, histograms of original width, height,
aspect ratio and caption length, the most frequent caption words and bigrams, score distributions
(numeric metadata fields of the source, values the filter measured on rejected rows), duplicate
clusters and sample thumbnails with their captions. Images are embedded as data URLs, so the page
needs no network and no file beside it. The plots are also written as PNG files and a markdown
summary into `run_dir/dataset-report/`, which `publish_report` shows as Prefect artifacts.

Plain Python: Prefect is imported only by `publish_report`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image

from sdflow.data.report.collect import DATA_STAGES, TOP_TERMS, DataStats, collect
from sdflow.data.report.plots import histogram
from sdflow.ops import artifacts
from sdflow.store.stageio import Manifest, write_atomic

HTML = "dataset-report.html"
ASSETS = "dataset-report"  # plots (PNG) and the markdown summary, for the Prefect artifacts
SUMMARY = "summary.md"
THUMBNAIL_SIDE = 160
TOP_FAILURES = 10  # reasons in the markdown summary


def build_report(
    workdir: str | Path, manifests: Mapping[str, Manifest | None], run_dir: str | Path
) -> Path:
    """Write the report of the data stages in `manifests` (stage name -> manifest or None)."""
    if not any(manifests.get(stage) for stage in DATA_STAGES):
        raise ValueError(
            f"no data stage output among {sorted(manifests)}; needs one of {DATA_STAGES}"
        )
    stats = collect(workdir, manifests)
    assets = Path(run_dir) / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    plots = draw_plots(stats)
    for name, png in plots.items():
        write_atomic(assets / f"{name}.png", png)
    write_atomic(assets / SUMMARY, summary_markdown(stats))
    path = Path(run_dir) / HTML
    write_atomic(path, render_html(stats, plots))
    return path


def draw_plots(stats: DataStats) -> dict[str, bytes]:
    """name -> PNG; names are artifact-key safe."""
    where = f"{stats.final_stage} output"
    widths, heights = stats.sizes.column(0), stats.sizes.column(1)
    ratios = np.maximum(widths, heights) / np.maximum(np.minimum(widths, heights), 1)
    rows = stats.sizes.count
    plots = {
        "width": histogram(widths, f"Original width, {where}", "pixels", count=rows),
        "height": histogram(heights, f"Original height, {where}", "pixels", count=rows),
        "aspect-ratio": histogram(
            ratios, f"Aspect ratio, {where}", "longer / shorter side", count=rows
        ),
        "caption-length": histogram(
            stats.caption_words.column(),
            f"Caption length, {where}",
            "words",
            bins=30,
            count=stats.caption_words.count,
        ),
    }
    for title, values in stats.scores.items():
        plots[score_plot(title)] = histogram(values.column(), title, "value", count=values.count)
    return plots


def score_plot(title: str) -> str:
    return f"score-{artifacts.slug(title)}"


def score_counts(stats: DataStats) -> dict[str, int]:
    return {score_plot(title): values.count for title, values in stats.scores.items()}


def render_html(stats: DataStats, plots: Mapping[str, bytes]) -> str:
    environment = Environment(
        loader=PackageLoader("sdflow.data.report", "."), autoescape=select_autoescape(["html"])
    )
    template = environment.get_template("template.html")
    images = stats.cluster_images
    counts = {**dict.fromkeys(plots, stats.sizes.count), **score_counts(stats)}
    return template.render(
        stats=stats,
        plots=[
            {"name": name, "url": artifacts.bytes_data_url(png, "image/png"), "n": counts[name]}
            for name, png in plots.items()
        ],
        words=stats.words.most_common(TOP_TERMS),
        bigrams=stats.bigrams.most_common(TOP_TERMS),
        clusters=[
            {
                "kept": c.kept,
                "size": c.size,
                "image": thumbnail(images[c.kept]),
                "members": [(m, reason, thumbnail(images[m])) for m, reason in c.members],
            }
            for c in stats.clusters
        ],
        samples=[
            {"id": s["id"], "caption": s["caption"] or "", "image": thumbnail(s["image"])}
            for s in stats.samples
        ],
    )


def thumbnail(data: bytes | None) -> str | None:
    """A small data URL of encoded image bytes; None when they do not decode."""
    try:
        with Image.open(io.BytesIO(data or b"")) as image:
            return artifacts.pil_data_url(image, THUMBNAIL_SIDE, max_png_bytes=24_000)
    except Exception:  # a row the filter rejected as undecodable can still be a duplicate
        return None


def summary_markdown(stats: DataStats) -> str:
    """The funnel and the most frequent failure reasons, for the Prefect UI."""
    lines = ["# Dataset report", "", "| step | stage | rows | of rows in |", "|---|---|---:|---:|"]
    first = stats.funnel[0][2] if stats.funnel else 0
    for step, stage, rows in stats.funnel:
        share = f"{100 * rows / first:.1f}%" if first else "-"
        lines.append(f"| {step} | {stage} | {rows} | {share} |")
    top = sorted(stats.failures, key=lambda r: -r["count"])[:TOP_FAILURES]
    if top:
        lines += ["", "## Top failure reasons", "", "| stage | reason | rows | share of input |"]
        lines.append("|---|---|---:|---:|")
        lines += [f"| {r['stage']} | {r['reason']} | {r['count']} | {r['share']} |" for r in top]
    words = ", ".join(f"{w} ({n})" for w, n in stats.words.most_common(10))
    if words:
        lines += ["", f"Most frequent caption words: {words}"]
    return "\n".join(lines) + "\n"


def publish_report(profile: str, html: Path) -> None:
    """The report's summary as a markdown artifact and its plots as image artifacts."""
    from prefect.artifacts import create_markdown_artifact

    assets = html.parent / ASSETS
    summary = (assets / SUMMARY).read_text()
    create_markdown_artifact(
        summary + f"\nFull report: `{html}`\n",
        key=artifacts.artifact_key(profile, "dataset-report"),
        description="Dataset funnel and top failure reasons",
    )
    for plot in sorted(assets.glob("*.png")):
        name = f"dataset-{plot.stem}"
        artifacts.publish_image(profile, name, plot, f"Dataset report: {plot.stem}")

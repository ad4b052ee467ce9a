"""The annotated field: every cell boxed in its decision's colour, the counts drawn on top."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

from malaria.smear.analysis import SmearAnalysis

COLOURS = {"parasitized": (220, 20, 60), "uninfected": (46, 139, 87), "refer": (255, 165, 0)}
OTHER_COLOUR = (90, 90, 200)  # white cells, debris, clumps: thin
EDGE_COLOUR = (150, 150, 150)


def annotate(image: Image.Image, analysis: SmearAnalysis) -> Image.Image:
    """A copy of ``image`` with the analysis drawn on it (PNG-ready RGB)."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(canvas.size) / 300))
    for other in analysis.other_objects:
        x, y, w, h = other.box
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=OTHER_COLOUR, width=1)
    for cell in analysis.cells:
        x, y, w, h = cell.box
        colour = EDGE_COLOUR if cell.edge else COLOURS[cell.decision]
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=colour, width=1 if cell.edge else line)
    if analysis.usable and analysis.parasitemia_ci95 is not None:
        low, high = analysis.parasitemia_ci95
        text = (
            f"{analysis.counts.parasitized}/{analysis.counts.cells} parasitized = {analysis.parasitemia_percent:.2f} % "
            f"(95 % CI {low:.2f}-{high:.2f}), {analysis.counts.refer} to review"
        )
    else:
        text = f"not counted: {analysis.reason}"
    size = max(12, round(min(canvas.size) / 40))
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((8, 8), text, font=font)
    draw.rectangle((left - 4, top - 4, right + 4, bottom + 4), fill=(255, 255, 255))
    draw.text((8, 8), text, fill=(0, 0, 0), font=font)
    return canvas


def annotated_png(image: Image.Image, analysis: SmearAnalysis) -> bytes:
    """The annotated field encoded as PNG (CPU-bound: run it off the event loop)."""
    buffer = io.BytesIO()
    annotate(image, analysis).save(buffer, "PNG", compress_level=3)
    return buffer.getvalue()

"""Generated smear fields with known cells: for tests and offline demos, never for a real number.

Cells are the same pink disks with purple parasite spots as ``malaria.data.generate_synthetic``'s
crops, on a pale background, laid out so that the truth is known: free cells, touching pairs, cells
cut by the border, a white blood cell (a large, dark nucleus) and platelets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

BACKGROUND = (205, 225, 205)
CELL = (200, 140, 150)
PARASITE = (95, 40, 120)
NUCLEUS = (70, 20, 110)


@dataclass
class SyntheticField:
    image: Image.Image
    cells: list[tuple[int, int, int, int]] = field(default_factory=list)  # interior red cells, boxes
    infected: list[bool] = field(default_factory=list)  # per interior cell
    edge_cells: int = 0
    white_cells: list[tuple[int, int, int, int]] = field(default_factory=list)
    touching_pairs: int = 0


def synthetic_field(
    width: int = 640,
    height: int = 480,
    diameter: int = 40,
    n_free: int = 24,
    n_pairs: int = 3,
    infected_every: int = 4,
    white_cell: bool = True,
    edge_cells: int = 2,
    platelets: int = 3,
    seed: int = 0,
) -> SyntheticField:
    """A field with ``n_free`` separate cells, ``n_pairs`` touching pairs, ``edge_cells`` cut by the border."""
    rng = np.random.default_rng(seed)
    canvas = np.empty((height, width, 3), np.float64)
    canvas[:] = BACKGROUND
    canvas += rng.normal(0, 3, canvas.shape)
    yy, xx = np.mgrid[0:height, 0:width]
    radius = diameter / 2
    result = SyntheticField(image=None)  # type: ignore[arg-type]
    taken: list[tuple[float, float, float]] = []

    def free_spot(r: float, margin: float) -> tuple[float, float]:
        for _ in range(10_000):
            cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + diameter * 0.25) ** 2 for x, y, rr in taken):
                return cx, cy
        raise ValueError("field too crowded for the requested cells")

    def draw_cell(cx: float, cy: float, infected: bool, interior: bool = True) -> None:
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
        canvas[disk] = np.array(CELL) + rng.normal(0, 6, (disk.sum(), 3))
        pallor = (xx - cx) ** 2 + (yy - cy) ** 2 < (radius * 0.35) ** 2
        canvas[pallor] += 12
        if infected:
            px, py = cx + rng.uniform(-0.4, 0.4) * radius, cy + rng.uniform(-0.4, 0.4) * radius
            spot = (xx - px) ** 2 + (yy - py) ** 2 < (diameter * 0.08) ** 2
            canvas[spot] = np.array(PARASITE) + rng.normal(0, 6, (spot.sum(), 3))
        taken.append((cx, cy, radius))
        if interior:
            x0, y0 = int(round(cx - radius)), int(round(cy - radius))
            result.cells.append((x0, y0, diameter, diameter))
            result.infected.append(infected)

    if white_cell:
        r = diameter * 0.65
        cx, cy = free_spot(r, r + 2)
        body = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        canvas[body] = (215, 195, 215)
        nucleus = ((xx - cx) / (r * 0.75)) ** 2 + ((yy - cy) / (r * 0.55)) ** 2 < 1
        canvas[nucleus] = np.array(NUCLEUS) + rng.normal(0, 6, (nucleus.sum(), 3))
        taken.append((cx, cy, r))
        result.white_cells.append((int(cx - r), int(cy - r), int(2 * r), int(2 * r)))
    for i in range(edge_cells):  # centred on the border: half a cell inside
        cx, cy = (0.0, height * (i + 1) / (edge_cells + 1)) if i % 2 == 0 else (width * 0.5, float(height))
        draw_cell(cx, cy, infected=False, interior=False)
        result.edge_cells += 1
    count = 0
    for _ in range(n_pairs):
        cx, cy = free_spot(diameter, diameter + 2)
        angle = rng.uniform(0, np.pi)
        dx, dy = np.cos(angle) * radius * 0.9, np.sin(angle) * radius * 0.9  # centres 0.9 diameters apart
        draw_cell(cx - dx, cy - dy, infected=count % infected_every == 0)
        draw_cell(cx + dx, cy + dy, infected=False)
        count += 2
        result.touching_pairs += 1
    for _ in range(n_free):
        cx, cy = free_spot(radius, radius + 2)
        draw_cell(cx, cy, infected=count % infected_every == 0)
        count += 1
    for _ in range(platelets):
        cx, cy = free_spot(diameter * 0.1, diameter)
        dot = (xx - cx) ** 2 + (yy - cy) ** 2 < (diameter * 0.1) ** 2
        canvas[dot] = PARASITE
        taken.append((cx, cy, diameter * 0.1))
    result.image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return result

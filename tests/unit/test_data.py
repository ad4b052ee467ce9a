"""Data: patient ids, validation of bad files, patient-grouped split, dataset location, report."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from malaria.data import (
    DataError,
    ensure_dataset,
    image_paths,
    images_fingerprint,
    labels_of,
    patient_id,
    prepare,
    read_manifest,
    scan_dataset,
    source_roots,
    split_by_patient,
)
from malaria.report import dataset_report
from malaria.spec import PARASITIZED


@pytest.mark.parametrize(
    "name, expected",
    [
        ("C100P61ThinF_IMG_20150918_144104_cell_163.png", "C100"),
        ("C1_thinF_IMG_20150604_104722_cell_9.png", "C1"),
        ("C59P20thinF_IMG_20150803_111333_cell_144.png", "C59"),
        ("other_IMG_1.png", "other"),
    ],
)
def test_patient_id_is_the_slide_number(name, expected):
    assert patient_id(name) == expected


def test_bad_files_are_reported_and_skipped(tmp_path, synthetic_dir, settings_factory):
    root = tmp_path / "cells"
    shutil.copytree(synthetic_dir, root)
    parasitized = root / PARASITIZED
    (parasitized / "C1P1_IMG_empty.png").write_bytes(b"")
    (parasitized / "C1P1_IMG_text.png").write_bytes(b"not a png")
    good = (parasitized / next(p.name for p in parasitized.iterdir() if p.suffix == ".png")).read_bytes()
    (parasitized / "C1P1_IMG_truncated.png").write_bytes(good[: len(good) // 3])
    Image.new("RGB", (4, 4)).save(parasitized / "C1P1_IMG_tiny.png")
    (parasitized / "notes.txt").write_text("hello")

    frame, report = scan_dataset(root, settings_factory())
    assert report.kept == 240 == len(frame)
    assert report.skipped["empty"] == [f"{PARASITIZED}/C1P1_IMG_empty.png"]
    assert report.skipped["wrong size"] == [f"{PARASITIZED}/C1P1_IMG_tiny.png"]
    assert sorted(report.skipped["not an image"] + report.skipped.get("unreadable", [])) == sorted(
        [
            f"{PARASITIZED}/C1P1_IMG_text.png",
            f"{PARASITIZED}/C1P1_IMG_truncated.png",
            f"{PARASITIZED}/notes.txt",
        ]
    )
    assert "5 skipped" in report.summary()


def test_missing_folder_and_empty_class_are_clear_errors(tmp_path, settings_factory):
    with pytest.raises(DataError, match="does not exist"):
        scan_dataset(tmp_path / "nowhere", settings_factory())
    (tmp_path / "cells" / PARASITIZED).mkdir(parents=True)
    (tmp_path / "cells" / "Uninfected").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "cells" / "Uninfected" / "C1_IMG_a.png")
    with pytest.raises(DataError, match="Parasitized"):
        scan_dataset(tmp_path / "cells", settings_factory())


def test_split_never_shares_a_patient_and_keeps_classes(synthetic_dir, settings_factory):
    frame, _ = scan_dataset(synthetic_dir, settings_factory())
    split = split_by_patient(frame, seed=1)
    assert set(split["split"]) == {"train", "val", "test"}
    assert split.groupby("patient")["split"].nunique().max() == 1
    for _, part in split.groupby("split"):  # balanced patients here; stratification: the next test
        assert 0.25 < labels_of(part).mean() < 0.75


def unbalanced_patients(n_patients: int = 40, seed: int = 0) -> pd.DataFrame:
    """Manifest rows of patients whose cells are mostly of one class (as on real slides), 20 to 120 cells each."""
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(n_patients):
        infected_share = 0.9 if patient % 4 == 0 else 0.05  # a quarter of the patients carry most infected cells
        for cell in range(int(rng.integers(20, 120))):
            label = PARASITIZED if rng.random() < infected_share else "Uninfected"
            rows.append({"path": f"{label}/C{patient}_cell_{cell}.png", "label": label, "patient": f"C{patient}"})
    return pd.DataFrame(rows)


def test_the_split_keeps_the_class_share_of_each_part_when_patients_are_unbalanced():
    frame = unbalanced_patients()
    overall = labels_of(frame).mean()
    for seed in range(3):
        split = split_by_patient(frame, seed=seed)
        assert split.groupby("patient")["split"].nunique().max() == 1
        for name, part in split.groupby("split"):
            assert abs(labels_of(part).mean() - overall) < 0.05, (seed, name, labels_of(part).mean(), overall)


def test_split_is_deterministic_for_a_seed(synthetic_dir, settings_factory):
    frame, _ = scan_dataset(synthetic_dir, settings_factory())
    a, b = split_by_patient(frame, seed=5), split_by_patient(frame, seed=5)
    pd.testing.assert_frame_equal(a, b)
    assert not split_by_patient(frame, seed=6)["split"].equals(a["split"])


def test_prepare_writes_manifest_and_report(synthetic_dir, settings_factory):
    settings = settings_factory(data_dir=synthetic_dir)
    prepare(settings)
    manifest = read_manifest(settings.splits_path)
    assert len(manifest) == 240 and set(manifest.columns) >= {"path", "label", "patient", "split"}
    assert (settings.workspace_data_dir / "validation_report.json").is_file()


def test_the_manifest_names_each_images_content_so_dvc_sees_a_changed_image(synthetic_dir, settings_factory, tmp_path):
    """dvc.yaml's `train` depends on the manifest, not on a folder: an image edited in place must change it."""
    import hashlib

    cells = tmp_path / "cells"
    shutil.copytree(synthetic_dir, cells)
    settings = settings_factory(data_dir=cells)
    prepare(settings)
    before = settings.splits_path.read_bytes()
    manifest = read_manifest(settings.splits_path)
    first = manifest.iloc[0]
    assert hashlib.sha256((cells / first["path"]).read_bytes()).hexdigest() == first["sha256"]
    prepare(settings)
    assert settings.splits_path.read_bytes() == before  # deterministic: an unchanged folder leaves it as it was
    image = cells / first["path"]
    image.write_bytes(image.read_bytes() + b"\0")  # same name, same split, other content
    prepare(settings)
    assert settings.splits_path.read_bytes() != before


def test_the_manifest_survives_a_move_of_the_data_folder(synthetic_dir, settings_factory, tmp_path):
    """Paths are stored relative to the data folder: moving it changes neither the split nor its fingerprint."""
    first = tmp_path / "here" / "cells"
    shutil.copytree(synthetic_dir, first)
    settings = settings_factory(data_dir=first)
    prepare(settings)
    manifest = read_manifest(settings.splits_path)
    assert not any(p.startswith("/") for p in manifest["path"])
    before = images_fingerprint(manifest), images_fingerprint(manifest[manifest["split"] == "val"])
    moved = tmp_path / "elsewhere" / "cells"
    shutil.move(first, moved)
    moved_settings = settings.model_copy(update={"data_dir": moved})
    prepare(moved_settings)
    again = read_manifest(moved_settings.splits_path)
    assert (images_fingerprint(again), images_fingerprint(again[again["split"] == "val"])) == before
    paths = image_paths(again, source_roots(moved_settings))
    assert all(p.is_file() and moved in p.parents for p in paths)


def test_smear_fields_join_as_a_second_source_split_by_capture_block(synthetic_dir, settings_factory, tmp_path):
    import json

    from malaria.smear.synthetic import synthetic_field

    smears = tmp_path / "smears"
    (smears / "images").mkdir(parents=True)
    entries = []
    for i in range(30):  # 3 capture blocks of 10 fields
        field = synthetic_field(n_free=8, n_pairs=1, white_cell=False, edge_cells=0, platelets=0, seed=i)
        name = f"PA{171700 + i}.JPG"
        field.image.save(smears / "images" / name, quality=95)
        objects = [
            {"type": "ring" if infected else "red blood cell", "bbox": dict(zip("xywh", map(str, box), strict=True))}
            for box, infected in zip(field.cells, field.infected, strict=True)
        ]
        entries.append({"image_name": name, "objects": objects})
    (smears / "annotations.json").write_text(json.dumps(entries))
    settings = settings_factory(
        data_dir=synthetic_dir,
        smear_dir=smears,
        smear_cell_diameter_px=40,
        smear_uninfected_per_field={"train": 3, "val": 5, "test": 100},
    )
    frame, _ = prepare(settings)
    smear = frame[frame["source"] == "smear"]
    assert set(smear["split"]) == {"train", "val", "test"}
    assert smear.groupby("patient")["split"].nunique().max() == 1  # a capture block sits in one split
    per_field = smear.assign(field=smear["path"].str.extract(r"/(PA\d+)_")[0])
    uninfected = per_field[per_field["label"] == "Uninfected"].groupby(["split", "field"]).size()
    assert uninfected.loc["train"].max() == 3 and uninfected.loc["val"].max() == 5
    infected_boxes = sum(o["type"] == "ring" for e in entries for o in e["objects"])
    assert (smear["label"] == PARASITIZED).sum() == infected_boxes  # every infected cell kept
    crops = image_paths(smear, source_roots(settings))
    with Image.open(crops[0]) as crop:
        corner = np.asarray(crop.convert("RGB"))[0, 0]
    assert (corner == 0).all()  # cut on black, like the NIH crops
    assert read_manifest(settings.splits_path)["source"].value_counts().to_dict() == {
        "nih": 240,
        "smear": len(smear),
    }


def test_without_any_data_a_synthetic_set_is_generated_loudly(settings_factory, caplog):
    settings = settings_factory(synthetic_per_class=12)
    root = ensure_dataset(settings, allow_download=False)
    assert "SYNTHETIC" in caplog.text
    assert len(list((root / PARASITIZED).glob("*.png"))) == 12


def test_a_release_without_real_data_stops_instead_of_generating_some(settings_factory):
    settings = settings_factory(synthetic_per_class=12, allow_synthetic=False)
    with pytest.raises(DataError, match="no real data"):
        ensure_dataset(settings, allow_download=False)
    assert not (settings.workspace_data_dir / "synthetic_cell_images").exists()


def test_missing_data_dir_setting_is_a_clear_error(settings_factory, tmp_path):
    with pytest.raises(DataError, match="MALARIA_DATA_DIR"):
        ensure_dataset(settings_factory(data_dir=tmp_path / "absent"))


def test_dataset_report_has_counts_and_pictures(synthetic_dir, settings_factory, tmp_path):
    frame, report = scan_dataset(synthetic_dir, settings_factory())
    path = dataset_report(split_by_patient(frame, seed=1), synthetic_dir, report, tmp_path / "report")
    text = path.read_text()
    assert "240 usable images from 20 patients" in text
    assert "| Parasitized |" in text and "Patient-grouped split" in text
    for picture in ("class_balance.png", "image_sizes.png", "montage.png"):
        with Image.open(tmp_path / "report" / picture) as image:
            assert image.size[0] > 200 and np.asarray(image).std() > 0


def test_the_prefect_pipelines_cache_keys_are_the_settings_dvc_declares_plus_the_registry():
    from flows.pipeline import cache_params
    from malaria.config import Settings

    settings = Settings()
    trained_on = cache_params(settings, "prepare", "train")
    assert trained_on.keys() == {*Settings.dvc_params("prepare"), *Settings.dvc_params("train")}
    assert {"smear_infected_repeat", "smear_uninfected_per_field"} <= trained_on.keys()  # once missing by hand
    assert cache_params(settings, "register").keys() == {"mlflow_tracking_uri", "registered_model_name"}
    assert cache_params(settings, "evaluate").keys() == set(Settings.dvc_params("evaluate"))


def test_dvc_pipeline_parses_and_each_stage_depends_on_the_code_it_runs():
    import re
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from tests.conftest import REPO_ROOT

    dag = subprocess.run(
        [str(Path(sys.executable).with_name("dvc")), "dag", "--dot"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert dag.returncode == 0, dag.stderr
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert all(name in dag.stdout for name in stages)
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    from malaria.config import Settings

    for name, stage in stages.items():
        assert set(stage.get("params", [])) <= set(params), name
    for name in ("prepare", "train", "evaluate"):  # every setting the stage reads, from the settings class
        assert stages[name]["params"] == Settings.dvc_params(name), name
    declared = {n for stage in ("prepare", "train", "evaluate") for n in Settings.dvc_params(stage)}
    assert set(params) == declared
    defaults = Settings.model_construct()
    for name in declared:  # params.yaml restates the defaults: a changed default must change it too
        assert params[name] == getattr(defaults, name), name
        code = [dep for dep in stage["deps"] if dep.startswith("malaria/")]
        assert all((REPO_ROOT / dep).exists() for dep in code), name

    def module_file(name: str) -> str:
        """``malaria.x.y`` or ``flows.z`` -> its file, relative to the repo."""
        path = REPO_ROOT / Path(*name.split("."))
        return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(REPO_ROOT))

    def imported(source: str) -> list[str]:
        """The project modules a piece of code imports (at the top or inside functions)."""
        names = re.findall(r"^\s*from ((?:malaria|flows)\.[\w.]+) import", source, re.M)
        return names + [f"malaria.{n}" for n in re.findall(r"^\s*from malaria import (\w+)", source, re.M)]

    def imports(start: list[str]) -> set[str]:
        """The project files the modules ``start`` import, directly or through others."""
        found, todo = set(), list(start)
        while todo:
            name = todo.pop()
            if module_file(name) not in found:
                found.add(module_file(name))
                todo += imported((REPO_ROOT / module_file(name)).read_text())
        return found

    def command_modules(cmd: str) -> list[str]:
        """What a stage's ``malaria ...`` command runs: the modules its Typer function imports (no hand-picking)."""
        import inspect

        from malaria.cli import app

        words = cmd.split()[1:]
        group = next((g for g in app.registered_groups if g.name == words[0]), None)
        commands = group.typer_instance.registered_commands if group else app.registered_commands
        name = words[1] if group else words[0]
        command = next(c for c in commands if (c.name or c.callback.__name__.replace("_", "-")) == name)
        return imported(inspect.getsource(command.callback))

    def covered(file: str, deps: list[str]) -> bool:
        return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)

    for stage in ("prepare", "train", "evaluate", "register"):
        start = command_modules(stages[stage]["cmd"])
        assert start, f"{stage}: no module found behind {stages[stage]['cmd']!r}"
        missing = {f for f in imports(start) if not covered(f, stages[stage]["deps"])}
        assert not missing, f"{stage} does not depend on {sorted(missing)}"
    assert "malaria/smear/crops.py" in imports(["malaria.data"])  # imports inside functions count
    assert "flows/evaluate.py" in imports(command_modules("malaria evaluate"))  # the command's own modules


@pytest.fixture
def archive_server(tmp_path):
    """A local HTTP server for the NIH archive: yields (what it serves: set ``["body"]``, its URL); 404 when empty."""
    import http.server
    import threading

    served = {"body": b""}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if not served["body"]:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(served["body"])))
            self.end_headers()
            self.wfile.write(served["body"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_port}/cell_images.zip"
    server.shutdown()


def nih_zip(tmp_path: Path, cells: int) -> bytes:
    """A small archive in the NIH layout (``cell_images/Parasitized``, ``cell_images/Uninfected``)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for label in ("Parasitized", "Uninfected"):
            for i in range(cells):
                image = io.BytesIO()
                Image.new("RGB", (40, 40), (200, 100 + i, 120)).save(image, "PNG")
                bundle.writestr(f"cell_images/{label}/C{i}P1_cell_{i}.png", image.getvalue())
    return buffer.getvalue()


def test_the_nih_download_records_its_checksum_once_and_refuses_another_archive(
    settings_factory, tmp_path, archive_server
):
    served, url = archive_server
    settings = settings_factory(nih_archive_url=url)
    served["body"] = nih_zip(tmp_path, 3)
    folder = ensure_dataset(settings)
    assert folder == settings.nih_data_dir() and len(list(folder.rglob("*.png"))) == 6
    recorded = (folder.parent / "nih_archive.sha256").read_text().strip()
    assert recorded == hashlib.sha256(served["body"]).hexdigest()  # trust on first use, written down

    shutil.rmtree(folder)
    served["body"] = nih_zip(tmp_path, 4)  # the server now answers another archive
    with pytest.raises(DataError, match="checksum mismatch"):
        ensure_dataset(settings)  # not a silent fallback to generated cells
    assert not folder.exists()
    pinned = settings_factory(nih_archive_url=url, nih_archive_sha256="0" * 64)
    with pytest.raises(DataError, match="checksum mismatch"):
        ensure_dataset(pinned)


def test_a_release_without_the_archive_stops_instead_of_generating_cells(settings_factory, archive_server):
    _, url = archive_server  # answers 404
    release = settings_factory(nih_archive_url=url, allow_synthetic=False)
    with pytest.raises(DataError, match="no real data"):
        ensure_dataset(release)
    assert not (release.workspace_data_dir / "synthetic_cell_images").exists()

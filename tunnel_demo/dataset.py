"""Synthetic CT study for the demo and the tests.

Theory of operation: one template dataset (patient, study, series and image modules) is built once;
for every instance only the per-instance elements (SOP Instance UID, series, instance number, slice
position) and a handful of pixel values change before the file is written. Pixel data is one seeded
numpy phantom shared by all instances, so writing hundreds of 512x512 slices is disk-bound, not
CPU-bound. All UIDs are derived from ``seed`` (and the patient ID) as name-based
UUIDv5 (``2.25.<int>``), so a rerun with the same arguments writes byte-identical files.

The patient name and ID default to a canary: later tests grep logs for them to prove no PHI leaks.
Use distinct seeds for distinct studies that share a PACS.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

PHI_PATIENT_NAME = "CANARY^PATIENT"
PHI_PATIENT_ID = "PHI-CANARY-0001"

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:tunnel-demo:study")
_STUDY_DATE = "20240102"
_STUDY_TIME = "101500"
_SLICE_THICKNESS_MM = 1.0
_PIXEL_SPACING_MM = 0.7


@dataclass(frozen=True)
class StudyInfo:
    """What :func:`generate_study` wrote. ``files[i]`` holds ``sop_instance_uids[i]``."""

    study_uid: str
    series_uids: tuple[str, ...]
    sop_instance_uids: tuple[str, ...]
    files: list[Path]
    total_bytes: int


def _uid(seed: int, patient_id: str, *parts: object) -> str:
    """Deterministic UUID-derived ``2.25.<int>`` UID (PS3.5 B.2) for one role (study, series n, ...)."""
    name = "\x1f".join([str(seed), patient_id, *map(str, parts)])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _phantom(rows: int, cols: int, seed: int) -> np.ndarray:
    """A soft-tissue disc in air with seeded noise, stored as CT value + 1024 (unsigned)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:rows, :cols]
    radius = 0.42 * min(rows, cols)
    inside = (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 <= radius**2
    image = np.where(inside, 1064, 24).astype(np.int32)
    image += rng.integers(-20, 21, size=(rows, cols), dtype=np.int32)
    return np.clip(image, 0, 4095).astype("<u2")


def _template(rows: int, cols: int, study_uid: str, patient_name: str, patient_id: str) -> Dataset:
    """Every element shared by all instances of the study."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = _STUDY_TIME
    ds.AccessionNumber = "DEMO0001"
    ds.Modality = "CT"
    ds.Manufacturer = "tunnel-demo"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic CT for tunnel demo"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.SliceThickness = "1"
    ds.KVP = "120"
    ds.StudyInstanceUID = study_uid
    ds.StudyID = "1"
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [f"{_PIXEL_SPACING_MM:g}"] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    return ds


def _file_meta(sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _stamp(pixels: np.ndarray, index: int) -> bytes:
    """Make instance ``index``'s pixels unique by writing its number into the first row."""
    width = min(4, pixels.shape[1])
    saved = pixels[0, :width].copy()
    pixels[0, :width] = [(index >> (12 * k)) & 0xFFF for k in range(width)]
    data = pixels.tobytes()
    pixels[0, :width] = saved
    return data


def generate_study(
    out_dir: Path,
    n_instances: int,
    *,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    patient_name: str = PHI_PATIENT_NAME,
    patient_id: str = PHI_PATIENT_ID,
    series_count: int = 1,
) -> StudyInfo:
    """Write ``n_instances`` CT Image Storage Part-10 files into ``out_dir`` (created if missing).

    Instances are split into ``series_count`` contiguous series. Files are named ``CT000001.dcm``...
    and overwritten on rerun. Each file is about ``rows * cols * 2`` bytes plus a ~1 KiB header.
    """
    if n_instances < 1 or series_count < 1 or series_count > n_instances:
        raise ValueError("need n_instances >= series_count >= 1")
    if rows < 1 or cols < 1:
        raise ValueError("rows and cols must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = _uid(seed, patient_id, "study")
    series_uids = tuple(_uid(seed, patient_id, "series", s) for s in range(series_count))
    frame_uid = _uid(seed, patient_id, "frame")
    ds = _template(rows, cols, study_uid, patient_name, patient_id)
    ds.FrameOfReferenceUID = frame_uid
    pixels = _phantom(rows, cols, seed)
    sop_uids: list[str] = []
    files: list[Path] = []
    total = 0
    for index in range(n_instances):
        series = index * series_count // n_instances
        first_in_series = -(-series * n_instances // series_count)
        sop_uid = _uid(seed, patient_id, "instance", index)
        _set_instance(ds, index, series, index - first_in_series + 1, series_uids[series], sop_uid)
        ds.PixelData = _stamp(pixels, index)
        ds.file_meta = _file_meta(sop_uid)
        path = out_dir / f"CT{index + 1:06d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        total += path.stat().st_size
        sop_uids.append(sop_uid)
        files.append(path)
    return StudyInfo(study_uid, series_uids, tuple(sop_uids), files, total)


def _set_instance(ds: Dataset, index: int, series: int, number: int, series_uid: str, sop_uid: str) -> None:
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series + 1
    ds.SeriesDescription = f"Axial {series + 1}"
    ds.InstanceNumber = number
    z = f"{-number * _SLICE_THICKNESS_MM:g}"
    ds.ImagePositionPatient = [
        f"{-_PIXEL_SPACING_MM * ds.Columns / 2:g}",
        f"{-_PIXEL_SPACING_MM * ds.Rows / 2:g}",
        z,
    ]
    ds.SliceLocation = z


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tunnel_demo.dataset OUT_DIR --instances N [--rows R --cols C --seed S --series K]``."""
    parser = argparse.ArgumentParser(prog="python -m tunnel_demo.dataset", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--instances", type=int, required=True)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--series", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        info = generate_study(
            args.out_dir,
            args.instances,
            rows=args.rows,
            cols=args.cols,
            seed=args.seed,
            series_count=args.series,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {len(info.files)} instances in {len(info.series_uids)} series, {info.total_bytes} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

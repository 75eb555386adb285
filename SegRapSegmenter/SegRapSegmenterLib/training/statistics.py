"""A bundle's training statistics (``inference.statistics``), from the training labels it was trained on.

Two sources: an nnU-Net raw dataset's ``labelsTr`` (Task 1's 54-class maps are recomposed into the 45
OARs; Task 2's maps give GTVp and GTVnd), or the synthetic phantom cohort the demo recipe trains on.
Usage: ``python -m SegRapSegmenterLib.training.statistics BUNDLE (--labels DIR --task oar|gtv ... |
--phantom-cohort N --seed S [--sizes small,full])``; both kinds of source may be combined.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..anatomy import structures as S
from ..errors import InputError
from ..inference.statistics import summarize, volumes_ml, write_statistics

LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def label_volumes(path: Path, task: str) -> dict[str, float]:
    """The structures' volumes (ml) in one training label map of ``task``."""
    image = sitk.ReadImage(str(path))
    labels = sitk.GetArrayViewFromImage(image)
    masks = dict(S.recompose(np.asarray(labels)).items()) if task == "oar" else S.recompose_gtv(np.asarray(labels))
    return volumes_ml(masks, image.GetSpacing())


def labels_folder_volumes(folder: str | Path, task: str) -> list[dict[str, float]]:
    """Every label map's volumes in an nnU-Net ``labelsTr`` folder."""
    return list(labels_folder_volumes_by_case(folder, task).values())


def labels_folder_volumes_by_case(folder: str | Path, task: str) -> dict[str, dict[str, float]]:
    """Every label map's volumes in an nnU-Net ``labelsTr`` folder, by case identifier (the file name)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.name.lower().endswith(LABEL_SUFFIXES)) if folder.is_dir() else []
    if not files:
        raise InputError(f"{folder}: no label maps ({', '.join(LABEL_SUFFIXES)}); give nnU-Net's labelsTr folder.")
    return {_case_id(p): label_volumes(p, task) for p in files}


def _case_id(path: Path) -> str:
    name = path.name
    return next((name[: -len(s)] for s in LABEL_SUFFIXES if name.lower().endswith(s)), name)


def phantom_volumes(cases: int, seed: int, sizes: tuple[str, ...] = ("small",)) -> list[dict[str, float]]:
    """Each phantom training case's volumes (OARs and GTVs), for the demo bundle."""
    from ..phantom import cases as phantom

    out = []
    for size in sizes:
        for index in range(cases):
            case = phantom.make_case(index, seed=seed, size=size)
            masks = {**dict(case.oar_masks().items()), **case.gtv_masks()}
            out.append(volumes_ml(masks, case.ct.GetSpacing()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a bundle's structure_stats.json from its training labels.")
    parser.add_argument("bundle", help="the bundle folder (its manifest gains the file's checksum)")
    parser.add_argument("--labels", action="append", default=[], help="an nnU-Net labelsTr folder (repeatable)")
    parser.add_argument("--task", action="append", default=[], choices=("oar", "gtv"),
                        help="the task of each --labels folder, in the same order")
    parser.add_argument("--phantom-cohort", type=int, default=0, help="phantom training cases (the demo recipe's)")
    parser.add_argument("--seed", type=int, default=2023, help="the phantom cohort's seed")
    parser.add_argument("--sizes", default="small", help="phantom sizes, comma-separated (small, full)")
    args = parser.parse_args(argv)
    if len(args.labels) != len(args.task):
        parser.error("give one --task for each --labels folder")
    by_case: dict[str, dict[str, float]] = {}  # Task 1's and Task 2's label maps of one case make one case
    sources = []
    for folder, task in zip(args.labels, args.task):
        found = labels_folder_volumes_by_case(folder, task)
        for case_id, volumes in found.items():
            by_case.setdefault(case_id, {}).update(volumes)
        sources.append(f"{task} labels {folder} ({len(found)} label maps)")
    per_case = list(by_case.values())
    if args.phantom_cohort:
        sizes = tuple(s.strip() for s in args.sizes.split(",") if s.strip())
        per_case += phantom_volumes(args.phantom_cohort, args.seed, sizes)
        sources.append(f"phantom cohort of {args.phantom_cohort} cases, seed {args.seed}, sizes {','.join(sizes)}")
    if not per_case:
        parser.error("give --labels/--task or --phantom-cohort")
    path = write_statistics(args.bundle, summarize(per_case, "; ".join(sources)))
    print(f"wrote {path} ({len(per_case)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

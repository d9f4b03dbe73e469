"""Pre-flight check of detection datasets, to run before a long job: ``tools/check_dataset.py``, or at the start
of training with ``DATASETS.CHECK_BEFORE_TRAINING``.

Levels:

* ``"files"``: every image file a record names exists (and its ``pan_seg_file_name`` / ``sem_seg_file_name``);
  one ``stat`` per file.
* ``"full"``: also, every image decodes as the dataset mapper decodes it (Detectron2's ``read_image``, EXIF
  orientation applied) and has the record's ``height`` and ``width``; segmentation files decode and have the
  image's size; every annotation has a box (absolute mode) that is finite, has no negative width or height and
  lies inside the image (``BOX_SLACK`` pixels of slack), and a ``category_id`` in ``0 .. num_classes - 1``
  (panoptic ``segments_info`` too). Boxes of zero width or height pass: the mapper drops them.

Typical use, for datasets registered in your own script::

    from d2_detr.data.check import check_datasets
    problems = check_datasets(["my_train", "my_val"], num_workers=8)
    for problem in problems:
        print(problem)  # "my_train: images/0042.jpg: cannot be decoded (OSError: image file is truncated ...)"
"""
import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch.utils.data as torchdata
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .images import ImageReadError, read_dataset_image

logger = logging.getLogger(__name__)

__all__ = [
    "BOX_SLACK",
    "LEVELS",
    "DatasetCheckError",
    "DatasetProblem",
    "check_before_training",
    "check_dataset_dicts",
    "check_datasets",
    "check_record",
]

LEVELS = ("none", "files", "full")
#: Pixels a box may extend past the image border (rounding in annotation tools) before it is reported.
BOX_SLACK = 1.0
_SEGMENTATION_FILES = ("pan_seg_file_name", "sem_seg_file_name")
_ABSOLUTE_BOX_MODES = (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
_PROGRESS_STEPS = 20  # progress is logged every 1/20 of a dataset ...
_PROGRESS_MIN_IMAGES = 100  # ... but not more often than every 100 images


@dataclass(frozen=True)
class DatasetProblem:
    """One problem of one record: the dataset's name, the record's image file, what is wrong."""

    dataset: str
    file_name: str
    message: str

    def __str__(self) -> str:
        return f"{self.dataset}: {self.file_name}: {self.message}"


class DatasetCheckError(ValueError):
    """Problems found by a dataset check: ``problems`` holds all of them, the message the first ``shown``."""

    def __init__(self, problems: Sequence[DatasetProblem], shown: int = 20):
        self.problems = list(problems)
        files = len({(p.dataset, p.file_name) for p in self.problems})
        lines = [f"  {p}" for p in self.problems[:shown]]
        if len(self.problems) > shown:
            lines.append(f"  ... and {len(self.problems) - shown} more")
        super().__init__(
            f"{len(self.problems)} problems in {files} records of the datasets:\n" + "\n".join(lines) + "\n"
            "Fix or remove those images or records (python tools/check_dataset.py --config-file CONFIG lists "
            "them all), or set DATASETS.CHECK_BEFORE_TRAINING none to train without the check.")


def _box_problem(annotation: Dict, height: Optional[int], width: Optional[int]) -> Optional[str]:
    if "bbox" not in annotation:
        return "has no bbox"
    box = annotation["bbox"]
    try:
        mode = BoxMode(annotation.get("bbox_mode"))
    except ValueError:
        return f"has an unknown bbox_mode {annotation.get('bbox_mode')!r}"
    if mode not in _ABSOLUTE_BOX_MODES:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in BoxMode.convert(list(box), mode, BoxMode.XYXY_ABS))
    except (TypeError, ValueError, AssertionError):
        return f"bbox {box!r} is not 4 numbers"
    if not all(map(math.isfinite, (x0, y0, x1, y1))):
        return f"bbox {box!r} is not finite"
    if x1 < x0 or y1 < y0:
        return f"bbox {box!r} ({mode.name}) has a negative width or height"
    if height is not None and width is not None and (
        min(x0, y0) < -BOX_SLACK or x1 > width + BOX_SLACK or y1 > height + BOX_SLACK
    ):
        return f"bbox {box!r} ({mode.name}) extends outside the {width}x{height} image"
    return None


def _category_problem(category_id, num_classes: Optional[int]) -> Optional[str]:
    if num_classes is None:
        return None
    if not isinstance(category_id, (int, np.integer)) or not 0 <= category_id < num_classes:
        return f"category_id {category_id!r} is not a class id 0..{num_classes - 1} of the dataset's {num_classes}"
    return None


def _annotation_problems(record: Dict, height: Optional[int], width: Optional[int],
                         num_classes: Optional[int]) -> List[str]:
    problems = []
    for i, annotation in enumerate(record.get("annotations", ())):
        for problem in (_box_problem(annotation, height, width),
                        _category_problem(annotation.get("category_id"), num_classes)):
            if problem:
                problems.append(f"annotation {i}: {problem}")
    for i, segment in enumerate(record.get("segments_info", ())):
        problem = _category_problem(segment.get("category_id"), num_classes)
        if problem:
            problems.append(f"segment {i}: {problem}")
    return problems


def check_record(record: Dict, *, level: str = "full", image_format: str = "RGB",
                 num_classes: Optional[int] = None) -> List[str]:
    """What is wrong with one dataset record (Detectron2's dataset dict), as messages; [] if nothing.

    Args:
        level: "files" or "full" (see the module's docstring).
        image_format: the format the mapper reads images in (INPUT.FORMAT).
        num_classes: category ids must be below it; None: not checked.
    """
    file_name = record.get("file_name")
    if not file_name:
        return ["the record has no file_name"]
    files = [("image", file_name)] + [(key, record[key]) for key in _SEGMENTATION_FILES if key in record]
    missing = [f"{key} {path} does not exist" if key != "image" else "image file does not exist"
               for key, path in files if not PathManager.isfile(path)]
    if missing or level == "files":
        return missing

    problems = []
    height, width = record.get("height"), record.get("width")
    try:
        image_shape = read_dataset_image(file_name, image_format).shape[:2]
    except ImageReadError as e:
        cause = e.__cause__
        problems.append(f"cannot be decoded ({type(cause).__name__}: {cause})")
        image_shape = None
    if image_shape is not None:
        if height is not None and width is not None and tuple(image_shape) != (height, width):
            problems.append(f"the image is {image_shape[1]}x{image_shape[0]} (width x height) but its record "
                            f"says {width}x{height}")
        height, width = image_shape
    for key, path in files[1:]:
        try:
            shape = utils.read_image(path).shape[:2]
        except (OSError, SyntaxError, ValueError) as e:
            problems.append(f"{key} {path} cannot be decoded ({type(e).__name__}: {e})")
            continue
        if image_shape is not None and tuple(shape) != tuple(image_shape):
            problems.append(f"{key} {path} is {shape[1]}x{shape[0]}, the image {image_shape[1]}x{image_shape[0]}")
    return problems + _annotation_problems(record, height, width, num_classes)


class _RecordChecks(torchdata.Dataset):
    """Item i: (i, check_record(dicts[i], **kwargs)), for a DataLoader's worker processes."""

    def __init__(self, dicts: Sequence[Dict], **kwargs):
        self.dicts, self.kwargs = dicts, kwargs

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, i: int) -> Tuple[int, List[str]]:
        return i, check_record(self.dicts[i], **self.kwargs)


def _identity(item):
    return item


def check_dataset_dicts(dicts: Sequence[Dict], dataset: str, *, level: str = "full", image_format: str = "RGB",
                        num_classes: Optional[int] = None, num_workers: int = 0) -> List[DatasetProblem]:
    """:func:`check_record` on every record of ``dicts`` (named ``dataset`` in the problems and the progress
    log), with the decoding in ``num_workers`` processes (level "full"); progress is logged every 5%."""
    if level not in LEVELS:
        raise ValueError(f"Unknown dataset check level {level!r}; expected one of {LEVELS}")
    if level == "none":
        return []
    checks = _RecordChecks(dicts, level=level, image_format=image_format, num_classes=num_classes)
    results: Iterable[Tuple[int, List[str]]]
    if num_workers > 0 and level == "full":
        results = torchdata.DataLoader(checks, batch_size=None, num_workers=num_workers, collate_fn=_identity)
    else:
        results = map(checks.__getitem__, range(len(checks)))
    total, problems = len(dicts), []
    step = max(_PROGRESS_MIN_IMAGES, math.ceil(total / _PROGRESS_STEPS))
    start = time.perf_counter()
    logger.info(f"Checking {total:,} images of {dataset} (level {level!r}) ...")
    for done, (i, messages) in enumerate(results, 1):
        problems.extend(DatasetProblem(dataset, dicts[i].get("file_name") or "?", m) for m in messages)
        if done % step == 0 or done == total:
            rate = done / max(time.perf_counter() - start, 1e-9)
            logger.info(f"{dataset}: {done:,}/{total:,} images checked ({100 * done // total}%), "
                        f"{len(problems)} problems, {rate:,.0f} images/s")
    return problems


def _num_classes(name: str, dicts: Sequence[Dict]) -> Optional[int]:
    """Class count of a loaded dataset: its stuff_classes for panoptic records (Detectron2's panoptic category
    ids span things and stuff), else its thing_classes; None if the metadata has neither."""
    metadata = MetadataCatalog.get(name)
    panoptic = any("segments_info" in d for d in dicts[:1])
    classes = metadata.get("stuff_classes") if panoptic else None
    classes = classes if classes is not None else metadata.get("thing_classes")
    return None if classes is None else len(classes)


def check_datasets(names: Iterable[str], *, level: str = "full", image_format: str = "RGB",
                   num_workers: int = 0) -> List[DatasetProblem]:
    """Load each registered dataset and :func:`check_dataset_dicts` it, category ids against its own classes.
    A dataset that fails to load is one problem (its file_name: the metadata's json_file, if any).

    Raises:
        KeyError: if a name is not registered.
    """
    problems: List[DatasetProblem] = []
    for name in names:
        if name not in DatasetCatalog.list():
            raise KeyError(f"Dataset {name!r} is not registered; registered: {', '.join(DatasetCatalog.list())}")
        try:
            dicts = DatasetCatalog.get(name)
        except Exception as e:  # the loader of a registered dataset may raise anything
            source = MetadataCatalog.get(name).get("json_file", "?")
            problems.append(DatasetProblem(name, source, f"cannot be loaded ({type(e).__name__}: {e})"))
            continue
        problems += check_dataset_dicts(dicts, name, level=level, image_format=image_format,
                                        num_classes=_num_classes(name, dicts), num_workers=num_workers)
    return problems


def check_before_training(cfg, train_dicts: Sequence[Dict]) -> None:
    """The check of ``cfg.DATASETS.CHECK_BEFORE_TRAINING`` on the training records (as the train loader gets
    them) and on every DATASETS.TEST dataset, category ids against MODEL.DETR.NUM_CLASSES. Each process checks
    its share of the records; all processes raise the same error.

    Raises:
        DatasetCheckError: listing what is wrong, before the first iteration.
    """
    level = cfg.DATASETS.CHECK_BEFORE_TRAINING
    if level not in LEVELS:
        raise ValueError(f"DATASETS.CHECK_BEFORE_TRAINING={level!r}; expected one of {LEVELS}")
    if level == "none":
        return
    rank, world = comm.get_rank(), comm.get_world_size()
    kwargs = dict(level=level, image_format=cfg.INPUT.FORMAT, num_classes=cfg.MODEL.DETR.NUM_CLASSES,
                  num_workers=cfg.DATALOADER.NUM_WORKERS)
    problems = check_dataset_dicts(train_dicts[rank::world], "+".join(cfg.DATASETS.TRAIN), **kwargs)
    for name in cfg.DATASETS.TEST:
        problems += check_dataset_dicts(DatasetCatalog.get(name)[rank::world], name, **kwargs)
    problems = [p for shard in comm.all_gather(problems) for p in shard]
    if problems:
        raise DatasetCheckError(problems)

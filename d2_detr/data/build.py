"""Data loaders that Detectron2 v0.6 lacks: a test loader with more than one image per batch."""
import torch.utils.data as torchdata
from detectron2.data import DatasetFromList, MapDataset, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import InferenceSampler

__all__ = ["build_batched_test_loader"]


def build_batched_test_loader(dataset_name: str, mapper, batch_size: int = 1, num_workers: int = 0):
    """Like Detectron2's ``build_detection_test_loader`` (every image once, split across processes by
    ``InferenceSampler``), with ``batch_size`` images per batch in each process."""
    dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    dataset = MapDataset(DatasetFromList(dicts, copy=False), mapper)
    batch_sampler = torchdata.BatchSampler(InferenceSampler(len(dataset)), batch_size, drop_last=False)
    return torchdata.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                                collate_fn=trivial_batch_collator)

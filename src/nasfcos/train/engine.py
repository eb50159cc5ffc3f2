"""Run a detector over a data set: detections in COCO format and COCO AP.

Shared by ``nasfcos train`` (final and periodic evaluation), ``nasfcos eval``, the demo and the search's
optional AP reward, so every number the project reports comes from the same code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from nasfcos.data.loader import DetectionDataset
from nasfcos.data.records import DetectionSet
from nasfcos.data.coco_eval import coco_evaluate, detections_to_coco

__all__ = ["list_collate", "predict_dataset", "evaluate_model"]


def list_collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Keep images as a list: the detector resizes, normalises and pads them itself."""
    images, targets = zip(*batch)
    return list(images), list(targets)


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    dataset: DetectionSet,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: Any | None = None,
) -> list[dict[str, Any]]:
    """Detections for every image of ``dataset`` as COCO result dicts (original category ids, xywh)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(
        DetectionDataset(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=list_collate
    )
    results: list[dict[str, Any]] = []
    done = 0
    for images, targets in loader:
        outputs = model([image.to(device) for image in images])
        outputs = [{key: value.cpu() for key, value in out.items()} for out in outputs]
        image_ids = [int(target["image_id"]) for target in targets]
        results.extend(detections_to_coco(outputs, image_ids, dataset.category_ids))
        done += len(images)
        if progress is not None:
            progress(done, len(dataset))
    model.train(was_training)
    return results


def evaluate_model(
    model: nn.Module,
    dataset: DetectionSet,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    progress: Any | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """``(COCO metrics, detections)`` of ``model`` on ``dataset`` (VOC sets go through the same protocol)."""
    detections = predict_dataset(model, dataset, batch_size=batch_size, device=device, progress=progress)
    metrics = coco_evaluate(dataset.to_coco_dict(), detections)
    return metrics, detections

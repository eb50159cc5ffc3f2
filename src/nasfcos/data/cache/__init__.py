"""The search's feature cache: frozen-backbone features C2..C5, FCOS targets and ground truth of fixed crops.

Why (paper Sec. 3.3, 4.1; FACTS 5): the proxy task trains thousands of candidate decoders on the same images
with a *frozen* backbone, so the backbone runs once per image here and never again during the search. Every
image of the (training) split is

1. assigned to meta-train or meta-val by :meth:`DetectionSet.split` (deterministic in ``seed``; the paper draws
   4000 / 1715 of VOC's 5715 training images: the default ``meta_train=0.7`` gives exactly that on VOC);
2. resized to short side ``crop`` and randomly cropped to ``crop x crop`` (:class:`RandomSquareCrop`: boxes
   are scaled, clipped, and dropped when less than 25 % of their area stays visible). The crop of an image is
   drawn from a generator seeded by ``(seed, image_id)`` alone (:func:`crop_seed`), so it does not depend on
   the batch size, the split or the order of the records;
3. normalised with ImageNet mean/std (what :class:`~nasfcos.detection.detector.FCOSDetector` uses) and run
   through the frozen backbone (eval mode, frozen BN, no grad) in batches.

What is stored, per split (``train/`` = meta-train, ``val/`` = meta-val), as ``.npy`` files read back
memory-mapped (``np.load(mmap_mode="r")``):

- ``c2.npy .. c5.npy``: ``[N, C, H, W]`` features, float16 by default (``dtype="float32"`` to keep full
  precision; a float16 overflow is reported, never silently stored as ``inf``);
- ``labels.npy`` int16 ``[N, P]`` (``-1`` background), ``reg.npy`` float32 ``[N, P, 4]`` (pixels),
  ``centerness.npy`` float32 ``[N, P]``, ``matched.npy`` int32 ``[N, P]`` (index of the matched object in the
  image's ground-truth list, ``-1`` background): FCOS targets of the crop for the ``P`` points of P3..P7
  (strides 8..128, :data:`~nasfcos.detection.targets.DEFAULT_RANGES`), assigned once here with
  :func:`~nasfcos.detection.targets.assign_targets_batch` (vanilla: FCOS v1, no centre sampling). With
  ``fcos="improved"`` the same four arrays are also stored with the suffix ``_improved`` (centre sampling
  radius 1.5; distances stay in pixels, as the improved head outputs pixels);
- ground truth of every crop for the AP reward: ``gt_boxes.npy`` float32 ``[M, 4]`` xyxy crop pixels,
  ``gt_labels.npy`` int64 ``[M]``, ``gt_ignore.npy`` bool ``[M]`` (crowd / VOC difficult objects: not trained
  on, ignored by the evaluation), ``gt_offsets.npy`` int64 ``[N + 1]`` (image ``i`` owns rows
  ``offsets[i]:offsets[i+1]``), ``image_ids.npy`` int64 ``[N]``, ``affine.npy`` float32 ``[N, 4]``
  (``x_crop = a x + b``, ``y_crop = c y + d`` from original pixels) and ``orig_size.npy`` int32 ``[N, 2]``.

``manifest.json`` is written **last**, atomically: a folder is a valid cache only if its manifest exists,
parses and matches the files. The manifest's ``key`` holds every input that decides the contents (format
version, backbone, weights hash, crop, seed, split sizes, a fingerprint of the records, dtype, FCOS modes,
normalisation). :func:`build_cache` with the same key returns the existing cache at once (``reused=True``);
a different key rebuilds (or raises :class:`UserError` with ``overwrite=False``). Building happens in a
temporary sub-folder that is renamed into place at the end (old manifest removed first), so a crash leaves
either the old valid cache, or no manifest — never a manifest over half-written arrays.

Size: a ResNet-50 cache at the paper's 384 crop is ~8.8 MB per image in float16 (C2 alone is 4.7 MB), about
50 GB for VOC's 5715 images; ResNet-18 at 128 px is 0.25 MB per image.

The code is split by job: :mod:`~nasfcos.data.cache.format` (names, version, manifest checks, crop seeds),
:mod:`~nasfcos.data.cache.reader` (:class:`FeatureCache`, memory-mapped splits, the proxy's
:class:`SplitTensors`) and :mod:`~nasfcos.data.cache.builder` (:func:`build_cache`). This package re-exports
their public names; import from here.
"""

from __future__ import annotations

from nasfcos.data.cache.builder import build_cache, crop_record, detector_backbone_state
from nasfcos.data.cache.format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    FCOS_RULES,
    LEVELS,
    SPLITS,
    crop_seed,
    level_sizes,
    records_fingerprint,
    target_suffix,
)
from nasfcos.data.cache.reader import (
    CachedSplit,
    FeatureCache,
    SplitTensors,
    clear_resident,
    split_nbytes,
    take_rows,
)

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "FCOS_RULES",
    "LEVELS",
    "SPLITS",
    "CachedSplit",
    "FeatureCache",
    "SplitTensors",
    "build_cache",
    "clear_resident",
    "crop_record",
    "crop_seed",
    "detector_backbone_state",
    "level_sizes",
    "records_fingerprint",
    "split_nbytes",
    "take_rows",
    "target_suffix",
]

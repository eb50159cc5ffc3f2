"""Data: COCO/VOC readers and validation, the built-in synthetic set, box-preserving transforms, loaders, COCO
evaluation (:mod:`~nasfcos.data.coco_eval`) and the search's feature cache (:mod:`~nasfcos.data.cache`).
Everything becomes a :class:`nasfcos.data.records.DetectionSet`."""

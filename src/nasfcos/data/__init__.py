"""Data: COCO/VOC readers and validation, the built-in synthetic set, box-preserving transforms, loaders and
the search's feature cache. Everything becomes a :class:`nasfcos.data.records.DetectionSet`."""

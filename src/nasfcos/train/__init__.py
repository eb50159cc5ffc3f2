"""Full training and evaluation: config-driven trainer (resumable, DDP), optimiser and schedule, checkpoints,
and the inference loop behind COCO AP (the run logger is :mod:`nasfcos.logs`, COCO scoring
:mod:`nasfcos.data.coco_eval`: the search uses both too)."""

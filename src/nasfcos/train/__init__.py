"""Full training and evaluation: config-driven trainer (resumable, DDP), optimiser and schedule, checkpoints,
logging, and COCO evaluation through pycocotools."""

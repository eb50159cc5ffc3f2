"""Moved to :mod:`nasfcos.data.coco_eval` (training and the search both score detections); kept while older
imports remain."""

from nasfcos.data.coco_eval import *  # noqa: F401,F403
from nasfcos.data.coco_eval import __all__  # noqa: F401

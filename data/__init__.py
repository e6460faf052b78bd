"""Data: the built-in phantom chest X-rays, image readers and the paper's preprocessing/augmentation.

`from data import LABELS, read_image, list_images` (API.md): the paper's 7 labels (data/labels.py), one image
file -> array, a folder -> its image paths (data/readers.py).
"""

from .labels import LABELS
from .readers import list_images, read_image

__all__ = ["LABELS", "list_images", "read_image"]

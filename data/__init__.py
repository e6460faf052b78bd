"""Data: image readers, datasets, the training loader, the paper's preprocessing/augmentation and the phantoms.

`from data import LABELS, read_image, list_images` (API.md): the paper's 7 labels, one image file -> array,
a folder -> its image paths (all three in data/readers.py).
"""

from .readers import LABELS, list_images, read_image

__all__ = ["LABELS", "list_images", "read_image"]

"""Reading a dataset's image, with an error that names the file when it is missing or cannot be decoded."""
import numpy as np
from detectron2.data import detection_utils as utils
from PIL import Image

__all__ = ["ImageReadError", "read_dataset_image"]

CHECK_HINT = ("tools/check_dataset.py (or DATASETS.CHECK_BEFORE_TRAINING full) lists every such file of a "
              "dataset before a run")


class ImageReadError(OSError):
    """An image file of a dataset is missing or cannot be decoded; the message names the file."""


def read_dataset_image(file_name: str, image_format: str) -> np.ndarray:
    """Detectron2's ``read_image(file_name, format=image_format)``: (H, W, C) uint8, EXIF orientation applied.

    Raises:
        ImageReadError: naming ``file_name``, if it is missing, truncated or not an image PIL can decode.
    """
    try:
        return utils.read_image(file_name, format=image_format)
    except FileNotFoundError as e:
        raise ImageReadError(f"Image file {file_name} does not exist. Fix the dataset's file_name (or its "
                             f"image_root), or remove the image's record; {CHECK_HINT}.") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL raises OSError for truncated and unidentified files, SyntaxError or ValueError for some corrupt ones.
        raise ImageReadError(f"Image file {file_name} cannot be read ({type(e).__name__}: {e}); it is truncated, "
                             f"corrupt, unreadable or not an image. Replace it, or remove the image's record from "
                             f"the dataset; {CHECK_HINT}.") from e

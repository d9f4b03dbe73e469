"""d2_detr.data.images: a dataset image that is missing or cannot be decoded gives an error naming the file."""
import numpy as np
import pytest
from PIL import Image

from d2_detr.data.images import ImageReadError, read_dataset_image

from .coco_files import truncate


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_truncated_image_is_named(tmp_path, image_format):
    path = str(tmp_path / f"image.{image_format}")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(path)
    assert read_dataset_image(path, "RGB").shape == (64, 80, 3)
    truncate(path)
    with pytest.raises(ImageReadError, match=f"Image file {path} cannot be read.*truncated.*check_dataset.py"):
        read_dataset_image(path, "RGB")


def test_missing_and_non_image_files_are_named(tmp_path):
    missing = str(tmp_path / "missing.jpg")
    with pytest.raises(ImageReadError, match=f"Image file {missing} does not exist. Fix the dataset's file_name"):
        read_dataset_image(missing, "RGB")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageReadError, match=f"Image file {text} cannot be read \\(UnidentifiedImageError"):
        read_dataset_image(str(text), "RGB")
    assert issubclass(ImageReadError, OSError)  # callers catching OSError still do

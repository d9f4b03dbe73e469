"""Run a d2-detr ONNX export with onnxruntime and numpy only:  python export_onnxruntime.py model.onnx [THRESHOLD]"""
import sys

import numpy as np
import onnxruntime as ort


def detect(session, images, threshold=0.5):
    """images: HxWx3 uint8 arrays in the config's INPUT.FORMAT (RGB for the DETR configs), already resized as at
    test time (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST). Returns per image boxes (n, 4) xyxy pixels, scores, labels."""
    height, width = max(im.shape[0] for im in images), max(im.shape[1] for im in images)
    batch = np.zeros((len(images), 3, height, width), np.float32)  # padded bottom/right
    for i, im in enumerate(images):
        batch[i, :, : im.shape[0], : im.shape[1]] = im.transpose(2, 0, 1)
    sizes = np.array([im.shape[:2] for im in images], np.int64)
    boxes, scores, labels = session.run(["boxes", "scores", "labels"], {"images": batch, "image_sizes": sizes})
    return [(b[s >= threshold], s[s >= threshold], l[s >= threshold]) for b, s, l in zip(boxes, scores, labels)]


session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (480, 640, 3), np.uint8), rng.integers(0, 256, (400, 300, 3), np.uint8)]
for i, (boxes, scores, labels) in enumerate(detect(session, images, float(sys.argv[2]) if len(sys.argv) > 2 else 0.5)):
    print(f"image {i}: {len(scores)} detections", *(f"class {l} score {s:.2f} box {b.round(1).tolist()}"
                                                     for b, s, l in zip(boxes, scores, labels)), sep="\n  ")

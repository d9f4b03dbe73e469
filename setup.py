#!/usr/bin/env python
"""d2-detr: DETR (End-to-End Object Detection with Transformers) as Detectron2 components.

detectron2 itself is not listed in install_requires: it is not on the package registry under its own
name. Install it first (an official build, or `python tools/install_detectron2.py`, see README.md).
Optional features are extras: `pip install -e ".[export]"` (ONNX export), `".[panoptic]"` (panoptic quality
evaluation); d2_detr.env.EXTRAS lists the same.
"""
from setuptools import find_packages, setup

setup(
    name="d2-detr",
    version="0.1.0",
    description="DETR as a Detectron2 plugin: model, Hungarian matcher, set criterion, configs and tools",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",  # torch 2.5 needs 3.9
    packages=find_packages(include=("d2_detr", "d2_detr.*")),
    install_requires=[
        # The oldest torch d2_detr runs on (d2_detr/env.py checks it at import): fused AdamW/SGD kernels on the CPU
        # came with torch 2.4, torch.onnx.export's dynamo argument with 2.5; torchvision 0.20 is 2.5's release.
        "torch>=2.5",
        "torchvision>=0.20",
        "scipy",
        "fvcore",
        "pycocotools>=2.0.2",
        # detectron2 imports cv2 in its Visualizer (demo, quickstart pictures) but leaves it to the user.
        "opencv-python-headless",
    ],
    extras_require={
        "dev": ["pytest"],
        # d2_detr.export / tools/export_model.py: torch.onnx writes the graph, onnx checks the file
        # (onnx.checker), onnxruntime runs it on the CPU to verify it against the PyTorch model.
        "export": ["onnx>=1.13", "onnxruntime>=1.14"],
        # Panoptic quality evaluation: Detectron2's COCOPanopticEvaluator imports `panopticapi`, which is not on the
        # registry under that name; panopticapi-lite provides the same module (and requires numpy < 2).
        "panoptic": ["panopticapi-lite==0.2.0"],
    },
)

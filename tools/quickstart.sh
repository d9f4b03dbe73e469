#!/usr/bin/env bash
# The main job on the built-in default: set up .venv if needed, train DETR from scratch on the built-in
# synthetic shapes dataset (CPU), evaluate it with Detectron2's COCO evaluator (AP table), and draw the
# predictions on a few validation images. Extra arguments are config overrides (KEY VALUE ...). A second run
# starts over, replacing the first one's checkpoints in output/quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export DETECTRON2_DATASETS=${DETECTRON2_DATASETS:-datasets}
config=configs/quickstart_cpu.yaml
out=output/quickstart
.venv/bin/python tools/train_net.py --config-file "$config" --overwrite-output-dir OUTPUT_DIR "$out" "$@"
val_images=("$DETECTRON2_DATASETS"/synthetic_shapes_val/images/00000[0-5].png)
.venv/bin/python tools/demo.py --config-file "$config" --input "${val_images[@]}" --output "$out/visualized" \
  --confidence-threshold 0.3 --opts MODEL.WEIGHTS "$out/model_final.pth" OUTPUT_DIR "$out" "$@"
echo
echo "== COCO evaluation of $out/model_final.pth on synthetic_shapes_val =="
grep -A 3 "Evaluation results for bbox" "$out/log.txt" | tail -n 3
echo "Predictions drawn on validation images: $out/visualized/"
echo "Full log: $out/log.txt    TensorBoard: .venv/bin/tensorboard --logdir $out"

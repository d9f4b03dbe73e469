"""The ``Dino`` meta-architecture (Zhang et al. 2023, "DINO: DETR with Improved DeNoising Anchor Boxes"): Deformable
DETR's backbone levels and encoder, queries selected from the encoder, a decoder refining anchor boxes, and
contrastive denoising in training.

The three ingredients of the paper are options: contrastive denoising (``dn_number`` 0 turns it off, see
:mod:`~d2_detr.modeling.denoising`), mixed query selection (``query_selection`` of
:class:`~d2_detr.modeling.dino_transformer.DinoTransformer`) and look forward twice
(:class:`~d2_detr.layers.dino_decoder.DinoDecoder`).

Parameter names follow the original checkpoints (``input_proj.N``, ``transformer.*``, ``label_enc``,
``class_embed.N`` and ``bbox_embed.N``: one class and one box head shared by every decoder layer); the encoder's
heads, separate, are ``enc_class_embed`` and ``enc_bbox_embed`` here (``transformer.enc_out_*`` there).
"""
from typing import Dict, List, Optional, Tuple

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from torch import Tensor, nn

from ..layers.box_ops import refine_boxes
from ..layers.dino_decoder import REFERENCE_EPS
from .deformable_detr import DeformableDetr, prediction_heads
from .denoising import build_denoising_queries

__all__ = ["Dino"]


@META_ARCH_REGISTRY.register()
class Dino(DeformableDetr):
    """DINO taking and returning Detectron2's standard formats (see
    :class:`~d2_detr.modeling.set_prediction.SetPredictionModel`).

    Inference returns the ``test_topk`` (300 in the paper) best (query, class) pairs of each image by sigmoid score,
    independent of batch neighbours as for :class:`~d2_detr.modeling.deformable_detr.DeformableDetr`. Training
    outputs add "dn_outputs" (the denoising queries' predictions of every layer) and "dn_groups" (number of groups,
    group size) for :class:`~d2_detr.modeling.dino_criterion.DinoCriterion`, and "enc_outputs" (the encoder's
    predictions at the selected cells) unless the queries are static.
    """

    learned_query_embed = False

    @configurable
    def __init__(self, *, dn_number: int = 100, label_noise_ratio: float = 0.5, box_noise_scale: float = 0.4,
                 dn_labelbook_size: int = 91, **kwargs):
        """
        Args:
            dn_number: positive denoising queries per image, about (0: no denoising).
            label_noise_ratio: twice the probability that a denoising query's label is replaced at random.
            box_noise_scale: lambda of the box noise (positives within lambda, negatives between lambda and 2 lambda).
            dn_labelbook_size: labels the denoising queries embed and draw noise from; at least ``num_classes``.
            kwargs: as for :class:`~d2_detr.modeling.deformable_detr.DeformableDetr` (but ``with_box_refine``: the
                boxes are always refined, by heads shared across layers); the transformer a
                :class:`~d2_detr.modeling.dino_transformer.DinoTransformer`.
        """
        num_classes = kwargs["num_classes"]
        if dn_labelbook_size < num_classes:
            raise ValueError(f"MODEL.DINO.DN_LABELBOOK_SIZE={dn_labelbook_size} is smaller than MODEL.DETR.NUM_CLASSES="
                             f"{num_classes}: the denoising label book (DN_LABELBOOK_SIZE + 1 embedding rows) needs at "
                             "least NUM_CLASSES + 1 rows; set DN_LABELBOOK_SIZE >= NUM_CLASSES")
        if kwargs.get("with_box_refine"):
            raise ValueError("Dino always refines its boxes (with heads shared across layers): leave "
                             "MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE False")
        super().__init__(**kwargs)
        hidden_dim = self.transformer.d_model
        self.num_queries = self.transformer.num_queries
        self.dn_number = dn_number
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.dn_labelbook_size = dn_labelbook_size
        self.label_enc = nn.Embedding(dn_labelbook_size + 1, hidden_dim)
        if self.two_stage:
            self.enc_class_embed, self.enc_bbox_embed = prediction_heads(hidden_dim, num_classes)

    def _heads(self, hidden_dim: int, num_classes: int) -> Tuple[nn.ModuleList, nn.ModuleList]:
        """One class head and one box head, shared by every decoder layer (listed once per layer)."""
        class_head, box_head = prediction_heads(hidden_dim, num_classes)
        num_layers = self.transformer.num_decoder_layers
        return nn.ModuleList([class_head] * num_layers), nn.ModuleList([box_head] * num_layers)

    @classmethod
    def from_config(cls, cfg):
        dino = cfg.MODEL.DINO
        args = super().from_config(cfg)
        return {
            **args,
            "dn_number": dino.DN_NUMBER,
            "label_noise_ratio": dino.DN_LABEL_NOISE_RATIO,
            "box_noise_scale": dino.DN_BOX_NOISE_SCALE,
            "dn_labelbook_size": dino.DN_LABELBOOK_SIZE,
        }

    def training_outputs(self, images: ImageList, targets: List[Dict]) -> Dict:
        """:meth:`predict`'s outputs plus those of the denoising queries built from ``targets``."""
        return self.predict_from_levels(*self.levels_and_masks(images), targets=targets)

    def predict_from_levels(self, levels: List[Tensor], masks: List[Tensor],
                            targets: Optional[List[Dict]] = None) -> Dict:
        """:meth:`predict`'s outputs from the input levels (B, d, H_l, W_l) and their padding masks (B, H_l, W_l);
        in training with ``targets`` (and ``dn_number`` > 0) also those of the denoising queries."""
        pos = [self.position_encoding(mask).to(level.dtype) for level, mask in zip(levels, masks)]
        denoising = None
        if self.training and targets is not None and self.dn_number > 0:
            denoising = build_denoising_queries(
                [t["labels"] for t in targets], [t["boxes"] for t in targets], self.label_enc, self.num_queries,
                self.dn_number, self.label_noise_ratio, self.box_noise_scale, self.dn_labelbook_size)
        out = self.transformer(levels, masks, pos, self.bbox_embed[0],
                               (self.enc_class_embed, self.enc_bbox_embed) if self.two_stage else None, denoising)
        hs, references = out["hs"], out["references"]  # (L, B, N + Q, d), L + 1 x (B, N + Q, 4)
        num_layers = self.transformer.num_decoder_layers
        layer_ids = range(num_layers) if self.training else [num_layers - 1]
        num_dn = 0 if denoising is None else denoising.num_queries
        matching, noised = [], []
        for i in layer_ids:
            logits = self.class_embed[i](hs[i])
            boxes = refine_boxes(self.bbox_embed[i](hs[i]), references[i], REFERENCE_EPS)
            matching.append({"pred_logits": logits[:, num_dn:], "pred_boxes": boxes[:, num_dn:]})
            noised.append({"pred_logits": logits[:, :num_dn], "pred_boxes": boxes[:, :num_dn]})
        outputs = {**matching[-1], "aux_outputs": matching[:-1]}
        if self.training and self.dn_number > 0:
            if denoising is None:
                # No box in the batch: keep the label embedding in the graph, so that every process of a
                # distributed run gets a gradient for it.
                outputs["pred_logits"] = outputs["pred_logits"] + 0.0 * self.label_enc.weight.sum()
            else:
                outputs["dn_outputs"] = {**noised[-1], "aux_outputs": noised[:-1]}
                outputs["dn_groups"] = (denoising.num_groups, denoising.group_size)
        if self.two_stage and self.training:
            outputs["enc_outputs"] = {"pred_logits": out["enc_logits"], "pred_boxes": out["enc_boxes"]}
        return outputs

from .position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from .box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)
from .deformable_attention import MultiScaleDeformableAttention, multi_scale_deformable_attention
from .deformable_transformer import DeformableDecoder, DeformableDecoderLayer, DeformableEncoder, DeformableEncoderLayer
from .multiscale_projection import MultiScaleProjection

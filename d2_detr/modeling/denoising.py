"""Contrastive denoising queries (DINO, Zhang et al. 2023): noised copies of the ground truth fed to the decoder in
training, which learns to reconstruct them.

Layout of the N denoising queries of an image (placed before the Q matching queries in the decoder):
``num_groups`` groups of ``group_size = 2 * M`` queries, M the largest number of ground-truth boxes of an image in
the batch. In group g, query ``g * 2M + j`` is the positive copy of ground-truth box j and ``g * 2M + M + j`` its
negative copy; slots j >= n_i of an image with n_i < M boxes are padding (zero content, reference box at the
image centre of size 0.5), supervised as "no object" like the negatives.

- Label noise: each copy's label is, with probability ``label_noise_ratio / 2``, replaced by a label drawn
  uniformly from [0, labelbook_size); the content query is the label's embedding.
- Box noise (lambda = ``box_noise_scale``): each corner of the (x0, y0, x1, y1) box moves along each axis by
  ``u * lambda * (half the box size along it)`` in a random direction, u uniform in [0, 1) for positives and
  [1, 2) for negatives, clamped to the image; positives stay close to their box, negatives further away.
- Attention mask (N + Q, N + Q), True where a query must not see another: a group sees none of the other groups,
  the matching queries see no denoising query (denoising queries do see the matching ones).

Positives learn their box and label; negatives and padding learn "no object". Nothing of this runs at inference.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid

__all__ = ["DenoisingQueries", "build_denoising_queries", "denoising_attention_mask", "denoising_match_indices",
           "denoising_num_groups", "noise_boxes", "noise_labels"]

# inverse_sigmoid's clamp for the noised reference boxes, as in the original code.
_REFERENCE_EPS = 1e-3


@dataclass
class DenoisingQueries:
    """The denoising part of the decoder's input in training.

    Attributes:
        content: (B, N, d) content queries, N = num_groups * group_size.
        reference_logits: (B, N, 4) inverse sigmoid of the noised (cx, cy, w, h) reference boxes.
        attn_mask: (N + Q, N + Q) bool self-attention mask, True where a query must not see another.
        num_groups: number of groups.
        group_size: queries of a group, 2 * M (positives, then negatives).
    """

    content: Tensor
    reference_logits: Tensor
    attn_mask: Tensor
    num_groups: int
    group_size: int

    @property
    def num_queries(self) -> int:
        """N, the denoising queries of an image."""
        return self.num_groups * self.group_size


def denoising_num_groups(sizes: Sequence[int], dn_number: int) -> int:
    """Groups for images with ``sizes`` ground-truth boxes: ``dn_number // max(sizes)`` (at least 1), so that each
    image has about ``dn_number`` positive (and as many negative) queries; 0 when no image has a box."""
    most = max(sizes, default=0)
    return 0 if most == 0 or dn_number <= 0 else max(1, dn_number // most)


def denoising_attention_mask(num_groups: int, group_size: int, num_queries: int, device=None) -> Tensor:
    """(N + Q, N + Q) bool self-attention mask, N = num_groups * group_size denoising queries first, then
    ``num_queries`` matching queries: True where a query must not see a key (another group, or, for a matching
    query, any denoising query)."""
    num_dn = num_groups * group_size
    group = torch.arange(num_dn, device=device) // group_size  # (N,)
    mask = torch.zeros(num_dn + num_queries, num_dn + num_queries, dtype=torch.bool, device=device)
    mask[:num_dn, :num_dn] = group[:, None] != group[None, :]
    mask[num_dn:, :num_dn] = True
    return mask


def noise_labels(labels: Tensor, label_noise_ratio: float, labelbook_size: int) -> Tensor:
    """``labels`` (...) int64 with each replaced, with probability ``label_noise_ratio / 2``, by a label drawn
    uniformly from [0, labelbook_size)."""
    if label_noise_ratio <= 0:
        return labels
    flip = torch.rand(labels.shape, device=labels.device) < label_noise_ratio * 0.5
    return torch.where(flip, torch.randint_like(labels, 0, labelbook_size), labels)


def noise_boxes(boxes: Tensor, negative: Tensor, box_noise_scale: float) -> Tensor:
    """Noised copies of normalised cxcywh ``boxes`` (..., 4): every (x0, y0, x1, y1) coordinate moves by
    ``±u * box_noise_scale * (half the box's size along its axis)``, u in [0, 1) where ``negative`` (...) is False
    and in [1, 2) where it is True; clamped to [0, 1]."""
    if box_noise_scale <= 0:
        return boxes
    corners = box_cxcywh_to_xyxy(boxes)
    half_size = torch.cat([boxes[..., 2:], boxes[..., 2:]], -1) / 2  # (..., 4): (w, h, w, h) / 2
    sign = torch.randint(0, 2, boxes.shape, device=boxes.device).to(boxes.dtype) * 2.0 - 1.0
    magnitude = torch.rand_like(boxes) + negative[..., None].to(boxes.dtype)
    corners = (corners + sign * magnitude * half_size * box_noise_scale).clamp(0.0, 1.0)
    return box_xyxy_to_cxcywh(corners)


def build_denoising_queries(
    labels: List[Tensor], boxes: List[Tensor], label_embedding: nn.Embedding, num_queries: int, dn_number: int = 100,
    label_noise_ratio: float = 0.5, box_noise_scale: float = 0.4, labelbook_size: int = 91,
) -> Optional[DenoisingQueries]:
    """The denoising queries of a batch (see the module's docstring), or None when no image has a box.

    Args:
        labels: B int64 tensors (n_i,) of ground-truth labels.
        boxes: B tensors (n_i, 4) of normalised cxcywh ground-truth boxes.
        label_embedding: embedding of the labels (at least ``labelbook_size`` rows), giving the content queries.
        num_queries: Q, the matching queries that follow (for the attention mask).
        dn_number: positive queries per image, about (see :func:`denoising_num_groups`).
        label_noise_ratio: twice the probability that a copy's label is replaced at random.
        box_noise_scale: lambda of the box noise.
        labelbook_size: labels drawn by the label noise lie in [0, labelbook_size).
    """
    sizes = [len(t) for t in labels]
    num_groups = denoising_num_groups(sizes, dn_number)
    if num_groups == 0:
        return None
    most = max(sizes)
    device = label_embedding.weight.device
    gt_labels = torch.cat(labels).to(device)  # (T,)
    gt_boxes = torch.cat(boxes).to(device=device, dtype=torch.float32)  # (T, 4)
    total = gt_labels.shape[0]
    negative = torch.arange(2, device=device).view(1, 2, 1).expand(num_groups, 2, total).bool()  # (G, 2, T)
    noised_labels = noise_labels(gt_labels.expand(num_groups, 2, total), label_noise_ratio, labelbook_size)
    noised_boxes = noise_boxes(gt_boxes.expand(num_groups, 2, total, 4), negative, box_noise_scale)

    batch_idx = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(sizes)]).to(device)  # (T,)
    box_idx = torch.cat([torch.arange(n) for n in sizes]).to(device)  # (T,)
    group_start = (torch.arange(num_groups, device=device) * 2 * most).view(-1, 1, 1)  # (G, 1, 1)
    slots = group_start + negative.long() * most + box_idx  # (G, 2, T)
    batch_idx = batch_idx.expand_as(slots)
    batch_size, num_dn = len(labels), num_groups * 2 * most
    content = torch.zeros(batch_size, num_dn, label_embedding.embedding_dim, device=device,
                          dtype=label_embedding.weight.dtype)
    reference_logits = torch.zeros(batch_size, num_dn, 4, device=device)
    content = content.index_put((batch_idx.flatten(), slots.flatten()), label_embedding(noised_labels.flatten()))
    reference_logits[batch_idx.flatten(), slots.flatten()] = inverse_sigmoid(noised_boxes.flatten(0, 2),
                                                                             _REFERENCE_EPS)
    mask = denoising_attention_mask(num_groups, 2 * most, num_queries, device)
    return DenoisingQueries(content, reference_logits, mask, num_groups, 2 * most)


def denoising_match_indices(sizes: Sequence[int], num_groups: int, group_size: int) -> List[Tuple[Tensor, Tensor]]:
    """The positives' fixed matches: per image, (query indices, target indices) int64 (num_groups * n_i,) each,
    query ``g * group_size + j`` matched to ground-truth box j."""
    indices = []
    for n in sizes:
        targets = torch.arange(n).repeat(num_groups)  # (G * n,)
        queries = torch.arange(num_groups).repeat_interleave(n) * group_size + targets
        indices.append((queries, targets))
    return indices

"""Contrastive denoising queries: group layout, attention mask, noise ranges, fixed matches."""
import pytest
import torch
from torch import nn

from d2_detr.layers.box_ops import box_cxcywh_to_xyxy
from d2_detr.modeling.denoising import (
    build_denoising_queries,
    denoising_attention_mask,
    denoising_match_indices,
    denoising_num_groups,
    noise_boxes,
    noise_labels,
)


def test_attention_mask_keeps_groups_apart_and_matching_queries_blind():
    # 2 groups of 2 denoising queries, then 3 matching queries; 1 = blocked.
    expected = torch.tensor([
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(denoising_attention_mask(2, 2, 3), expected)


@pytest.mark.parametrize("sizes,dn_number,groups", [([2, 1], 4, 2), ([3, 0], 100, 33), ([200], 100, 1),
                                                    ([0, 0], 100, 0), ([2], 0, 0)])
def test_number_of_groups(sizes, dn_number, groups):
    assert denoising_num_groups(sizes, dn_number) == groups


def test_no_box_in_the_batch_gives_no_queries():
    embedding = nn.Embedding(6, 4)
    assert build_denoising_queries([torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, 4)], embedding, 3) is None


def test_queries_without_noise_are_the_ground_truth_in_the_documented_slots():
    embedding = nn.Embedding(6, 4)
    labels = [torch.tensor([1, 2]), torch.tensor([4])]
    boxes = [torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1]]), torch.tensor([[0.7, 0.2, 0.3, 0.2]])]
    queries = build_denoising_queries(labels, boxes, embedding, num_queries=3, dn_number=4, label_noise_ratio=0.0,
                                      box_noise_scale=0.0, labelbook_size=5)
    assert (queries.num_groups, queries.group_size, queries.num_queries) == (2, 4, 8)
    # Image 0: group g has positives at 4g, 4g+1 and negatives at 4g+2, 4g+3. Image 1 (one box): slots 4g and
    # 4g+2; the others are padding (zero content and zero reference logits, the box at the image centre).
    weight = embedding.weight.detach()
    for g in range(2):
        for offset, (image, box) in {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)}.items():
            slot = 4 * g + offset
            torch.testing.assert_close(queries.content[image, slot], weight[labels[image][box]])
            torch.testing.assert_close(queries.reference_logits[image, slot].sigmoid(), boxes[image][box])
        for offset in (0, 2):
            torch.testing.assert_close(queries.content[1, 4 * g + offset], weight[4])
            torch.testing.assert_close(queries.reference_logits[1, 4 * g + offset].sigmoid(), boxes[1][0])
        for offset in (1, 3):
            slot = 4 * g + offset
            assert not queries.content[1, slot].any() and not queries.reference_logits[1, slot].any()
    assert torch.equal(queries.attn_mask, denoising_attention_mask(2, 4, 3))


def test_box_noise_ranges_of_positives_and_negatives():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3]]).expand(2, 2000, 4)
    negative = torch.tensor([False, True])[:, None].expand(2, 2000)
    scale = 0.4
    moved = box_cxcywh_to_xyxy(noise_boxes(boxes, negative, scale)) - box_cxcywh_to_xyxy(boxes)  # (2, N, 4)
    half = torch.tensor([0.1, 0.15, 0.1, 0.15])
    relative = moved.abs() / (half * scale)  # in units of lambda * half-size, no clamping here
    assert relative[0].max() < 1 + 1e-5
    assert relative[1].min() > 1 - 1e-5 and relative[1].max() < 2 + 1e-5
    assert (moved > 0).any() and (moved < 0).any()  # both directions


def test_noised_boxes_stay_in_the_image():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.05, 0.95, 0.1, 0.1]]).expand(500, 4)
    noised = box_cxcywh_to_xyxy(noise_boxes(boxes, torch.ones(500, dtype=torch.bool), 1.0))
    assert noised.min() >= 0 and noised.max() <= 1


def test_label_noise_rate_and_range():
    torch.manual_seed(0)
    labels = torch.full((20000,), 3)
    noised = noise_labels(labels, 0.5, labelbook_size=7)
    assert noised.min() >= 0 and noised.max() < 7 and set(noised.tolist()) == set(range(7))
    # replaced with probability 0.25, and a replacement is the same label 1 time in 7
    changed = (noised != labels).float().mean().item()
    assert abs(changed - 0.25 * 6 / 7) < 0.01
    assert torch.equal(noise_labels(labels, 0.0, 7), labels)


def test_match_indices_pair_each_positive_with_its_box():
    (q0, t0), (q1, t1) = denoising_match_indices([2, 1], num_groups=2, group_size=4)
    assert q0.tolist() == [0, 1, 4, 5] and t0.tolist() == [0, 1, 0, 1]
    assert q1.tolist() == [0, 4] and t1.tolist() == [0, 0]
    (q, t), = denoising_match_indices([0], num_groups=3, group_size=2)
    assert q.numel() == t.numel() == 0

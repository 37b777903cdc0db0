"""Analysis step on real RUGD frames: feature distance, frame score, segment aggregation."""
import numpy as np
import pytest
import torch

from ros_anomaly_diffusion.core.analysis import FeatureDistance, frame_score
from ros_anomaly_diffusion.core.data import open_dataset
from ros_anomaly_diffusion.core.networks.backbone import FeatureExtractor
from ros_anomaly_diffusion.core.segments import (UNCOVERED, SamSegmenter, SuperpixelSegmenter, aggregate,
                                                 build_segmenter)


@pytest.fixture(scope="module")
def rugd(rugd_sample):
    return open_dataset(rugd_sample)


@pytest.fixture(scope="module")
def distance():
    return FeatureDistance(FeatureExtractor(), (176, 216))


def to_tensor(rgb):
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255


def test_backbone_is_the_pretrained_lite0():
    # ImageNet weights, not a random init: the first BN's running stats were learnt.
    stem_bn = FeatureExtractor().stem[1]
    assert not torch.allclose(stem_bn.running_var, torch.ones_like(stem_bn.running_var))


def test_each_tap_is_at_its_named_stride_and_channels_count_what_is_stacked():
    x = torch.rand(1, 3, 256, 320, generator=torch.Generator().manual_seed(0))
    fe = FeatureExtractor((2, 4, 8, 16))
    maps = fe(x)
    assert [(256 // m.shape[-2], 320 // m.shape[-1]) for m in maps.values()] == [(2, 2), (4, 4), (8, 8), (16, 16)]
    assert fe.strides == (2, 4, 8, 16) and list(fe.taps.values()) == [2, 4, 8, 16]
    assert fe.channels == sum(m.shape[1] for m in maps.values()) == 16 + 24 + 40 + 112
    # the analysis step's default taps (strides 4, 8, 16) are the blocks they always were
    assert FeatureExtractor().taps == {2: 4, 4: 8, 10: 16}
    # taps by block index (how older feature checkpoints are rebuilt) report their real strides
    old = FeatureExtractor(blocks=(1, 2, 4, 10))
    assert old.strides == (4, 4, 8, 16) and old.channels == sum(m.shape[1] for m in old(x).values()) == 200


def test_identical_frames_score_zero(rugd, distance):
    x = to_tensor(rugd[0].rgb())
    m = distance(x, x.clone())
    assert m.shape == (1, 176, 216)
    assert float(m.max()) < 1e-4


def test_an_edited_region_stands_out(rugd, distance):
    """Paint a patch of another real frame into the 'edited' frame: the map must find it."""
    a = to_tensor(rugd[0].rgb())
    b = to_tensor(rugd[5].rgb())
    h, w = a.shape[-2:]
    y0, y1, x0, x1 = h // 3, h // 3 + h // 4, w // 2, w // 2 + w // 4
    edited = a.clone()
    edited[..., y0:y1, x0:x1] = b[..., y0:y1, x0:x1]
    m = distance(a, edited)[0].numpy()
    sy, sx = 176 / h, 216 / w
    inside = np.zeros_like(m, bool)
    inside[int(y0 * sy):int(y1 * sy), int(x0 * sx):int(x1 * sx)] = True
    assert 0.0 <= m.min() and m.max() <= 2.0  # 1 - cos, unclamped above (the pixel family scales it)
    assert m[inside].mean() > 4 * m[~inside].mean()


def test_frame_score_needs_an_object_sized_area():
    score = np.zeros((100, 100), np.float32)
    score[0, 0] = 1.0  # one hot pixel
    assert frame_score(score) == pytest.approx(0.01)
    score[:10, :10] = 1.0  # a 100-pixel object
    assert frame_score(score) == pytest.approx(1.0)


def test_aggregate_is_the_segment_mean():
    score = np.array([[0.0, 1.0, 0.5], [0.2, 0.4, 0.9]], np.float32)
    seg = np.array([[0, 0, 1], [UNCOVERED, UNCOVERED, 1]])
    out = aggregate(score, seg)
    np.testing.assert_allclose(out, [[0.5, 0.5, 0.7], [0.3, 0.3, 0.7]], rtol=1e-6)
    with pytest.raises(ValueError):
        aggregate(score, seg[:, :2])


def test_superpixels_on_a_real_frame(rugd):
    rgb = rugd[3].rgb()[::4, ::4].copy()
    seg = SuperpixelSegmenter(n_segments=100)(rgb)
    assert seg.shape == rgb.shape[:2]
    assert 30 <= len(np.unique(seg)) <= 200


def tiny_sam(checkpoint=None):
    """A randomly initialised SAM small enough for a CPU test (no weights can be downloaded)."""
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)

    torch.manual_seed(0)
    dim, size = 32, 128
    return Sam(
        image_encoder=ImageEncoderViT(img_size=size, patch_size=16, embed_dim=dim, depth=1, num_heads=2,
                                      out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // 16, size // 16),
                                     input_image_size=(size, size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=1,
                                 iou_head_hidden_dim=dim,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64,
                                                               num_heads=2)),
    ).eval()


def test_sam_loads_from_safetensors_and_makes_disjoint_segments(tmp_path, rugd):
    from safetensors.torch import save_file

    path = tmp_path / "sam_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_sam().state_dict().items()}, str(path))
    seg = SamSegmenter.from_checkpoint(path, "tiny", builders={"tiny": tiny_sam}, points_per_side=4,
                                       min_area=1, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    rgb = rugd[2].rgb()[::4, ::4].copy()
    labels = seg(rgb)
    assert labels.shape == rgb.shape[:2]
    ids = set(np.unique(labels)) - {UNCOVERED}
    assert ids == set(range(len(ids)))  # consecutive ids, one per kept mask; disjoint by construction
    with pytest.raises(ValueError, match="does not match"):
        SamSegmenter.from_checkpoint(path, "other", builders={"other": lambda checkpoint: torch.nn.Linear(2, 2)})


def test_sam_refuses_pickles_and_missing_files(tmp_path):
    (tmp_path / "sam.pth").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="safetensors"):
        SamSegmenter.from_checkpoint(tmp_path / "sam.pth", builders={})
    with pytest.raises(FileNotFoundError):
        SamSegmenter.from_checkpoint(tmp_path / "nope.safetensors", builders={})
    assert build_segmenter("none") is None
    assert isinstance(build_segmenter("auto"), SuperpixelSegmenter)
    with pytest.raises(ValueError):
        build_segmenter("sam")

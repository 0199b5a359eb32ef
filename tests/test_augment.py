import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from bayeskd.augment import CropFlip


def reference_view(img: torch.Tensor, top: int, left: int, flip: bool, padding: int) -> torch.Tensor:
    """torchvision's zero-padded crop and horizontal flip at the given offsets."""
    out = TF.crop(TF.pad(img, [padding], fill=0), top, left, img.shape[-2], img.shape[-1])
    return TF.horizontal_flip(out) if flip else out


@pytest.mark.parametrize("padding", [4, 1])
def test_every_view_equals_torchvision(padding):
    aug = CropFlip(padding)
    assert aug.num_views == (2 * padding + 1) ** 2 * 2
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 32, 32, generator=g) + 0.1  # no zeros, so padding is visible
    views = torch.arange(aug.num_views)
    got = aug.apply(img.expand(len(views), -1, -1, -1), views)
    for v in range(aug.num_views):
        top, left, flip = (t[v].item() for t in aug.decode(views))
        torch.testing.assert_close(got[v], reference_view(img, top, left, flip, padding), rtol=0, atol=0)


def test_views_are_distinct_and_centre_is_identity():
    aug = CropFlip(4)
    img = torch.rand(1, 2, 8, 8)
    all_views = aug.apply(img.expand(aug.num_views, -1, -1, -1), torch.arange(aug.num_views))
    assert len({v.numpy().tobytes() for v in all_views}) == aug.num_views
    centre = (4 * aug.side + 4) * 2  # top = left = padding, no flip
    torch.testing.assert_close(all_views[centre], img[0], rtol=0, atol=0)


def test_batch_gets_one_view_per_sample():
    aug = CropFlip(4)
    x = torch.rand(5, 3, 32, 32)
    views = torch.tensor([0, 161, 80, 7, 100])
    got = aug.apply(x, views)
    for i in range(len(views)):
        top, left, flip = (t[i].item() for t in aug.decode(views))
        torch.testing.assert_close(got[i], reference_view(x[i], top, left, flip, 4), rtol=0, atol=0)


def test_out_of_range_view_is_refused():
    with pytest.raises(RuntimeError, match=r"\[0, 162\)"):
        CropFlip(4).apply(torch.rand(1, 3, 32, 32), torch.tensor([162]))

"""The patch codebook: patches round-trip, k-means finds planted clusters, encode/decode invert on codes."""

import pytest
import torch

from quickmerge.ar.tokenizer import PatchCodebook, from_patches, kmeans, nearest, to_patches

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_patches_round_trip_in_raster_order():
    x = torch.arange(2 * 3 * 8 * 12).reshape(2, 3, 8, 12).float()
    p = to_patches(x, 4)
    assert p.shape == (2, 3, 6, 16)
    assert torch.equal(p[0, 0, 1], x[0, 0, :4, 4:8].reshape(-1))  # second patch: top row, next 4 columns
    assert torch.equal(from_patches(p, 8, 12, 4), x)
    with pytest.raises(ValueError, match="multiple of the patch"):
        to_patches(torch.zeros(1, 10, 10), 4)


def test_kmeans_recovers_planted_centres_and_uses_every_code():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])
    points = centres.repeat_interleave(200, 0) + torch.randn(800, 2, generator=gen)
    found = kmeans(points, 4, seed=1)
    index, _ = nearest(centres, found)
    assert sorted(index.tolist()) == [0, 1, 2, 3]
    assert (found[index] - centres).abs().max() < 0.5
    many = kmeans(points, 16, seed=0)  # more codes than clusters: none left empty
    assert torch.bincount(nearest(points, many)[0], minlength=16).min() > 0


def test_encode_decode_are_inverse_on_codebook_images_and_a_palette_is_ordered():
    images = torch.randint(0, 256, (20, 8, 8), dtype=torch.uint8)
    book = PatchCodebook.fit(images, 8, 2, seed=0)
    ids = book.encode(images)
    assert ids.shape == (20, 16) and ids.dtype == torch.int64 and int(ids.max()) < 8
    decoded = book.decode(ids, 8, 8)
    assert torch.equal(book.encode(decoded), ids)  # decoding gives the codes' own patches
    palette = PatchCodebook.fit(images, 4, 1, seed=0)
    assert torch.equal(palette.codebook[:, 0], palette.codebook[:, 0].sort().values)
    assert (palette.decode(palette.encode(images), 8, 8).float() - images.float()).abs().max() <= 64
    with pytest.raises(ValueError, match="ids"):
        book.decode(torch.tensor([[8]]), 2, 2)

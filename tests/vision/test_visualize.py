import numpy as np

from quickmerge.vision.visualize import draw_groups


def test_draw_groups_fills_means_and_outlines():
    image = np.zeros((4, 4, 3), dtype=np.float32)
    image[:, :2] = 0.2
    image[:, 2:] = 0.6
    image[0, 0] = 0.4
    groups = np.array([[0, 1], [0, 1]])  # left half one token, right half another
    out = draw_groups(image, groups)
    inner_left = out[1:, 0]  # not on an edge
    assert np.allclose(out[:, 0][~np.all(out[:, 0] == 1.0, axis=-1)], (0.4 + 7 * 0.2) / 8)
    assert inner_left.shape == (3, 3)
    assert np.all(out[:, 2] == 1.0)  # the boundary between the two tokens is drawn
    assert np.allclose(out[:, 3], 0.6)


def test_dropped_patches_are_black():
    image = np.ones((4, 4, 3), dtype=np.float32) * 0.5
    out = draw_groups(image, np.array([[0, -1], [0, 0]]))
    assert np.all(out[:2, 3] == 0.0)  # inside the dropped patch
    assert np.all(out[:2, 2] == 1.0)  # its outline

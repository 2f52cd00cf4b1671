"""diffkernels.datasets (the bundled digits on both scales) and diffkernels.plots (image grids)."""

import numpy as np
import pytest
import torch

from diffkernels.datasets import load_digits, to_pixels

sklearn = pytest.importorskip("sklearn.datasets")


def test_digits_on_both_scales():
    raw = torch.tensor(sklearn.load_digits().data, dtype=torch.float64).reshape(-1, 1, 8, 8)  # 0..16
    signed = load_digits()
    assert signed.shape == (1797, 1, 8, 8) and signed.dtype == torch.float32
    assert signed.min().item() == -1.0 and signed.max().item() == 1.0
    torch.testing.assert_close(signed.double(), raw / 8 - 1, rtol=0, atol=0)  # k / 8 - 1 is exact in float32
    pixels = load_digits(pixels=True)
    torch.testing.assert_close(pixels.double(), raw * 255 / 16, rtol=1e-7, atol=0)  # float32 rounding
    torch.testing.assert_close(to_pixels(signed.double()), raw * 255 / 16, rtol=1e-15, atol=1e-12)
    images, labels = load_digits(return_labels=True)
    assert torch.equal(images, signed)
    assert labels.dtype == torch.int64 and labels.shape == (1797,)
    assert np.array_equal(labels.numpy(), sklearn.load_digits().target)


def test_to_pixels_clamps_and_bad_arguments():
    torch.testing.assert_close(to_pixels(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0])),
                               torch.tensor([0.0, 0.0, 127.5, 255.0, 255.0]))
    with pytest.raises(TypeError, match="pixels"):
        load_digits(pixels="yes")
    with pytest.raises(TypeError, match="return_labels"):
        load_digits(return_labels=1)


def test_image_grid(tmp_path):
    pytest.importorskip("matplotlib")
    from diffkernels.plots import save_image_grid

    for channels in (1, 3):
        path = tmp_path / f"grid{channels}.png"
        save_image_grid(torch.rand(5, channels, 4, 4) * 2 - 1, path, "title")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="images"):
        save_image_grid(torch.rand(5, 4, 4), tmp_path / "bad.png", "title")

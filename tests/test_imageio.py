"""Loading that scales: reduced decoding keeps exact geometry; every input kind; clear errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from bench import geometry
from bench.imageio import ImageLoadError, load_image, read_size, to_rgb8

W, H = 1003, 761  # neither side a multiple of 8: reduced decoding pads the last block
DOTS = [(W - 18, H - 17), (25, 30), (500, 380), (W - 30, 40)]


def _dots_image() -> np.ndarray:
    """Light glass with dark round dots, some near the right and bottom edges. (H, W, 3) uint8 RGB."""
    img = np.full((H, W, 3), 236, np.uint8)
    for x, y in DOTS:
        cv2.circle(img, (x, y), 11, (70, 25, 95), -1, lineType=cv2.LINE_AA)
    return img


def _centroid(rgb: np.ndarray, x: float, y: float, r: float) -> tuple[float, float]:
    g = 255.0 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(float)
    g -= np.median(g)
    x0, y0 = int(max(0, x - r)), int(max(0, y - r))
    sub = np.clip(g[y0: int(y + r) + 1, x0: int(x + r) + 1], 0, None)
    yy, xx = np.mgrid[y0: y0 + sub.shape[0], x0: x0 + sub.shape[1]]
    return float((sub * xx).sum() / sub.sum()), float((sub * yy).sum() / sub.sum())


@pytest.fixture(scope="module")
def dots_files(tmp_path_factory) -> dict[str, Path]:
    import tifffile

    folder = tmp_path_factory.mktemp("io")
    img = _dots_image()
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    files = {"jpeg": folder / "d.jpg", "png": folder / "d.png", "tiled": folder / "d_tiled.tif",
             "strips": folder / "d_strips.tif", "pyramid": folder / "d_pyr.tif"}
    cv2.imwrite(str(files["jpeg"]), bgr, [cv2.IMWRITE_JPEG_QUALITY, 98])
    cv2.imwrite(str(files["png"]), bgr)
    tifffile.imwrite(files["tiled"], img, tile=(64, 64), compression="zlib")
    tifffile.imwrite(files["strips"], img, rowsperstrip=37)
    with tifffile.TiffWriter(files["pyramid"]) as tw:
        tw.write(img, tile=(128, 128), subifds=2)
        level = img
        for _ in range(2):
            level = cv2.resize(level, ((level.shape[1] + 1) // 2, (level.shape[0] + 1) // 2),
                               interpolation=cv2.INTER_AREA)
            tw.write(level, tile=(128, 128), subfiletype=1)
    return files


@pytest.mark.parametrize("kind", ["jpeg", "png", "tiled", "strips", "pyramid"])
@pytest.mark.parametrize("size", [(110, 83), (240, 182), (480, 364), (W, H)])
def test_reduced_loading_keeps_exact_geometry(dots_files, kind, size):
    """Dots land where the returned scales say, to a small fraction of a pixel, however decoded."""
    img = load_image(dots_files[kind], size)
    assert img.rgb.shape == (size[1], size[0], 3) and img.rgb.dtype == np.uint8
    assert img.original_shape == (H, W)
    to_small = geometry.resample_matrix(*img.scale)
    for x, y in DOTS:
        ex, ey = geometry.apply(to_small, [[x, y]])[0]
        cx, cy = _centroid(img.rgb, ex, ey, 13 * img.scale[0] + 3)
        assert abs(cx - ex) < 0.12 and abs(cy - ey) < 0.12, (kind, size, img.how, (x, y))


def test_reduced_decoding_is_used(dots_files):
    assert load_image(dots_files["jpeg"], (110, 83)).how == "jpeg-dct/8"
    assert load_image(dots_files["jpeg"], (300, 226)).how == "jpeg-dct/2"
    assert load_image(dots_files["tiled"], (110, 83)).how == "tiff-bands/8"
    assert load_image(dots_files["pyramid"], (240, 182)).how == "tiff-level-2"
    assert load_image(dots_files["pyramid"], (300, 226)).how == "tiff-level-1"  # the level just above
    assert load_image(dots_files["png"], (110, 83)).how == "full"


def test_reduced_jpeg_scale_accounts_for_padded_block(dots_files):
    img = load_image(dots_files["jpeg"], (110, 83))
    d = 8
    assert img.scale == pytest.approx((110 / (d * -(-W // d)), 83 / (d * -(-H // d))))
    assert img.scale[0] != pytest.approx(110 / W, rel=1e-4)  # the naive scale would be off


def test_band_reduction_matches_full_decode(dots_files):
    """Tile-by-tile reduction gives the same picture as decoding everything and resizing.

    (Up to the sub-pixel difference of the two exact frames, which shows only at the dots' sharp rims.)
    """
    a = load_image(dots_files["tiled"], (240, 182)).rgb.astype(int)
    b = load_image(dots_files["png"], (240, 182)).rgb.astype(int)
    diff = np.abs(a - b)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) < 10


def test_read_size_reads_headers(dots_files):
    for path in dots_files.values():
        assert read_size(path) == (H, W)


def test_grey_rgba_and_16bit_inputs(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 60), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    out = load_image(tmp_path / "grey.png").rgb
    assert out.shape == (40, 60, 3) and np.array_equal(out[..., 0], grey) and np.array_equal(out[..., 2], grey)

    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = (10, 20, 200)
    rgba[:10, :, 3] = 255  # top opaque, bottom transparent
    cv2.imwrite(str(tmp_path / "rgba.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    out = load_image(tmp_path / "rgba.png").rgb
    assert out[0, 0].tolist() == [10, 20, 200] and out[-1, -1].tolist() == [255, 255, 255]

    deep = (np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 16).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    out = load_image(tmp_path / "deep.png").rgb
    assert out.dtype == np.uint8 and out.max() == 255 and out[0, 0, 0] == 0
    assert np.all(np.diff(out[..., 0].ravel().astype(int)) >= 0)  # order of grey levels kept


def test_to_rgb8_float_and_two_channel():
    assert to_rgb8(np.full((2, 2), 0.5, np.float32))[0, 0].tolist() == [128, 128, 128]
    ga = np.zeros((1, 1, 2), np.uint8)  # grey + alpha, transparent
    assert to_rgb8(ga)[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="pixel layout"):
        to_rgb8(np.zeros((2, 2, 7), np.uint8))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg"), "decode"),
        (lambda p: p.write_bytes(b"II*\x00garbage"), "decode"),
        (lambda p: p.mkdir(), "not a file"),
    ],
)
def test_bad_files_raise_one_line_errors(tmp_path, make, message):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageLoadError) as err:
        load_image(path, (50, 40))
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_truncated_jpeg_is_an_error(tmp_path, dots_files):
    data = dots_files["jpeg"].read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        read_size(cut), load_image(cut, (200, 150))

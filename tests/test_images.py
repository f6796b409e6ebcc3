"""ADM's center crop and image folders in the ImageNet layout."""

import numpy as np
import pytest
import torch
from PIL import Image

from ditlab.data import ImageFolderDataset, center_crop_arr, scan_image_folder
from ditlab.data.images import load_rgb


def random_image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (h, w) if channels is None else (h, w, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def adm_crop_reference(image, size):
    """ADM's rule restated: plan every size and the crop box first, then apply the plan with
    PIL (Image.crop, not array slicing)."""
    w, h = image.size
    plan = []
    while w >= 2 * size and h >= 2 * size:
        w, h = w // 2, h // 2
        plan.append(((w, h), Image.BOX))
    ratio = size / (w if w < h else h)
    w, h = round(w * ratio), round(h * ratio)
    plan.append(((w, h), Image.BICUBIC))
    for dims, resample in plan:
        image = image.resize(dims, resample=resample)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("w,h,size", [
    (500, 375, 256), (375, 500, 256), (1031, 517, 256), (517, 1031, 256), (2049, 1025, 256), (513, 513, 256),
    (511, 513, 256), (257, 300, 256), (255, 255, 256), (100, 37, 64), (37, 100, 64), (125, 93, 31), (64, 63, 33),
    (70, 64, 48), (64, 70, 48), (4000, 31, 16), (512, 700, 256), (1024, 777, 256),
])  # fmt: skip
def test_center_crop_matches_adm_rule(w, h, size):
    image = random_image(w, h, seed=w * 7 + h)
    out = center_crop_arr(image, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, adm_crop_reference(image, size))


def test_center_crop_geometry_by_hand():
    # 1031x517 to 256: one halving (517 >= 512) to 515x258, bicubic to round(515 * 256 / 258) = 511 x 256,
    # columns (511 - 256) // 2 = 127 onwards.
    image = random_image(1031, 517, seed=3)
    step = image.resize((515, 258), Image.BOX).resize((511, 256), Image.BICUBIC)
    np.testing.assert_array_equal(center_crop_arr(image, 256), np.asarray(step)[:, 127:383])
    # 70x64 to 48: the long side is 70 * 0.75 = 52.5 exactly, which Python's round takes to 52 (half to even).
    image = random_image(70, 64, seed=4)
    step = image.resize((52, 48), Image.BICUBIC)
    np.testing.assert_array_equal(center_crop_arr(image, 48), np.asarray(step)[:, 2:50])
    # Portrait: rows are cropped, not columns.
    image = random_image(64, 70, seed=5)
    step = image.resize((48, 52), Image.BICUBIC)
    np.testing.assert_array_equal(center_crop_arr(image, 48), np.asarray(step)[2:50, :])


def make_folder(root, layout, seed=0):
    """layout: {relative path: (w, h)}; writes random images (and leaves other files as text)."""
    for i, (rel, size) in enumerate(layout.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if size is None:
            path.write_text("not an image")
        else:
            fmt = "JPEG" if rel.lower().endswith((".jpg", ".jpeg")) else "PNG"
            random_image(*size, seed=seed + i).save(path, format=fmt)


def test_labels_from_sorted_folder_names(tmp_path):
    make_folder(tmp_path, {
        "apple/b.png": (20, 30), "apple/a.JPEG": (30, 20), "apple/notes.txt": None,
        "Zebra/x/deep.jpg": (25, 25), "Zebra/y.png": (40, 20),
        "10/one.png": (20, 20), "9/nine.jpeg": (21, 22), ".cache/hidden.png": (20, 20),
    })  # fmt: skip
    classes, samples = scan_image_folder(str(tmp_path))
    assert classes == ["10", "9", "Zebra", "apple"]  # byte order: digits < upper case < lower case
    assert samples == [("10/one.png", 0), ("9/nine.jpeg", 1), ("Zebra/x/deep.jpg", 2), ("Zebra/y.png", 2),
                       ("apple/a.JPEG", 3), ("apple/b.png", 3)]
    ds = ImageFolderDataset(str(tmp_path), 16)
    assert ds.classes == classes and ds.num_classes == 4 and len(ds) == 6
    assert [ds[i][1] for i in range(len(ds))] == [0, 1, 2, 2, 3, 3]


def test_dataset_item_is_the_normalised_crop(tmp_path):
    make_folder(tmp_path, {"a/rgb.jpg": (90, 60)})
    random_image(50, 61, seed=1, mode="L").save(tmp_path / "a" / "gray.png")
    random_image(33, 47, seed=2, mode="RGBA").save(tmp_path / "a" / "rgba.png")
    ds = ImageFolderDataset(str(tmp_path), 24)
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and label == 0
        rgb = np.asarray(Image.open(ds.path(i)).convert("RGB"))
        crop = center_crop_arr(Image.fromarray(rgb), 24).astype(np.float64)
        np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), crop / 127.5 - 1, atol=1e-6)
        assert image.min() >= -1 and image.max() <= 1


def test_unreadable_image_is_named_in_one_line(tmp_path):
    make_folder(tmp_path, {"a/ok.png": (20, 20), "a/bad.jpg": (64, 64), "a/fake.png": None})
    data = (tmp_path / "a" / "bad.jpg").read_bytes()
    (tmp_path / "a" / "bad.jpg").write_bytes(data[: len(data) // 2])
    ds = ImageFolderDataset(str(tmp_path), 16)
    assert [p for p, _ in ds.samples] == ["a/bad.jpg", "a/fake.png", "a/ok.png"]
    for i, name in ((0, "bad.jpg"), (1, "fake.png")):
        with pytest.raises(ValueError) as e:
            ds[i]
        assert str(tmp_path / "a" / name) in str(e.value) and "\n" not in str(e.value)
    assert load_rgb(ds.path(2)).size == (20, 20)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data"):
        ImageFolderDataset(str(tmp_path / "missing"), 16)
    make_folder(tmp_path, {"flat.png": (20, 20)})
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolderDataset(str(tmp_path), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="'empty' holds no images"):
        ImageFolderDataset(str(tmp_path), 16)

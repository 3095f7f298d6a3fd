"""pyvae.data: the procedural shapes, image files, arrays, bundled images, CIFAR-10 / CelebA
readers on small fake copies, random patches and load_dataset."""
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pyvae.data import (CIFAR10, CelebA, Digits, ImageFolder, NumpyImages, Photos, RandomPatches,
                        Shapes2D, UnreadableImageError, load_dataset, load_image, photo_images)


def check_images(dataset, indices=(0, -1)):
    """Items are float32 tensors of the announced shape with values in [0, 1]."""
    for i in indices:
        image = dataset[i]
        assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
        assert tuple(image.shape) == tuple(dataset.image_shape)
        assert 0.0 <= image.min() and image.max() <= 1.0


def random_uint8(rng, *shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------- Shapes2D

def tight_crop(image):
    rows, cols = np.nonzero(image)
    return image[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def test_shapes2d_describes_its_factors():
    data = Shapes2D()
    assert data.factor_sizes == (3, 6, 40, 32, 32)
    assert data.factor_names == ("shape", "scale", "orientation", "pos_x", "pos_y")
    assert len(data) == 737_280 and data.image_shape == (1, 64, 64)
    check_images(data, [0, 12_345, -1])


def test_shapes2d_every_combination_is_a_distinct_image():
    # All 720 (shape, scale, orientation) sprites at position (0, 0), quantised to 8 bits.
    base = np.stack(np.meshgrid(range(3), range(6), range(40), [0], [0], indexing="ij"), -1)
    images = (Shapes2D.render(base.reshape(-1, 5))[:, 0] * 255).round().to(torch.uint8).numpy()
    assert all(image.any() for image in images)
    # Positions translate by whole pixels and never clip (checked below), so the image of a full
    # combination is its sprite's tight crop at a position-dependent offset: distinct tight crops
    # make all 737,280 images distinct.
    crops = {(c.shape, c.tobytes()) for c in map(tight_crop, images)}
    assert len(crops) == 720
    # The shape never touches the canvas at the extreme positions.
    far = base.reshape(-1, 5).copy()
    far[:, 3:] = 31
    far_images = Shapes2D.render(far)[:, 0]
    assert not images[:, 0, :].any() and not images[:, :, 0].any()
    assert far_images[:, -1, :].abs().sum() == 0 and far_images[:, :, -1].abs().sum() == 0


def test_shapes2d_positions_translate_by_whole_pixels():
    rng = np.random.default_rng(0)
    factors = Shapes2D.sample_factors(200, rng)
    at_origin = factors.copy()
    at_origin[:, 3:] = 0
    moved, origin = Shapes2D.render(factors)[:, 0], Shapes2D.render(at_origin)[:, 0]
    for image, reference, (x, y) in zip(moved, origin, factors[:, 3:]):
        assert torch.equal(image, torch.roll(reference, shifts=(int(y), int(x)), dims=(0, 1)))


def test_shapes2d_random_combinations_are_distinct():
    rng = np.random.default_rng(1)
    flat = rng.choice(Shapes2D.num_combinations, 3000, replace=False)
    factors = np.stack(np.unravel_index(flat, Shapes2D.factor_sizes), 1)
    images = (Shapes2D.render(factors) * 255).round().to(torch.uint8).numpy()
    assert len({image.tobytes() for image in images}) == 3000


def test_shapes2d_small_rotations_change_the_smallest_shapes():
    factors = np.array([[shape, 0, k, 16, 16] for shape in range(3) for k in (0, 1)])
    images = Shapes2D.render(factors)[:, 0]
    for shape in range(3):
        assert (images[2 * shape] - images[2 * shape + 1]).abs().sum() > 1.0  # > one pixel's worth
    assert ((images > 0) & (images < 1)).any()  # antialiased edges


def test_shapes2d_render_matches_items_and_is_deterministic():
    data = Shapes2D()
    indices = np.random.default_rng(2).integers(0, len(data), 20)
    factors = data.factors_of(indices)
    assert factors.dtype == np.int64 and factors.shape == (20, 5)
    unravelled = np.stack(np.unravel_index(indices, data.factor_sizes), 1)
    np.testing.assert_array_equal(factors, unravelled)
    np.testing.assert_array_equal(Shapes2D.flat_index(factors), indices)
    rendered = data.render(factors)
    assert rendered.shape == (20, 1, 64, 64) and rendered.dtype == torch.float32
    for image, index in zip(rendered, indices):
        assert torch.equal(image, data[int(index)])
    assert torch.equal(Shapes2D().render(factors), rendered)
    assert torch.equal(data[-1], data[len(data) - 1])


def test_shapes2d_subset_is_fixed_by_the_seed():
    subset = Shapes2D(size=50, seed=3)
    assert len(subset) == 50 and subset.factors.shape == (50, 5)
    assert len(np.unique(subset.indices)) == 50
    np.testing.assert_array_equal(subset.indices, Shapes2D(size=50, seed=3).indices)
    assert not np.array_equal(subset.indices, Shapes2D(size=50, seed=4).indices)
    assert subset.targets is subset.factors
    for i in (0, 17, 49):
        np.testing.assert_array_equal(subset.factors[i],
                                      np.unravel_index(subset.indices[i], subset.factor_sizes))
        assert torch.equal(subset[i], Shapes2D.render(subset.factors[i:i + 1])[0])


def test_shapes2d_sample_factors_ranges():
    factors = Shapes2D.sample_factors(5000, np.random.default_rng(4))
    assert factors.dtype == np.int64 and factors.shape == (5000, 5)
    assert (factors.min(0) == 0).all()
    np.testing.assert_array_equal(factors.max(0), np.array(Shapes2D.factor_sizes) - 1)
    np.testing.assert_array_equal(factors, Shapes2D.sample_factors(5000, np.random.default_rng(4)))
    assert Shapes2D.sample_factors(0, 0).shape == (0, 5)


def test_shapes2d_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"pos_y"):
        Shapes2D.render(np.array([[0, 0, 0, 0, 32]]))
    with pytest.raises(ValueError, match=r"orientation"):
        Shapes2D.render(np.array([[0, 0, -1, 0, 0]]))
    with pytest.raises(ValueError, match=r"factors must be an int array of shape \(n, 5\)"):
        Shapes2D.render(np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="size"):
        Shapes2D(size=0)
    with pytest.raises(ValueError, match="size"):
        Shapes2D(size=Shapes2D.num_combinations + 1)
    with pytest.raises(TypeError, match="seed"):
        Shapes2D(size=3, seed=1.5)
    with pytest.raises(ValueError, match="n must be"):
        Shapes2D.sample_factors(-1)
    with pytest.raises(IndexError):
        Shapes2D(size=5)[5]


# -------------------------------------------------------------------------------- ImageFolder

@pytest.fixture
def image_dir(tmp_path):
    """Three lossless random 13×17 images (RGB, grayscale, palette) and a JPEG in a sub-folder."""
    rng = np.random.default_rng(5)
    pixels = {"b.png": random_uint8(rng, 13, 17, 3), "a.png": random_uint8(rng, 13, 17)}
    for name, array in pixels.items():
        Image.fromarray(array).save(tmp_path / name)
    pixels["c.PNG"] = random_uint8(rng, 13, 17, 3)
    Image.fromarray(pixels["c.PNG"]).convert("RGBA").save(tmp_path / "c.PNG")
    (tmp_path / "sub").mkdir()
    Image.fromarray(random_uint8(rng, 13, 17, 3)).save(tmp_path / "sub" / "d.jpg", quality=90)
    (tmp_path / "notes.txt").write_text("not an image, and not an image extension")
    return tmp_path, pixels


def test_image_folder_lists_and_loads_images(image_dir):
    root, pixels = image_dir
    data = ImageFolder(root)
    assert data.names == ["a.png", "b.png", "c.PNG", "sub/d.jpg"] and len(data) == 4
    assert data.image_shape == (3, 13, 17) and data.unreadable == []
    check_images(data, range(4))
    gray = np.repeat(pixels["a.png"][None], 3, 0) / 255
    np.testing.assert_allclose(data[0].numpy(), gray, atol=1e-6)
    np.testing.assert_allclose(data.load(1).numpy(), pixels["b.png"].transpose(2, 0, 1) / 255,
                               atol=1e-6)
    np.testing.assert_allclose(data[2].numpy(), pixels["c.PNG"].transpose(2, 0, 1) / 255, atol=1e-6)
    assert ImageFolder(root, recursive=False).names == ["a.png", "b.png", "c.PNG"]
    assert ImageFolder(root, extensions=["JPG"]).names == ["sub/d.jpg"]
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert batch.shape == (4, 3, 13, 17)


def test_image_folder_grayscale_resize_and_crop(image_dir):
    root, pixels = image_dir
    gray = ImageFolder(root, grayscale=True)
    assert gray.image_shape == (1, 13, 17) and gray[1].shape == (1, 13, 17)
    expected = np.asarray(Image.fromarray(pixels["b.png"]).convert("L")) / 255
    np.testing.assert_allclose(gray[1][0].numpy(), expected, atol=1e-6)

    assert ImageFolder(root, size=(9, 11)).image_shape == (3, 9, 11)
    assert ImageFolder(root, size=7)[0].shape == (3, 7, 9)  # shorter side 7, aspect kept
    cropped = ImageFolder(root, crop=(5, 8))
    assert cropped.image_shape == (3, 5, 8)
    np.testing.assert_allclose(cropped[1].numpy(),
                               pixels["b.png"][4:9, 4:12].transpose(2, 0, 1) / 255, atol=1e-6)
    both = ImageFolder(root, size=10, crop=6)
    assert both.image_shape == (3, 6, 6)
    check_images(both, range(4))


def test_image_folder_reports_unreadable_files(tmp_path):
    rng = np.random.default_rng(6)
    Image.fromarray(random_uint8(rng, 9, 11, 3)).save(tmp_path / "good.png")
    buffer = io.BytesIO()
    Image.fromarray(random_uint8(rng, 9, 11, 3)).save(buffer, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    (tmp_path / "text.jpg").write_text("this is not a JPEG")
    (tmp_path / "empty.png").write_bytes(b"")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ImageFolder(tmp_path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "2 unreadable" in message and "text.jpg" in message and "empty.png" in message
    assert sorted(p.name for p, _ in data.unreadable) == ["empty.png", "text.jpg"]
    assert all(reason for _, reason in data.unreadable)
    assert data.names == ["good.png", "truncated.png"]  # its header is intact

    check_images(data, [0])
    with pytest.raises(UnreadableImageError, match="truncated.png") as info:
        data[1]
    assert info.value.path == tmp_path / "truncated.png" and info.value.reason
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.path == info.value.path and str(copy) == str(info.value)


def test_image_folder_sizes_must_agree(tmp_path):
    rng = np.random.default_rng(7)
    Image.fromarray(random_uint8(rng, 9, 11, 3)).save(tmp_path / "a.png")
    Image.fromarray(random_uint8(rng, 10, 7, 3)).save(tmp_path / "b.png")
    data = ImageFolder(tmp_path)
    check_images(data, [0])
    with pytest.raises(ValueError, match=r"'b.png'.*\(3, 10, 7\).*'a.png'.*\(3, 9, 11\)"):
        data[1]
    check_images(ImageFolder(tmp_path, crop=7), [0, 1])
    check_images(ImageFolder(tmp_path, size=(8, 8)), [0, 1])


def test_load_image_scales_16_bit_images(tmp_path):
    values = np.random.default_rng(8).integers(0, 65536, (5, 7), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = load_image(tmp_path / "deep.png", grayscale=True)
    np.testing.assert_allclose(image[0].numpy(), values / 65535, atol=1e-6)
    assert load_image(tmp_path / "deep.png").shape == (3, 5, 7)


def test_image_folder_errors_name_the_argument(tmp_path, image_dir):
    with pytest.raises(FileNotFoundError, match="root"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable image.*root"):
        ImageFolder(tmp_path / "empty")
    root, _ = image_dir
    with pytest.raises(ValueError, match=r"crop=\(20, 20\)"):
        ImageFolder(root, crop=20)
    with pytest.raises(ValueError, match="size"):
        ImageFolder(root, size=0)
    with pytest.raises(TypeError, match="crop"):
        ImageFolder(root, crop=(1, 2, 3))
    with pytest.raises(TypeError, match="extensions"):
        ImageFolder(root, extensions=".png")
    with pytest.raises(UnreadableImageError, match="nothing.png"):
        load_image(root / "nothing.png")


# -------------------------------------------------------------------------------- NumpyImages

def test_numpy_images_memory_maps_nhwc_uint8(tmp_path):
    rng = np.random.default_rng(9)
    array = random_uint8(rng, 6, 11, 13, 3)
    labels = rng.integers(0, 10, 6).astype(np.int32)
    np.save(tmp_path / "images.npy", array)
    np.save(tmp_path / "labels.npy", labels)
    data = NumpyImages(tmp_path / "images.npy", labels=tmp_path / "labels.npy")
    assert isinstance(data.array, np.memmap)
    assert data.layout == "NHWC" and data.image_shape == (3, 11, 13) and len(data) == 6
    check_images(data, range(6))
    np.testing.assert_allclose(data[4].numpy(), array[4].transpose(2, 0, 1) / 255, atol=1e-6)
    assert data.targets.dtype == np.int64
    np.testing.assert_array_equal(data.targets, labels)


def test_numpy_images_layouts_and_float_data(tmp_path):
    rng = np.random.default_rng(10)
    nchw = rng.random((4, 1, 9, 7), dtype=np.float32)
    data = NumpyImages(nchw)
    assert data.layout == "NCHW" and data.image_shape == (1, 9, 7) and data.targets is None
    assert torch.equal(data[3], torch.from_numpy(nchw[3]))
    gray = rng.random((5, 9, 7))
    data = NumpyImages(gray, labels=np.arange(5))
    assert data.layout == "NHW" and data.image_shape == (1, 9, 7)
    np.testing.assert_allclose(data[2][0].numpy(), gray[2], rtol=1e-6)
    ambiguous = random_uint8(rng, 2, 3, 5, 4)
    with pytest.raises(ValueError, match="layout"):
        NumpyImages(ambiguous)
    data = NumpyImages(ambiguous, layout="NHWC")
    assert data.image_shape == (4, 3, 5)
    np.testing.assert_allclose(data[1].numpy(), ambiguous[1].transpose(2, 0, 1) / 255, atol=1e-6)
    assert NumpyImages(ambiguous, layout="NCHW").image_shape == (3, 5, 4)


def test_numpy_images_errors_name_the_argument(tmp_path):
    rng = np.random.default_rng(11)
    with pytest.raises(ValueError, match="layout"):
        NumpyImages(random_uint8(rng, 2, 9, 9, 9))  # no channel axis
    with pytest.raises(ValueError, match="layout"):
        NumpyImages(random_uint8(rng, 2, 9, 9, 3), layout="HWC")
    with pytest.raises(TypeError, match="path_or_array.*int32"):
        NumpyImages(rng.integers(0, 9, (2, 9, 9), dtype=np.int32))
    with pytest.raises(ValueError, match="path_or_array.*shape"):
        NumpyImages(rng.random((2, 9)))
    with pytest.raises(ValueError, match="labels"):
        NumpyImages(rng.random((3, 4, 4)), labels=[0, 1])
    np.savez(tmp_path / "archive.npz", images=rng.random((2, 4, 4)))
    with pytest.raises(ValueError, match="path_or_array"):
        NumpyImages(tmp_path / "archive.npz")
    out_of_range = NumpyImages(rng.random((2, 4, 4)) * 255)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        out_of_range[0]


# ------------------------------------------------------------------------- bundled images

def test_digits():
    data = Digits()
    assert len(data) == 1797 and data.image_shape == (1, 8, 8)
    check_images(data, [0, 1000, -1])
    counts = data[5] * 16
    assert torch.equal(counts, counts.round()) and counts.max() > 0
    assert data.targets.dtype == np.int64 and set(data.targets) == set(range(10))
    big = Digits(size=21)
    assert big.image_shape == (1, 21, 21)
    check_images(big, [0, -1])
    data[0].fill_(0.5)  # items are copies
    assert not torch.all(data[0] == 0.5)
    with pytest.raises(ValueError, match="size"):
        Digits(size=0)


def test_photos():
    photos = photo_images()
    assert [tuple(p.shape) for p in photos] == [(3, 427, 640)] * 2
    assert all(p.dtype == torch.float32 and 0 <= p.min() and p.max() <= 1 for p in photos)
    data = Photos(crop_size=100, stride=150)
    # y ∈ {0, 150, 300}, x ∈ {0, 150, 300, 450} per photo.
    assert len(data) == 24 and data.image_shape == (3, 100, 100)
    assert data.names[0] == "china.jpg@y=0,x=0" and data.names[13] == "flower.jpg@y=0,x=150"
    np.testing.assert_array_equal(data.targets, [0] * 12 + [1] * 12)
    assert torch.equal(data[13], photos[1][:, 0:100, 150:250])
    check_images(data, [0, -1])
    default = Photos()
    assert len(default) == 2 * 6 * 10 and default.image_shape == (3, 64, 64)
    gray = Photos(crop_size=32, grayscale=True)
    assert gray.image_shape == (1, 32, 32)
    check_images(gray, [0, -1])
    with pytest.raises(ValueError, match="crop_size"):
        Photos(crop_size=428)
    with pytest.raises(ValueError, match="stride"):
        Photos(stride=0)


# ---------------------------------------------------------------------------------- CIFAR-10

def write_cifar(root, rng, per_batch=4, protocol=4):
    """A fake cifar-10-batches-py folder; returns the images and labels of train and test."""
    root.mkdir()
    arrays = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        data = random_uint8(rng, per_batch, 3072)
        labels = rng.integers(0, 10, per_batch).tolist()
        arrays[name] = data, labels
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"label_names": [f"class{k}".encode() for k in range(10)], b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return arrays


def test_cifar10_reads_the_python_batches(tmp_path):
    arrays = write_cifar(tmp_path / "cifar-10-batches-py", np.random.default_rng(12))
    train = CIFAR10(tmp_path)  # the folder holding cifar-10-batches-py works too
    assert len(train) == 20 and train.image_shape == (3, 32, 32)
    assert train.classes == [f"class{k}" for k in range(10)]
    assert train.targets.dtype == np.int64
    np.testing.assert_array_equal(train.targets[4:8], arrays["data_batch_2"][1])
    data = arrays["data_batch_2"][0][1].reshape(3, 32, 32)
    np.testing.assert_allclose(train[5].numpy(), data / 255, atol=1e-6)
    check_images(train, [0, -1])
    test = CIFAR10(tmp_path / "cifar-10-batches-py", train=False)
    assert len(test) == 4
    np.testing.assert_array_equal(test.images, arrays["test_batch"][0].reshape(4, 3, 32, 32))


def test_cifar10_accepts_pickles_naming_numpy_core(tmp_path):
    """The original files were written by numpy 1 and name numpy.core.multiarray."""
    root = tmp_path / "cifar"
    write_cifar(root, np.random.default_rng(13), protocol=3)
    for path in root.iterdir():
        content = path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        path.write_bytes(content)
    assert b"numpy.core.multiarray" in (root / "test_batch").read_bytes()
    check_images(CIFAR10(root, train=False), [0])


class _Malicious:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling would call open(path, "w"): a visible side effect
        return open, (str(self.path), "w")


def test_cifar10_refuses_pickles_that_call_code(tmp_path):
    root = tmp_path / "cifar"
    write_cifar(root, np.random.default_rng(14))
    marker = tmp_path / "created_by_unpickling"
    batch = {b"data": random_uint8(np.random.default_rng(15), 2, 3072), b"labels": [0, 1],
             b"payload": _Malicious(marker)}
    (root / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_3.*io\.open"):
        CIFAR10(root)
    assert not marker.exists()
    check_images(CIFAR10(root, train=False), [0])  # the untouched test batch still loads


def test_cifar10_missing_files(tmp_path):
    root = tmp_path / "cifar"
    write_cifar(root, np.random.default_rng(16))
    (root / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFAR10(root)
    with pytest.raises(FileNotFoundError, match="root"):
        CIFAR10(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------ CelebA

ATTRIBUTES = [f"Attribute_{k}" for k in range(40)]


def write_celeba(root, rng, count=5, partition=(0, 0, 1, 2, 2)):
    """A fake CelebA folder of ``count`` 11×9 (height × width) JPEGs; returns the ±1 values."""
    (root / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(count)]
    for name in names:
        Image.fromarray(random_uint8(rng, 11, 9, 3)).save(root / "img_align_celeba" / name)
    values = rng.choice([-1, 1], (count, 40))
    lines = [str(count), " ".join(ATTRIBUTES)]
    lines += [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, values)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    if partition is not None:
        (root / "list_eval_partition.txt").write_text(
            "".join(f"{name} {k}\n" for name, k in zip(names, partition)))
    return names, values


def test_celeba_reads_attributes_and_splits(tmp_path):
    names, values = write_celeba(tmp_path, np.random.default_rng(17))
    data = CelebA(tmp_path)
    assert data.names == names and data.image_shape == (3, 11, 9)
    assert data.target_names == ATTRIBUTES
    assert data.targets.dtype == np.int64 and data.targets.shape == (5, 40)
    np.testing.assert_array_equal(data.targets, (values + 1) // 2)
    check_images(data, range(5))
    assert CelebA(tmp_path, split="train").names == names[:2]
    valid = CelebA(tmp_path, split="valid")
    assert valid.names == names[2:3]
    np.testing.assert_array_equal(valid.targets, (values[2:3] + 1) // 2)
    assert CelebA(tmp_path, split="test").names == names[3:]
    small = CelebA(tmp_path, size=8, crop=6)
    assert small.image_shape == (3, 6, 6)
    check_images(small, [0])


def test_celeba_errors(tmp_path):
    write_celeba(tmp_path / "no_partition", np.random.default_rng(18), partition=None)
    assert len(CelebA(tmp_path / "no_partition")) == 5
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        CelebA(tmp_path / "no_partition", split="train")
    with pytest.raises(ValueError, match="split"):
        CelebA(tmp_path / "no_partition", split="validation")
    with pytest.raises(FileNotFoundError, match="img_align_celeba"):
        CelebA(tmp_path / "nowhere")

    root = tmp_path / "broken"
    names, _ = write_celeba(root, np.random.default_rng(19))
    attr = root / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    attr.write_text("\n".join(lines[:3] + [lines[3].replace(" 1", " 2", 1)] + lines[4:]))
    with pytest.raises(ValueError, match="1 or -1"):
        CelebA(root)
    attr.write_text("\n".join(lines[:3] + [lines[3] + " 1"] + lines[4:]))
    with pytest.raises(ValueError, match="line 4"):
        CelebA(root)
    attr.write_text("\n".join(lines))
    (root / "img_align_celeba" / names[1]).unlink()
    with pytest.raises(FileNotFoundError, match=names[1]):
        CelebA(root)


# ---------------------------------------------------------------------------- RandomPatches

def test_random_patches_are_deterministic_crops():
    rng = np.random.default_rng(20)
    images = NumpyImages(random_uint8(rng, 3, 13, 17, 3), labels=[4, 5, 6])
    patches = RandomPatches(images, 5, 7, seed=1)
    assert len(patches) == 21 and patches.image_shape == (3, 5, 5)
    check_images(patches, range(21))
    for k in range(21):
        image, y, x = patches.positions(k)
        assert image == k // 7 and 0 <= y <= 8 and 0 <= x <= 12
        assert torch.equal(patches[k], images[image][:, y:y + 5, x:x + 5])
    again = RandomPatches(images, 5, 7, seed=1)
    assert all(torch.equal(again[k], patches[k]) for k in reversed(range(21)))
    other = RandomPatches(images, 5, 7, seed=2)
    assert [other.positions(k) for k in range(21)] != [patches.positions(k) for k in range(21)]
    assert len({patches.positions(k) for k in range(21)}) > 10  # positions vary
    np.testing.assert_array_equal(patches.targets, np.repeat([4, 5, 6], 7))


def test_random_patches_errors_and_plain_sequences():
    rng = np.random.default_rng(21)
    tensors = [torch.from_numpy(rng.random((1, 6, 9), dtype=np.float32)) for _ in range(2)]
    patches = RandomPatches(tensors, 6, 2)  # no image_shape: uses the first item's shape
    assert patches[3].shape == (1, 6, 6) and patches.targets is None
    with pytest.raises(ValueError, match="patch_size"):
        RandomPatches(tensors, 7, 2)
    with pytest.raises(ValueError, match="patches_per_image"):
        RandomPatches(tensors, 3, 0)
    with pytest.raises(IndexError):
        patches.positions(4)


# ----------------------------------------------------------------------------- load_dataset

def test_load_dataset_resolves_every_form(tmp_path, image_dir):
    assert isinstance(load_dataset("shapes2d", size=10), Shapes2D)
    assert len(load_dataset("Shapes2D", size=10)) == 10
    assert load_dataset("digits", size=12).image_shape == (1, 12, 12)
    assert load_dataset("photos", crop_size=200).image_shape == (3, 200, 200)
    root, _ = image_dir
    folder = load_dataset(str(root), grayscale=True)
    assert isinstance(folder, ImageFolder) and folder.image_shape == (1, 13, 17)
    np.save(tmp_path / "x.npy", random_uint8(np.random.default_rng(22), 3, 5, 5))
    assert isinstance(load_dataset(str(tmp_path / "x.npy")), NumpyImages)
    write_cifar(tmp_path / "cifar", np.random.default_rng(23))
    assert len(load_dataset(f"cifar10:{tmp_path / 'cifar'}", train=False)) == 4
    write_celeba(tmp_path / "celeba", np.random.default_rng(24))
    assert len(load_dataset(f"celeba:{tmp_path / 'celeba'}", split="test")) == 2
    for bad in ("mnist", "cifar10", str(tmp_path / "missing.npy")):
        with pytest.raises(ValueError, match=r"cifar10:PATH"):
            load_dataset(bad)

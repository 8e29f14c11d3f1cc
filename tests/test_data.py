import warnings

import numpy as np
import pytest
from conftest import make_npz
from medmnist import INFO

from engine.config import DataConfig
from engine.learn.data import DataError, dataset_info, load_split, present_datasets, to_features


def cfg(folder, flag="pneumoniamnist", **kw):
    return DataConfig(flag, data_dir=str(folder), allow_download=False, **kw)


def test_real_pneumonia_matches_info(data_dir):
    info = INFO["pneumoniamnist"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the official file must pass the md5 check silently
        for split in ("train", "val", "test"):
            s = load_split(cfg(data_dir), split)
            assert len(s) == info["n_samples"][split]
            assert s.images.shape[1:] == (28, 28) and s.images.dtype == np.uint8
            assert set(np.unique(s.targets)) == {0, 1}
    x = to_features(s.images[:5])
    assert x.shape == (5, 784) and x.min() >= -1 and x.max() <= 1
    pooled = to_features(s.images[:5], pool=2)  # 2x2 block means: 14x14 inputs
    assert pooled.shape == (5, 196)
    assert np.isclose(pooled[0, 0], s.images[0, :2, :2].astype(np.float32).mean() / 127.5 - 1)
    by3 = to_features(s.images[:5], pool=3)  # 28 is not a multiple of 3: 27x27 -> 9x9 inputs
    assert by3.shape == (5, 81)
    assert np.isclose(by3[1, -1], s.images[1, 24:27, 24:27].astype(np.float32).mean() / 127.5 - 1)


def test_real_breast_loads(data_dir):
    s = load_split(cfg(data_dir, "breastmnist"), "test")
    assert len(s) == 156 and s.info.n_outputs == 2


@pytest.mark.parametrize(
    "flag,features,outputs,multi",
    [("bloodmnist", 28 * 28 * 3, 8, False), ("chestmnist", 784, 14, True), ("retinamnist", 28 * 28 * 3, 5, False),
     ("octmnist", 784, 4, False)],
)
def test_generated_subsets_follow_info(tmp_path, flag, features, outputs, multi):
    make_npz(tmp_path, flag)
    with pytest.warns(UserWarning, match="md5"):
        s = load_split(cfg(tmp_path, flag), "train")
    assert to_features(s.images).shape == (40, features)
    assert s.info.n_outputs == outputs and s.info.multi_label == multi
    assert s.targets.shape == ((40, 14) if multi else (40,))
    assert flag in present_datasets(tmp_path)


def test_64px_file_is_used_when_present(tmp_path):
    make_npz(tmp_path, "breastmnist", size=64)
    with pytest.warns(UserWarning):
        s = load_split(cfg(tmp_path, "breastmnist", size=64), "val")
    assert s.images.shape[1:] == (64, 64)


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(DataError) as e:
        load_split(cfg(tmp_path), "test")
    msg = str(e.value)
    assert str(tmp_path / "pneumoniamnist.npz") in msg and "MEDMNIST_DIR" in msg and "--data-dir" in msg


def test_truncated_file(tmp_path, data_dir):
    data = (data_dir / "breastmnist.npz").read_bytes()
    (tmp_path / "breastmnist.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_split(cfg(tmp_path, "breastmnist"), "test")


def test_not_a_zip(tmp_path):
    (tmp_path / "breastmnist.npz").write_text("hello")
    with pytest.raises(DataError, match="breastmnist.npz"):
        load_split(cfg(tmp_path, "breastmnist"), "test")


def test_wrong_shapes_and_labels(tmp_path):
    path = make_npz(tmp_path, "breastmnist")
    arrays = dict(np.load(path))
    arrays["test_images"] = arrays["test_images"][:, :20]
    np.savez(path, **arrays)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="shape"):
        load_split(cfg(tmp_path, "breastmnist"), "test")
    path = make_npz(tmp_path, "breastmnist")
    arrays = dict(np.load(path))
    arrays["val_labels"][0] = 7
    np.savez(path, **arrays)
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"labels range.*\[0, 1\]"):
        load_split(cfg(tmp_path, "breastmnist"), "test")
    arrays.pop("train_labels")
    np.savez(path, **arrays)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no 'train_labels'"):
        load_split(cfg(tmp_path, "breastmnist"), "test")


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(DataError, match="Unknown dataset 'organmnist3d'"):
        dataset_info("organmnist3d")
    with pytest.raises(DataError, match="Unknown split"):
        load_split(cfg(tmp_path), "dev")

"""Official test splits: the loaders mark a data set's official test/validation images, prepare_dataset stores
the mask, and a data set with ``split: official`` never trains on one of them: not in the split function, not in
the real trainer, not in the FID reference of the training set; its test and reference images come only from them.
"""

import json
import os

import numpy as np
import pytest
import torch

from diffbias import data as data_lib
from diffbias.config import ConfigError, RunKey, run_spec, validate_config
from diffbias.measure import build_shared_input
from diffbias.runs import TrainedRun
from diffbias.train import Trainer

from test_data import cifar_dir, fmnist_dir, imagenet32_dir, save_png  # noqa: F401 (fixtures)


def test_loaders_mark_their_official_test_images(fmnist_dir, cifar_dir, imagenet32_dir, tmp_path):  # noqa: F811
    d, _, _ = fmnist_dir
    assert data_lib.official_test_mask("fashion_mnist", str(d)).tolist() == [False] * 5 + [True] * 3
    assert data_lib.official_test_mask("fashion_mnist", str(d), splits=("train",)) is None
    # CIFAR-10: test_batch comes last (here 6 batches of 2 images)
    assert data_lib.official_test_mask("cifar10", str(cifar_dir)).tolist() == [False] * 10 + [True] * 2
    assert data_lib.official_test_mask("cifar10", str(cifar_dir), max_images=10).tolist() == [False] * 10
    # Imagenet32: three training batches of 2, then val_data.npz (1 image)
    assert data_lib.official_test_mask("imagenet32", str(imagenet32_dir)).tolist() == [False] * 6 + [True]
    assert data_lib.official_test_mask("imagenet32", str(imagenet32_dir), include_val=False) is None
    # an npz with its own is_test array; without one, none
    np.savez(tmp_path / "own.npz", images=np.zeros((4, 8, 8), np.uint8), is_test=np.array([0, 1, 0, 1]))
    assert data_lib.official_test_mask("npz", str(tmp_path / "own.npz")).tolist() == [False, True, False, True]
    np.savez(tmp_path / "plain.npz", images=np.zeros((4, 8, 8), np.uint8))
    assert data_lib.official_test_mask("npz", str(tmp_path / "plain.npz")) is None
    assert data_lib.official_test_mask("lsun", str(tmp_path)) is None
    fixture = data_lib.official_test_mask("fixture", "x", max_images=128)
    assert fixture.sum() == 32 and fixture[-32:].all()


def test_celeba_partition_file_marks_validation_and_test(tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    for i in range(1, 7):
        save_png(folder / f"{i:06d}.png", np.full((20, 16, 3), i, np.uint8))
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text(
        "".join(f"{i:06d}.png {p}\n" for i, p in zip(range(1, 7), [0, 0, 1, 0, 2, 2])))
    assert data_lib.official_test_mask("celeba", str(folder)).tolist() == [False, False, True, False, True, True]
    os.remove(tmp_path / "celeba" / "list_eval_partition.txt")
    assert data_lib.official_test_mask("celeba", str(folder)) is None


def test_imagenet_train_plus_val_is_one_pool_with_val_marked(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for wnid in ("n01", "n02"):
            (tmp_path / split / wnid).mkdir(parents=True)
            for i in range(count):
                save_png(tmp_path / split / wnid / f"{i}.png", np.full((8, 8, 3), i, np.uint8))
    images, labels = data_lib.load_imagenet(str(tmp_path), split="train+val")
    assert len(images) == 10 and labels.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    mask = data_lib.official_test_mask("imagenet", str(tmp_path), split="train+val")
    assert mask.tolist() == [False] * 6 + [True] * 4
    assert data_lib.official_test_mask("imagenet", str(tmp_path), split="train") is None


def test_prepared_pool_stores_the_mask_and_old_pools_still_load(tmp_path, cifar_dir):  # noqa: F811
    out = tmp_path / "c.npz"
    data_lib.prepare_dataset({"source": "cifar10", "path": str(cifar_dir), "resolution": 32, "channels": 3}, str(out))
    images, labels, meta = data_lib.load_prepared(str(out))
    assert data_lib.prepared_test_mask(str(out)).tolist() == [False] * 10 + [True] * 2
    assert meta["official_test_images"] == 2
    # a pool prepared before masks were stored: loads, serves split: shuffle, and split: official says what to do
    old = tmp_path / "old.npz"
    np.savez(old, images=images, labels=labels, meta=np.array(json.dumps({**meta, "official_test_images": None})))
    assert data_lib.load_prepared(str(old))[0].shape == images.shape
    assert data_lib.prepared_test_mask(str(old)) is None
    assert data_lib.run_test_mask({"dataset": {}}, str(old)) is None
    with pytest.raises(ValueError, match="prepare it again"):
        data_lib.run_test_mask({"dataset": {"split": "official"}}, str(old))


def _config(split: str | None, **dataset):
    ds = {"source": "fixture", "path": "fx", "resolution": 16, "channels": 3, "test_size": 8, "max_images": 64,
          **({"split": split} if split else {}), **dataset}
    return {"datasets": {"fx": ds},
            "training": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "log_every": 1},
            "variants": {"dit": {"preset": "DiT-T/2"}},
            "studies": {"s": {"dataset": "fx", "variants": ["dit"], "N": [40], "seeds": [5]}}}


def test_split_key_is_checked_before_any_job_and_kept_out_of_default_run_specs():
    with pytest.raises(ConfigError, match=r"datasets\.fx\.split.*no official test split"):
        validate_config(_config("official", source="lsun", path="/nowhere"))
    with pytest.raises(ConfigError, match=r"datasets\.fx\.split.*train\+val"):
        validate_config(_config("official", source="imagenet", path="/nowhere"))
    with pytest.raises(ConfigError, match=r"studies\.s\.N"):  # 64 fixture images: 48 training, 16 official test
        validate_config({**_config("official"), "studies": {"s": {"dataset": "fx", "variants": ["dit"], "N": [49]}}})
    cifar = _config("official", source="cifar10", path="/nowhere")
    cifar["datasets"]["fx"].pop("max_images")
    cifar["studies"]["s"]["N"] = [50001]
    with pytest.raises(ConfigError, match=r"studies\.s\.N.*50000 training"):
        validate_config(cifar)
    # split: shuffle, stated or not, leaves the run spec (and so the run's hash) as it was
    key = RunKey("fx", "dit", 40, 5)
    plain, stated = validate_config(_config(None)), validate_config(_config("shuffle"))
    assert run_spec(plain, key) == run_spec(stated, key) and "split" not in run_spec(plain, key)["dataset"]
    assert run_spec(validate_config(_config("official")), key)["dataset"]["split"] == "official"


@pytest.mark.parametrize("seed", [0, 1, 43, 143])
@pytest.mark.parametrize("part", ["A", "B"])
def test_no_official_test_image_is_ever_in_a_training_set(seed, part):
    is_test = np.zeros(6000, bool)
    is_test[5000:] = True  # CIFAR-10's layout at 1/10 scale: test_batch last
    for n in (1, 10, 1000, 2500):
        spec = {"run": {"N": n, "seed": seed}, "dataset": {"test_size": 1000, "split": "official"}, "split": part}
        train, test = data_lib.run_split(6000, spec, is_test)
        assert len(train) == n and not is_test[train].any()
        assert len(test) == 1000 and is_test[test].all()


def test_trainer_run_and_fid_reference_use_only_the_official_parts(tmp_path):
    cfg = validate_config(_config("official"))
    spec = run_spec(cfg, RunKey("fx", "dit", 40, 5))
    data = tmp_path / "fx.npz"
    data_lib.prepare_dataset(spec["dataset"], str(data))
    images, _, _ = data_lib.load_prepared(str(data))
    is_test = data_lib.prepared_test_mask(str(data))
    assert is_test.sum() == 16
    trainer = Trainer(spec, data, tmp_path / "run", tmp_path / "ck.pt", device="cpu")
    official_test = data_lib.to_model_range(images[is_test])
    # every training image the trainer holds is an official training image, never an official test image
    for x in trainer.x_train:
        assert not (official_test == x).flatten(1).all(1).any()
    assert len(trainer.x_train) == 40
    trainer.run(progress=False)
    run = TrainedRun.load(tmp_path / "run" / "model.pt", data, "cpu")
    train, test = run.split
    assert not is_test[train].any() and is_test[test].all() and len(test) == 8
    assert torch.equal(run.train_images().x.cpu(), trainer.x_train.cpu())
    # the FID reference from the test set is made of official test images only, through the shared-input command
    ref = tmp_path / "ref.npz"
    seen = {}

    def build(images_, labels, split, key, cfg_, device, threads):
        seen["train"], seen["test"] = split
        return {"n": np.array(len(split[1]))}

    from diffbias import measurements

    measurements.load()
    measurements.SHARED_INPUTS["__split_probe"] = measurements.SharedInput("__split_probe", "fid", build)
    try:
        build_shared_input("__split_probe", data=str(data), n=40, seed=5, test_size=8, split="official",
                           config={"reference": "test"}, out=str(ref))
    finally:
        del measurements.SHARED_INPUTS["__split_probe"]
    assert np.array_equal(seen["train"], train) and np.array_equal(seen["test"], test)

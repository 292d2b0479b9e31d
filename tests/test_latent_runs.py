"""Runs on a latent data set, end to end through the real parts: a seeded tiny diffusers AutoencoderKL, a fixture data
set with official test images (``test_path``) encoded once, a class-conditional DiT trained on the cache, then the
measurements as the workflow runs them.

Checked: the split never trains on official test images; training and measurements read the cached latents (and a
resumed training reads the same ones); PSNR runs in latent space and says so; samples are decoded latents; the FID
reference is real images from the source, not decoded latents; FID against a reference-statistics file equals FID
against the images the statistics were computed from.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("diffusers")

from diffbias import data as data_lib  # noqa: E402
from diffbias import train as train_lib  # noqa: E402
from diffbias.autoencoder import Autoencoder, save_tiny_autoencoder, to_uint8_images  # noqa: E402
from diffbias.latents import LatentPool, encode_dataset  # noqa: E402
from diffbias.measure import build_shared_input, measure  # noqa: E402
from diffbias.runs import TrainedRun  # noqa: E402

COUNT, TEST_IMAGES, RES = 40, 256, 32  # fixture images at path, at test_path (the fixture's default count), pixels


def _spec(vae_dir) -> dict:
    return {"source": "fixture", "path": "lat-train", "test_path": "lat-test", "split": "official", "resolution": RES,
            "channels": 3, "max_images": COUNT, "test_size": 12,
            "latents": {"autoencoder": str(vae_dir), "shard_size": 64, "hflip": True}}


def _run_spec(vae_dir, steps: int = 4) -> dict:
    return {
        "run": {"dataset": "lat", "variant": "dit", "N": 16, "seed": 3},
        "dataset": _spec(vae_dir),
        "model": {"backbone": "dit", "preset": "DiT-T/2",
                  "options": {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 2, "attention": "G,G"}},
        "training": {"steps": steps, "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "ema_decay": 0.99,
                     "ema_warmup": True, "hflip": True, "class_conditional": True, "label_dropout": 0.1,
                     "checkpoint_every": 2, "log_every": 2, "grad_clip": None},
    }


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latent-run")
    vae = save_tiny_autoencoder(tmp / "vae", seed=0)
    meta = encode_dataset(_spec(vae), tmp / "cache", device="cpu", batch_size=32, progress=False)
    train_lib.Trainer(_run_spec(vae), tmp / "cache", tmp / "run", tmp / "ck.pt", device="cpu").run(progress=False)
    return tmp, vae, meta


def test_official_test_images_are_marked_and_never_trained_on(latent_run):
    tmp, _, meta = latent_run
    assert meta["official_test_images"] == TEST_IMAGES and meta["count"] == COUNT + TEST_IMAGES
    pool = LatentPool(tmp / "cache")
    assert pool.is_test.sum() == TEST_IMAGES and pool.is_test[COUNT:].all()  # is_test.npy beside the shards
    run = TrainedRun.load(tmp / "run" / "model.pt", tmp / "cache" / "meta.json", "cpu")
    train, test = run.split
    assert (train < COUNT).all() and (test >= COUNT).all() and len(train) == 16 and len(test) == 12


def test_a_latent_run_measures_its_cached_latents_and_samples_images(latent_run):
    tmp, vae, _ = latent_run
    pool = LatentPool(tmp / "cache")
    run = TrainedRun.load(tmp / "run" / "model.pt", tmp / "cache", "cpu")
    assert run.space == "latent" and run.image_shape == (4, 4, 4) and run.num_classes == 10
    train = run.train_images(5)
    assert torch.equal(train.x, torch.from_numpy(pool[run.split[0][:5]].astype(np.float32)))
    assert torch.equal(train.y, torch.as_tensor(pool.labels[run.split[0][:5]]))
    # samples: latents sampled without x0 clipping, decoded by the cache's autoencoder
    from diffbias.runs import sampling_labels
    from diffbias.sampling import sample_batches

    samples = run.sample(5, sampling_steps=3, seed=1, batch_size=4)
    assert samples.shape == (5, 3, RES, RES) and samples.dtype == np.uint8
    ae = Autoencoder.load(vae, "cpu")
    with torch.no_grad():
        z = torch.cat(list(sample_batches(run.model, 5, shape=(4, 4, 4), steps=3, seed=1, batch_size=4,
                                          labels=sampling_labels(10, 5, 1), clip_denoised=False)))
    assert np.array_equal(samples, to_uint8_images(ae.decode(z)))
    assert z.abs().max() > 1  # unclipped latents: clipping to [-1, 1] would have been wrong here
    # the FID reference is real images of the source (cropped as the cache's were), not decoded latents
    ref = run.reference_images("test", 6)
    real, _ = data_lib.load_pool("fixture", "lat-test", resolution=RES, channels=3)
    assert len(ref) == 6 and np.array_equal(ref[0:6], real[run.split[1][:6] - COUNT])


def test_psnr_in_latent_space_says_so(latent_run, tmp_path):
    tmp, _, _ = latent_run
    measure("psnr", model=str(tmp / "run" / "model.pt"), data=str(tmp / "cache" / "meta.json"),
            out=str(tmp_path / "psnr.parquet"), config={"num_images": 4, "respacing": 3, "clip": True}, device="cpu")
    psnr = pd.read_parquet(tmp_path / "psnr.parquet")
    assert set(psnr["space"]) == {"latent"} and not psnr["x0_clipped"].any()  # [-1, 1] is no latent range
    assert psnr["gap"].notna().all() and (psnr["dataset"] == "lat").all()


def test_fid_of_decoded_samples_against_images_and_against_statistics(latent_run, tmp_path):
    from diffbias.metrics.fid import save_fid_statistics

    tmp, _, _ = latent_run
    settings = {"num_samples": 6, "sampling_steps": 3, "reference": "test", "max_reference": 8, "batch_size": 6}
    shared = tmp_path / "reference.npz"
    build_shared_input("fid_reference", data=str(tmp / "cache" / "meta.json"), n=16, seed=3, test_size=12,
                       config=settings, out=str(shared), device="cpu")
    with np.load(shared) as f:
        features, spatial = f["features"], {"mu_s": f["mu_s"], "sigma_s": f["sigma_s"]}
    run = TrainedRun.load(tmp / "run" / "model.pt", tmp / "cache", "cpu")
    from diffbias.metrics.fid import inception_features

    real = run.reference_images("test", 8)
    assert np.allclose(features, inception_features(real[0:8]).numpy())  # the shared input read the real images
    save_fid_statistics(tmp_path / "stats.npz", torch.from_numpy(features))
    with np.load(tmp_path / "stats.npz") as f:  # an ADM-style file: pool and spatial statistics
        np.savez(tmp_path / "adm.npz", mu=f["mu"], sigma=f["sigma"], **spatial)
    common = dict(model=str(tmp / "run" / "model.pt"), data=str(tmp / "cache" / "meta.json"), device="cpu",
                  inputs={"shared:fid_reference": str(shared)})
    measure("fid", out=str(tmp_path / "a.parquet"), arrays_out=str(tmp_path / "a.npz"), config=settings, **common)
    measure("fid", out=str(tmp_path / "b.parquet"), arrays_out=str(tmp_path / "b.npz"),
            config={**settings, "reference_statistics": {"lat": str(tmp_path / "stats.npz")}}, **common)
    measure("fid", out=str(tmp_path / "c.parquet"), arrays_out=str(tmp_path / "c.npz"),
            config={**settings, "reference_statistics": {"lat": str(tmp_path / "adm.npz")}}, **common)
    a, b, c = (pd.read_parquet(tmp_path / f"{x}.parquet").iloc[0] for x in "abc")
    assert "fid_images" not in a and b["fid_images"] == a["fid"]
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-6) and b["fid_statistics"] == str(tmp_path / "stats.npz")
    assert "sfid_images" not in b and c["sfid_images"] == a["sfid"]  # sFID against the file's mu_s, sigma_s
    assert c["sfid"] == pytest.approx(a["sfid"], rel=1e-5) and c["fid"] == pytest.approx(a["fid"], rel=1e-6)
    samples = np.load(tmp_path / "a.npz")["samples"]
    assert samples.shape == (6, 3, RES, RES) and samples.dtype == np.uint8


def test_guided_fid_needs_a_class_conditional_run_and_doubles_the_forwards(latent_run, tmp_path):
    from diffbias.measurements import get

    tmp, _, _ = latent_run
    settings = {"num_samples": 4, "sampling_steps": 2, "reference": "test", "max_reference": 8, "batch_size": 4}
    measure("fid_guided", model=str(tmp / "run" / "model.pt"), data=str(tmp / "cache"), out=str(tmp_path / "g.parquet"),
            arrays_out=str(tmp_path / "g.npz"), config=settings, device="cpu")
    row = pd.read_parquet(tmp_path / "g.parquet").iloc[0]
    assert row["guidance_scale"] == 1.5 and np.isfinite(row["fid"])
    m = get("fid_guided")
    assert m.cost({}, {**settings, "guidance_scale": 1.5}).forwards == 2 * 4 * 2 and m.class_conditional


class _Stop(BaseException):
    pass


def test_a_resumed_training_reads_the_same_latents(latent_run, tmp_path, monkeypatch):
    """Killed after its first checkpoint and resumed, a training gathers the same cached rows (latents and mirrored
    twins) at every later step as the uninterrupted one, and ends with the same weights."""
    tmp, vae, _ = latent_run
    monkeypatch.setattr(train_lib, "LATENTS_ON_DEVICE_BYTES", 0)  # every batch from the memory-mapped cache
    read: list = []
    real = LatentPool.gather

    def recording(self, idx, hflip=False):
        read.append((tuple(np.asarray(idx).tolist()), hflip))
        return real(self, idx, hflip)

    monkeypatch.setattr(LatentPool, "gather", recording)
    spec = _run_spec(vae, steps=6)
    train_lib.Trainer(spec, tmp / "cache", tmp_path / "a", tmp_path / "a.pt", device="cpu").run(progress=False)
    uninterrupted = list(read)
    read.clear()

    original_step = train_lib.Trainer.train_step

    def dies_after_the_checkpoint(self):
        if self.step == 2:  # the checkpoint of step 2 is written
            raise _Stop
        return original_step(self)

    monkeypatch.setattr(train_lib.Trainer, "train_step", dies_after_the_checkpoint)
    with pytest.raises(_Stop):
        train_lib.Trainer(spec, tmp / "cache", tmp_path / "b", tmp_path / "b.pt", device="cpu").run(progress=False)
    before = len(read)
    monkeypatch.setattr(train_lib.Trainer, "train_step", original_step)
    resumed = train_lib.Trainer(spec, tmp / "cache", tmp_path / "b", tmp_path / "b.pt", device="cpu")
    assert resumed.try_resume() and resumed.step == 2
    resumed = train_lib.Trainer(spec, tmp / "cache", tmp_path / "b", tmp_path / "b.pt", device="cpu")
    resumed.run(progress=False)
    assert read[before:] == uninterrupted[before:] and read[:before] == uninterrupted[:before]
    a, b = (torch.load(d / "model.pt", weights_only=False) for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_pixel_pool_with_official_test_images(tmp_path):
    from PIL import Image

    for split, wnids in (("train", {"n01": 3, "n02": 2}), ("val", {"n01": 1, "n02": 2})):
        for wnid, n in wnids.items():
            (tmp_path / split / wnid).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 16), (40 * i, 0, 9)).save(tmp_path / split / wnid / f"{i}.JPEG")
    spec = {"source": "imagenet", "path": str(tmp_path / "train"), "test_path": str(tmp_path / "val"),
            "resolution": 8, "channels": 3}
    data_lib.prepare_dataset(spec, str(tmp_path / "pool.npz"))
    images, labels, meta = data_lib.load_prepared(str(tmp_path / "pool.npz"))
    assert images.shape == (8, 3, 8, 8) and list(labels) == [0, 0, 0, 1, 1, 0, 1, 1]
    assert meta["official_test_images"] == 3
    run = {"run": {"N": 4, "seed": 0}, "dataset": {"test_size": 3, "split": "official"}}
    mask = data_lib.run_test_mask(run, str(tmp_path / "pool.npz"))
    assert list(np.nonzero(mask)[0]) == [5, 6, 7]
    train, test = data_lib.run_split(8, run, mask)
    assert set(test) == {5, 6, 7} and not set(train) & {5, 6, 7}
    assert data_lib.official_split_problem("lsun") and not data_lib.official_split_problem("lsun", test_path="val")
    assert np.array_equal(data_lib.PixelImages(spec)[[5, 0]], images[[5, 0]])  # streamed == prepared
    (tmp_path / "val" / "n03").mkdir()
    with pytest.raises(ValueError, match="different class folders"):
        data_lib.source_pool(spec)


def test_tiny_autoencoder_command(tmp_path, capsys):
    from diffbias.autoencoder import autoencoder_geometry
    from diffbias.cli import main

    main(["tiny-autoencoder", "--out", str(tmp_path / "vae")])
    assert "weights_sha256" in capsys.readouterr().out
    assert autoencoder_geometry(tmp_path / "vae") == (4, 8) == autoencoder_geometry(tmp_path / "absent")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["latent_channels"] == 4


@pytest.mark.slow
def test_counts_at_the_latent_input_match_the_anchors():
    """paper-002's counts table builds every model at the latent grid (4 x 32 x 32) with the label table of its 1000
    classes: DiT-XL/2 has the DiT paper's counts, DiMR-XL/2R and DICE-XL those of their presets' references."""
    from pathlib import Path

    from diffbias import plan
    from diffbias.config import load_config
    from diffbias.counts import study_counts
    from diffbias.metrics.flops import model_summary

    cfg = load_config(Path(__file__).resolve().parents[1] / "workflow/configs/paper-002.yaml")
    study = plan.study_description(cfg, "dice")
    study["variant_specs"] = {v: study["variant_specs"][v] for v in ("dit", "dimr", "dice")}
    counts = study_counts(study)[0].set_index("variant")
    assert (counts["input"] == "4x32x32 latents").all()
    assert counts.loc["dit", "params"] == 674_834_720 and abs(counts.loc["dit", "gmacs"] / 118.64 - 1) <= 1e-3
    assert "114.46 GFLOPs (ours 114.46)" in counts.loc["dit", "published"]  # paper 002 table 2's convention
    for variant, preset in (("dimr", "DiMR-XL/2R"), ("dice", "DICE-XL")):
        summary = model_summary(preset)
        assert summary["input"] == (4, 32) and summary["num_classes"] == 1000
        assert counts.loc[variant, "params"] == summary["params"]
        assert counts.loc[variant, "gmacs"] == pytest.approx(summary["gflops"])

"""pyvae.train: data order, schedules, logs, checkpoints, exact resume (in-process and after a
SIGKILL), divergence, precision, DistributedDataParallel under torchrun, and `pyvae train`."""
import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from pyvae.cli import main
from pyvae.models import BaseVAE, ModelOutput, register
from pyvae.models.base import LN2
from pyvae.ops import reparameterize_kl
from pyvae.train import (ShardedBatchSampler, TrainConfig, TrainingDiverged, collate_images,
                         fit, load_checkpoint, load_model, read_metrics, save_checkpoint,
                         split_dataset)
from pyvae.train.metrics import MetricLayout
from pyvae.train.schedules import kl_weight, lr_factor
from conftest import run_torchrun

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
QUIET = dict(progress=False, log_every=1, checkpoint_every=None)


# ---- toy models and data ------------------------------------------------------------------------

@register
class ToyVAE(BaseVAE):
    """A linear Gaussian VAE on tiny images, with the in-kernel reparameterisation noise (drawn
    from torch's default generator, so that the RNG state matters for an exact resume).

    ``nan_at_call``: the loss of the n-th training-mode call is NaN (and its rate infinite)."""

    def __init__(self, latent_dim=2, channels=1, image_size=4, nan_at_call=None):
        super().__init__()
        self._remember(latent_dim=latent_dim, channels=channels, image_size=image_size,
                       nan_at_call=nan_at_call)
        self.shape = (channels, image_size, image_size)
        pixels = channels * image_size * image_size
        self.enc = nn.Linear(pixels, 2 * latent_dim)
        self.dec = nn.Linear(latent_dim, pixels)
        self.nan_at_call, self.calls = nan_at_call, 0

    def encode(self, x):
        mu, logvar = self.enc(x.flatten(1)).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z):
        return torch.sigmoid(self.dec(z)).view(-1, *self.shape)

    def loss(self, x, kl_weight=1.0):
        mu, logvar = self.encode(x)
        z, kl = reparameterize_kl(mu, logvar)
        logits = self.dec(z).view(-1, *self.shape)
        distortion = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        distortion = distortion.flatten(1).sum(1)
        loss = (distortion + kl_weight * kl).mean()
        rate_bits = kl / LN2
        if self.training:
            self.calls += 1
            if self.calls == self.nan_at_call:
                loss, rate_bits = loss * math.nan, rate_bits * math.inf
        terms = {"dim_kl": kl, "layer_rates_bits": torch.stack([kl, 0.5 * kl], dim=1) / LN2}
        return ModelOutput(loss, distortion, rate_bits, terms, torch.sigmoid(logits))


@register
class ToyAE(BaseVAE):
    """A deterministic linear autoencoder: its loss is a per-example mean, without noise."""

    def __init__(self, latent_dim=3, channels=1, image_size=4):
        super().__init__()
        self._remember(latent_dim=latent_dim, channels=channels, image_size=image_size)
        self.enc = nn.Linear(channels * image_size * image_size, latent_dim)
        self.dec = nn.Linear(latent_dim, channels * image_size * image_size)

    def loss(self, x, kl_weight=1.0):
        z = self.enc(x.flatten(1))
        recon = self.dec(z).view_as(x)
        distortion = (recon - x).square().flatten(1).sum(1)
        rate_bits = 0.5 * z.square().sum(1) / LN2
        return ModelOutput((distortion + kl_weight * LN2 * rate_bits).mean(), distortion,
                           rate_bits, {}, recon)


@register
class TiedAE(ToyAE):
    """ToyAE with the decoder weight tied to the encoder's (a shared tensor) and a
    non-contiguous buffer."""

    def __init__(self, latent_dim=3, channels=1, image_size=4):
        super().__init__(latent_dim, channels, image_size)
        self._remember(latent_dim=latent_dim, channels=channels, image_size=image_size)
        self.enc.weight = nn.Parameter(torch.randn(latent_dim, channels * image_size ** 2))
        self.dec.weight = self.enc.weight  # used transposed below
        self.register_buffer("scale", torch.arange(6.0).view(2, 3).t())

    def loss(self, x, kl_weight=1.0):
        z = self.enc(x.flatten(1))
        recon = (z @ self.enc.weight + self.dec.bias).view_as(x)
        distortion = (recon - x).square().flatten(1).sum(1)
        return ModelOutput(distortion.mean(), distortion, torch.zeros_like(distortion))


class ToyImages(Dataset):
    """``n`` random (channels, size, size) images in [0, 1]; items are tensors, or
    ``(image, index)`` tuples with ``as_tuple``."""

    def __init__(self, n=48, channels=1, size=4, seed=0, as_tuple=False):
        self.images = torch.rand(n, channels, size, size,
                                 generator=torch.Generator().manual_seed(seed))
        self.image_shape = (channels, size, size)
        self.as_tuple = as_tuple

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return (self.images[index], index) if self.as_tuple else self.images[index]


def parameters(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_parameters(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def train_records(out_dir):
    return [r for r in read_metrics(out_dir) if r["split"] == "train"]


# ---- data order ---------------------------------------------------------------------------------

def test_sampler_global_batches_are_the_ranks_batches_concatenated():
    n, b, world = 43, 3, 4
    single = ShardedBatchSampler(n, b * world, seed=7)
    ranks = [ShardedBatchSampler(n, b, seed=7, rank=r, world_size=world) for r in range(world)]
    assert single.steps_per_epoch == 3 and all(s.steps_per_epoch == 3 for s in ranks)
    for epoch in (0, 1):
        for sampler in [single, *ranks]:
            sampler.set_epoch(epoch)
        global_batches = list(single)
        rank_batches = [list(s) for s in ranks]
        assert len(global_batches) == 3
        for step, batch in enumerate(global_batches):
            assert batch == sum((rank_batches[r][step] for r in range(world)), [])
        seen = sum(global_batches, [])
        assert len(set(seen)) == 36  # disjoint shards, remainder dropped
    single.set_epoch(0)
    epoch0 = list(single)
    single.set_epoch(1)
    assert list(single) != epoch0
    # starting at step 2 yields exactly the batches from step 2 on, same generator output
    single.set_epoch(1, start=2)
    assert len(single) == 1
    single2 = ShardedBatchSampler(n, b * world, seed=7)
    single2.set_epoch(1)
    assert list(single) == list(single2)[2:]
    assert ShardedBatchSampler(n, b * world, seed=8).permutation(0).tolist() != \
        single.permutation(0).tolist()


def test_sampler_errors():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedBatchSampler(7, 4, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ShardedBatchSampler(70, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start"):
        ShardedBatchSampler(70, 4).set_epoch(0, start=18)


def test_split_is_deterministic_and_disjoint():
    data = ToyImages(n=50)
    train, held_out = split_dataset(data, 0.2, seed=3)
    assert len(held_out) == 10 and len(train) == 40
    assert not set(train.indices) & set(held_out.indices)
    assert split_dataset(data, 0.2, seed=3)[1].indices == held_out.indices
    assert split_dataset(data, 0.2, seed=4)[1].indices != held_out.indices
    assert split_dataset(data, 0.0)[0] is data
    with pytest.raises(ValueError, match="eval_fraction"):
        split_dataset(data, 1.0)


def test_collate_takes_the_image_of_tuple_items():
    data = ToyImages(n=4, as_tuple=True)
    batch = collate_images([data[0], data[1]])
    assert batch.shape == (2, 1, 4, 4) and torch.equal(batch[1], data.images[1])


# ---- schedules and metrics ----------------------------------------------------------------------

def test_schedules():
    assert [lr_factor(s, warmup_steps=4, total_steps=10) for s in range(5)] == [.25, .5, .75, 1, 1]
    cosine = [lr_factor(s, schedule="cosine", warmup_steps=2, total_steps=10) for s in range(10)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[6] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:])) and cosine[-1] > 0
    linear = [lr_factor(s, schedule="linear", total_steps=4) for s in range(4)]
    assert linear == [1.0, 0.75, 0.5, 0.25]
    assert [kl_weight(s, warmup_steps=4) for s in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0]
    assert kl_weight(3) == 1.0
    cyclical = [kl_weight(s, schedule="cyclical", cycle_steps=4, cycle_ramp=0.5) for s in range(8)]
    assert cyclical == [0.0, 0.5, 1.0, 1.0] * 2
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0, schedule="step")
    with pytest.raises(ValueError, match="kl_cycle_steps"):
        kl_weight(0, schedule="cyclical")


def test_metric_layout_matches_model_output_metrics():
    b = 5
    output = ModelOutput(torch.tensor(2.5), torch.rand(b), torch.rand(b),
                         {"tc": torch.rand(b), "layer_rates_bits": torch.rand(b, 3),
                          "grid": torch.rand(b, 2, 2)})
    layout = MetricLayout(output)
    unpacked = layout.unpack(layout.pack(output).tolist())
    expected = output.metrics()
    assert unpacked.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(unpacked[name], expected[name], rtol=1e-6)
    values = layout.pack(output).tolist()
    values[4] = math.inf  # the second entry of layer_rates_bits
    assert layout.nonfinite(values) == ["layer_rates_bits"]


# ---- fit: outputs --------------------------------------------------------------------------------

def test_fit_writes_config_metrics_and_a_loadable_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ToyVAE()
    result = fit(model, ToyImages(n=40), out_dir=tmp_path, steps=9, batch_size=8, lr=1e-2,
                 kl_warmup_steps=4, lr_schedule="cosine", eval_fraction=0.2, eval_every=4,
                 log_every=3, checkpoint_every=4, grad_clip=10.0, progress=True,
                 extra_config={"note": "hello"})
    assert result.step == 9 and result.epoch == pytest.approx(9 / 4)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] == model.config and config["note"] == "hello"
    assert config["train"]["steps"] == 9 and config["dataset"] == {"train_examples": 32,
                                                                    "eval_examples": 8}
    records = read_metrics(tmp_path)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [3, 6, 9]
    assert [r["step"] for r in evals] == [4, 8, 9]  # every 4 steps and at the end
    assert train[0]["kl_weight"] == pytest.approx(2 / 4) and train[1]["kl_weight"] == 1.0
    assert train[0]["lr"] == pytest.approx(1e-2 * lr_factor(2, schedule="cosine", total_steps=9))
    for record in train:
        assert {"epoch", "images_per_s", "loss", "distortion", "rate_bits", "dim_kl",
                "grad_norm"} <= record.keys()
        assert len(record["layer_rates_bits"]) == 2 and record["images_per_s"] > 0
    assert result.metrics["loss"] == train[-1]["loss"]
    assert result.eval_metrics["loss"] == evals[-1]["loss"] and evals[-1]["batches"] == 1

    assert result.checkpoint == tmp_path / "checkpoint" and (tmp_path / "checkpoint").is_symlink()
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["manifest.json", "model.json",
                                                           "model.safetensors", "state.pt"]
    assert len([p for p in os.listdir(tmp_path) if p.startswith(".checkpoint-")]) == 1
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (9, 2, 1)
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 9
    loaded = load_model(tmp_path)
    assert type(loaded) is ToyVAE and not loaded.training
    assert_same_parameters(parameters(loaded), parameters(model))
    assert load_checkpoint(tmp_path / "checkpoint")["step"] == 9


def test_fit_argument_errors(tmp_path):
    data = ToyImages(n=16)
    cases = [
        (dict(), "exactly one of steps and epochs"),
        (dict(steps=2, epochs=1), "exactly one of steps and epochs"),
        (dict(steps=0), "steps must be >= 1"),
        (dict(steps=2, batch_size=32), "training set is too small: .* fewer than one global"),
        (dict(steps=2, precision="fp8"), "precision must be one of"),
        (dict(steps=2, lr=0), "lr must be positive"),
        (dict(steps=2, optimizer="sgd"), "optimizer must be one of"),
        (dict(steps=2, lr_schedule="step"), "lr_schedule must be one of"),
        (dict(steps=2, kl_schedule="cyclical"), "needs kl_cycle_steps"),
        (dict(steps=2, eval_fraction=0.5, eval_dataset=data), "eval_dataset or eval_fraction"),
        (dict(steps=2, eval_fraction=0.1, batch_size=4), "evaluation set is too small"),
        (dict(steps=2, gather_global_batch=True), "no gather_global_batch attribute"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            fit(ToyVAE(), data, out_dir=tmp_path / "x", **{"batch_size": 4, **kwargs}, **QUIET)
    with pytest.raises(TypeError, match="BaseVAE"):
        fit(nn.Linear(2, 2), data, out_dir=tmp_path / "y", steps=1)


def test_worker_processes_do_not_change_the_run(tmp_path):
    runs = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = ToyVAE()
        fit(model, ToyImages(n=12, as_tuple=True), out_dir=tmp_path / str(workers), steps=7,
            batch_size=4, num_workers=workers, **QUIET)  # 3 steps per epoch: workers re-used
        runs.append(parameters(model))
    assert_same_parameters(*runs)


def test_gather_global_batch_is_set_on_the_model(tmp_path):
    model = ToyAE()
    model.gather_global_batch = False
    fit(model, ToyImages(n=8), out_dir=tmp_path, steps=1, batch_size=4, gather_global_batch=True,
        **QUIET)
    assert model.gather_global_batch is True


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision(tmp_path, precision):
    torch.manual_seed(0)
    model = ToyVAE()
    before = parameters(model)
    result = fit(model, ToyImages(n=16), out_dir=tmp_path, steps=4, batch_size=8, lr=1e-2,
                 precision=precision, **QUIET)
    assert math.isfinite(result.metrics["loss"])
    assert not torch.equal(before["enc.weight"], model.enc.weight)
    scaler = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)["scaler"]
    assert ("scale" in scaler) == (precision == "fp16")


# ---- checkpoints ---------------------------------------------------------------------------------

def test_shared_and_noncontiguous_tensors_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TiedAE()
    save_checkpoint(tmp_path, model, {"step": 3})
    loaded = load_model(tmp_path)
    assert loaded.dec.weight is loaded.enc.weight
    assert_same_parameters(parameters(loaded), parameters(model))


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = ToyAE()
    save_checkpoint(tmp_path, model, {"step": 2})
    saved = parameters(model)
    with torch.no_grad():
        model.enc.weight.add_(1.0)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model, {"step": 4})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["step"] == 2
    assert_same_parameters(parameters(load_model(tmp_path)), saved)
    assert len([p for p in os.listdir(tmp_path) if p.startswith(".checkpoint-")]) == 1


def test_a_copied_run_resumes(tmp_path):
    data = ToyImages(n=16)
    fit(ToyAE(), data, out_dir=tmp_path / "a", steps=4, stop_after=2, batch_size=4, **QUIET)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # follows the link: a real checkpoint/
    assert not (tmp_path / "b" / "checkpoint").is_symlink()
    for run in ("a", "b"):
        fit(ToyAE(), data, out_dir=tmp_path / run, steps=4, batch_size=4, resume=True, **QUIET)
    assert (tmp_path / "b" / "checkpoint").is_symlink()
    assert load_checkpoint(tmp_path / "b")["step"] == 4
    assert_same_parameters(parameters(load_model(tmp_path / "a")),
                           parameters(load_model(tmp_path / "b")))


def test_existing_checkpoint_needs_resume_and_the_same_model(tmp_path):
    fit(ToyVAE(), ToyImages(n=16), out_dir=tmp_path, steps=2, batch_size=4, **QUIET)
    run_files = {name: (tmp_path / name).read_text() for name in ("config.json", "metrics.jsonl")}
    with pytest.raises(FileExistsError, match="resume=True"):
        fit(ToyVAE(), ToyImages(n=16), out_dir=tmp_path, steps=4, batch_size=4, **QUIET)
    with pytest.raises(ValueError, match=r"different model \(latent_dim: checkpoint 2 != model 3"):
        fit(ToyVAE(latent_dim=3), ToyImages(n=16), out_dir=tmp_path, steps=4, batch_size=4,
            resume=True, **QUIET)
    with pytest.raises(ValueError, match="global_batch_size=4, this call has global_batch_size=8"):
        fit(ToyVAE(), ToyImages(n=16), out_dir=tmp_path, steps=4, batch_size=8, resume=True,
            **QUIET)
    with pytest.raises(ValueError, match="seed=0, this call has seed=1"):
        fit(ToyVAE(), ToyImages(n=16), out_dir=tmp_path, steps=4, batch_size=4, resume=True,
            seed=1, **QUIET)
    with pytest.raises(ValueError, match="optimizer='adamw', this call has optimizer='adagrad'"):
        fit(ToyVAE(), ToyImages(n=16), out_dir=tmp_path, steps=4, batch_size=4, resume=True,
            optimizer="adagrad", **QUIET)
    assert {name: (tmp_path / name).read_text() for name in run_files} == run_files
    assert load_checkpoint(tmp_path)["step"] == 2


# ---- exact resume --------------------------------------------------------------------------------

RESUME_RUN = dict(steps=11, batch_size=4, lr=1e-2, lr_schedule="cosine", lr_warmup_steps=2,
                  kl_schedule="cyclical", kl_cycle_steps=4, eval_fraction=0.25, eval_every=3,
                  eval_batches=1, **QUIET)


@pytest.mark.parametrize("optimizer", ["adamw", "adagrad"])
def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, optimizer):
    data = ToyImages(n=24)  # 18 training examples: 4 steps per epoch, 2 dropped
    run = dict(RESUME_RUN, optimizer=optimizer)
    torch.manual_seed(0)
    reference = ToyVAE()
    fit(reference, data, out_dir=tmp_path / "whole", **run)
    state = load_checkpoint(tmp_path / "whole")
    assert state["optimizer_name"] == optimizer
    # the state of the optimizer that actually ran: Adagrad's squared-gradient sums, or Adam's
    assert {"adagrad": "sum", "adamw": "exp_avg"}[optimizer] in state["optimizer"]["state"][0]
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["train"]["optimizer"] \
        == optimizer

    torch.manual_seed(0)
    first = fit(ToyVAE(), data, out_dir=tmp_path / "parts", stop_after=6, **run)
    assert first.step == 6
    torch.manual_seed(123)  # neither the initial weights nor the global RNG state matter
    resumed = ToyVAE()
    result = fit(resumed, data, out_dir=tmp_path / "parts", resume=True, **run)
    assert result.step == 11
    assert_same_parameters(parameters(resumed), parameters(reference))
    whole, parts = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "parts")
    steps = [(r["split"], r["step"]) for r in whole]
    assert steps == [(r["split"], r["step"]) for r in parts]
    assert steps.count(("eval", 9)) == 1 and ("eval", 11) in steps
    # the same losses, schedules and evaluations (whose noise does not touch training's RNG)
    for a, b in zip(whole, parts):
        assert {k: v for k, v in a.items() if k != "images_per_s"} == \
            {k: v for k, v in b.items() if k != "images_per_s"}
    # a third call has nothing left to do
    assert fit(ToyVAE(), data, out_dir=tmp_path / "parts", resume=True, **run).step == 11


def test_evaluation_does_not_change_training(tmp_path):
    data, held_out = split_dataset(ToyImages(n=24), 0.25)
    runs = []
    for eval_every in (None, 2):
        torch.manual_seed(0)
        model = ToyVAE()
        fit(model, data, eval_dataset=held_out if eval_every else None, eval_every=eval_every,
            out_dir=tmp_path / str(eval_every), steps=6, batch_size=4, **QUIET)
        runs.append(parameters(model))
    assert_same_parameters(*runs)
    evals = [r for r in read_metrics(tmp_path / "2") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6]


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
from test_train import KILL_RUN, ToyImages, ToyVAE
from pyvae.train import fit
torch.manual_seed(0)
model = ToyVAE()
loss = model.loss

def slow_loss(x, kl_weight=1.0):  # slow enough to be killed anywhere, and never done by itself
    time.sleep(600 if model.calls == 20 else 0.05)
    return loss(x, kl_weight)

model.loss = slow_loss
fit(model, ToyImages(n=24), out_dir=sys.argv[1], **KILL_RUN)
"""
KILL_RUN = dict(steps=30, batch_size=4, lr=1e-2, checkpoint_every=3, progress=False, log_every=1)


def kill_after_first_checkpoint(script, out) -> None:
    """Run the Python file ``script`` with argument ``out`` and SIGKILL it 0.2 s after
    ``out/checkpoint/state.pt`` appears (maybe while it writes the next checkpoint)."""
    process = subprocess.Popen([sys.executable, str(script), str(out)],
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoint" / "state.pt").exists():
            assert process.poll() is None, "the training script ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 60 s"
            time.sleep(0.01)
        time.sleep(0.2)  # let it run on, maybe into writing a checkpoint
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()


def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT.format(tests=TESTS_DIR))
    out = tmp_path / "killed"
    kill_after_first_checkpoint(script, out)
    killed_at = load_checkpoint(out)["step"]
    assert 3 <= killed_at <= 18 and killed_at % 3 == 0

    resumed = ToyVAE()
    fit(resumed, ToyImages(n=24), out_dir=out, resume=True, **KILL_RUN)
    torch.manual_seed(0)
    reference = ToyVAE()
    fit(reference, ToyImages(n=24), out_dir=tmp_path / "whole", **KILL_RUN)
    assert_same_parameters(parameters(resumed), parameters(reference))
    assert [r["step"] for r in train_records(out)] == list(range(1, 31))


# ---- divergence ----------------------------------------------------------------------------------

def test_nonfinite_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ToyVAE(nan_at_call=6)
    with pytest.raises(TrainingDiverged, match=r"at step 6: non-finite loss=nan, rate_bits=inf"
                       ) as error:
        fit(model, ToyImages(n=16), out_dir=tmp_path, steps=10, batch_size=4, checkpoint_every=4,
            progress=False, log_every=1)
    assert error.value.step == 6 and error.value.nonfinite == ["loss", "rate_bits"]
    assert error.value.checkpoint == tmp_path / "checkpoint"
    assert load_checkpoint(tmp_path)["step"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())  # step 6 was not applied
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2, 3, 4, 5]
    # the weights in memory are those after step 5: one more clean step from the checkpoint
    restarted = ToyVAE(nan_at_call=6)
    fit(restarted, ToyImages(n=16), out_dir=tmp_path, steps=10, stop_after=5, batch_size=4,
        resume=True, **QUIET)
    assert_same_parameters(parameters(restarted), parameters(model))


# ---- DistributedDataParallel ---------------------------------------------------------------------

DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from test_train import DDP_RUN, ToyAE, ToyImages
from pyvae.train import fit
torch.manual_seed(0)
fit(ToyAE(), ToyImages(n=48), out_dir=sys.argv[1], batch_size=4, stop_after=5, **DDP_RUN)
# a second process group, created and destroyed by fit again: resume to the end
fit(ToyAE(), ToyImages(n=48), out_dir=sys.argv[1], batch_size=4, resume=True, **DDP_RUN)
"""
DDP_RUN = dict(steps=9, lr=1e-2, lr_schedule="linear", kl_warmup_steps=3, eval_fraction=0.25,
               eval_every=4, progress=False, log_every=1, checkpoint_every=2)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_with_twice_the_batch(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=TESTS_DIR))
    status, output = run_torchrun(2, script, tmp_path / "ddp",
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert status == 0, output[-4000:]

    torch.manual_seed(0)
    single = ToyAE()
    fit(single, ToyImages(n=48), out_dir=tmp_path / "single", batch_size=8, **DDP_RUN)
    ddp = load_model(tmp_path / "ddp")
    for name, value in parameters(single).items():
        torch.testing.assert_close(parameters(ddp)[name], value, rtol=1e-5, atol=1e-6)
    assert load_checkpoint(tmp_path / "ddp")["world_size"] == 2
    ddp_log, single_log = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "single")
    assert [(r["split"], r["step"]) for r in ddp_log] == \
        [(r["split"], r["step"]) for r in single_log]
    for a, b in zip(ddp_log, single_log):  # global-batch means on both sides
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a.get("images_per_s", 1) > 0


# ---- the command line ----------------------------------------------------------------------------

def test_train_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--model", "--model-arg", "--data", "--data-arg", "--eval-data", "--out",
                 "--config", "--steps", "--epochs", "--stop-after", "--batch-size", "--lr",
                 "--weight-decay", "--betas", "--lr-schedule", "--lr-warmup-steps",
                 "--kl-schedule", "--kl-warmup-steps", "--kl-cycle-steps", "--kl-cycle-ramp",
                 "--grad-clip", "--precision", "--eval-fraction", "--eval-every",
                 "--eval-batches", "--log-every", "--checkpoint-every", "--resume", "--seed",
                 "--num-workers", "--device", "--no-progress", "--gather-global-batch"]:
        assert flag in text, flag
    assert "(default: 64)" in text and "dataset_size" in text


def test_train_usage_errors(capsys, tmp_path):
    assert main(["train", "--data", "x", "--out", str(tmp_path)]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["train", "--model", "ToyAE", "--data", "x", "--out", str(tmp_path),
                 "--model-arg", "latent_dim"]) == 2
    assert "--model-arg expects KEY=VALUE, got 'latent_dim'" in capsys.readouterr().err
    assert main(["train", "--model", "NoSuchModel", "--data", "x", "--out", str(tmp_path)]) == 2
    assert "unknown model 'NoSuchModel'" in capsys.readouterr().err
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"train": {"step": 3}}))
    assert main(["train", "--config", str(config), "--model", "ToyAE", "--data", "x",
                 "--out", str(tmp_path)]) == 2
    assert "unknown training options ['step']" in capsys.readouterr().err


def test_train_command_merges_config_flags_and_data(tmp_path, monkeypatch, capsys):
    import pyvae.cli
    loaded = []

    def fake_load_dataset(spec, options):
        loaded.append((spec, options))
        return ToyImages(n=options["size"], channels=2, size=3)

    monkeypatch.setattr(pyvae.cli, "_load_dataset", fake_load_dataset)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({
        "model": {"name": "ToyVAE", "latent_dim": 5},
        "data": {"spec": "toy", "size": 20},
        "train": {"epochs": 50, "batch_size": 4, "lr": 0.5, "log_every": 2,
                  "eval_fraction": 0.2}}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--model-arg", "latent_dim=3",
                 "--model-arg", "nan_at_call=1000", "--data-arg", "size=30", "--steps", "5", "--lr",
                 "1e-3", "--betas", "0.8", "0.9", "--no-progress", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert "pyvae train: step 5" in capsys.readouterr().out
    assert loaded == [("toy", {"size": 30})]
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"] == {"name": "ToyVAE", "latent_dim": 3, "channels": 2, "image_size": 3,
                              "nan_at_call": 1000}
    assert saved["data"] == {"spec": "toy", "size": 30}
    train = saved["train"]
    assert (train["steps"], train["epochs"], train["lr"], train["batch_size"]) == (5, None, 1e-3, 4)
    assert train["betas"] == [0.8, 0.9] and train["eval_fraction"] == 0.2
    assert saved["dataset"] == {"train_examples": 24, "eval_examples": 6}
    assert [r["step"] for r in train_records(out)] == [2, 4, 5]
    assert type(load_model(out)) is ToyVAE
    assert main(["train", "--config", str(config), "--out", str(out), "--no-progress"]) == 2
    assert "(on the command line: --resume)" in capsys.readouterr().err
    # --resume continues the run to a longer length given on the command line
    assert main(["train", "--config", str(config), "--model-arg", "latent_dim=3",
                 "--model-arg", "nan_at_call=1000", "--data-arg", "size=30", "--steps", "7",
                 "--no-progress", "--device", "cpu", "--out", str(out), "--resume"]) == 0
    assert load_checkpoint(out)["step"] == 7


@register
class SizedAE(ToyAE):
    """ToyAE that also takes the training-set size (as BetaTCVAE does)."""

    def __init__(self, latent_dim=3, channels=1, image_size=4, dataset_size=None):
        super().__init__(latent_dim, channels, image_size)
        self._remember(latent_dim=latent_dim, channels=channels, image_size=image_size,
                       dataset_size=dataset_size)


def test_train_command_with_pyvae_data(tmp_path, capsys):
    data = pytest.importorskip("pyvae.data", reason="pyvae.data is not written yet")
    if not hasattr(data, "load_dataset"):
        pytest.skip("pyvae.data.load_dataset does not exist yet")
    images = np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "images.npy", images)
    out = tmp_path / "run"
    assert main(["train", "--model", "SizedAE", "--data", str(tmp_path / "images.npy"),
                 "--out", str(out), "--steps", "3", "--batch-size", "8", "--eval-fraction",
                 "0.25", "--no-progress", "--device", "cpu"]) == 0
    dataset = data.load_dataset(str(tmp_path / "images.npy"))
    channels, height, width = dataset.image_shape
    config = load_model(out).config
    assert config["channels"] == channels and config["dataset_size"] == 30
    assert config["image_size"] == (height if height == width else [height, width])


# ---- TrainConfig ----------------------------------------------------------------------------------

def test_fit_takes_a_train_config_or_the_same_keywords(tmp_path):
    data = ToyImages(n=16)
    torch.manual_seed(0)
    by_keywords = ToyVAE()
    fit(by_keywords, data, out_dir=tmp_path / "keywords", steps=3, batch_size=4, lr=1e-2, **QUIET)
    torch.manual_seed(0)
    by_config = ToyVAE()
    config = TrainConfig(steps=3, batch_size=4, lr=1e-2, log_every=1, checkpoint_every=None)
    fit(by_config, data, config, out_dir=tmp_path / "config", progress=False)
    assert_same_parameters(parameters(by_config), parameters(by_keywords))
    saved = json.loads((tmp_path / "config" / "config.json").read_text())["train"]
    assert saved == json.loads((tmp_path / "keywords" / "config.json").read_text())["train"]
    assert TrainConfig.from_dict(saved) == config
    # keywords replace the config's fields
    fit(ToyVAE(), data, config, out_dir=tmp_path / "both", progress=False, steps=2)
    assert json.loads((tmp_path / "both" / "config.json").read_text())["train"]["steps"] == 2
    with pytest.raises(TypeError, match=r"unknown keyword arguments \['step'\]"):
        fit(ToyVAE(), data, out_dir=tmp_path / "typo", step=3)


def test_train_config_checks_every_field():
    assert TrainConfig(steps=5).betas == (0.9, 0.999)
    assert TrainConfig(epochs=2, betas=[0.5, 0.6]).betas == (0.5, 0.6)  # JSON lists accepted
    cases = [(dict(steps=2, batch_size=2.5), TypeError, "batch_size must be an int"),
             (dict(steps=2, seed=-1), ValueError, "seed must be >= 0"),
             (dict(steps=2, resume="yes"), TypeError, "resume must be a bool"),
             (dict(steps=2, betas=(0.9,)), ValueError, "betas must be two numbers"),
             (dict(steps=2, kl_cycle_ramp=0), ValueError, "kl_cycle_ramp"),
             (dict(steps=2, grad_clip=-1.0), ValueError, "grad_clip")]
    for values, error, message in cases:
        with pytest.raises(error, match=message):
            TrainConfig(**values)
    with pytest.raises(ValueError, match=r"unknown training settings \['lr_decay'\]"):
        TrainConfig.from_dict({"steps": 2, "lr_decay": 0.5})


def test_every_train_config_field_is_a_cli_flag():
    from pyvae.cli import add_train_parser
    train_parser = add_train_parser(argparse.ArgumentParser().add_subparsers())
    flags = {option: action for action in train_parser._actions
             for option in action.option_strings}
    for name in TrainConfig.field_names():
        assert flags["--" + name.replace("_", "-")].dest == name
    parsed = train_parser.parse_args(["--betas", "0.5", "0.6", "--resume", "--kl-cycle-steps", "7"])
    assert (parsed.betas, parsed.resume, parsed.kl_cycle_steps, parsed.lr) == ([0.5, 0.6], True,
                                                                              7, None)

"""Optimizers and learning-rate schedules (issue 29): each schedule against its closed form, the
history's lr column, gradient clipping, AdamW, a stopped-and-resumed run equal to the
uninterrupted one under every schedule, and a learning rate that stays a device tensor updated
in place (what a captured CUDA-graph step reads), checked on the meta device."""

import math

import pytest
import torch

from pvae.models import VAE
from pvae.train import (
    Adam,
    AdamW,
    Callback,
    CosineLR,
    ExponentialLR,
    ReduceLROnPlateau,
    StepLR,
    fit,
)

from conftest import rng


def lrs(schedule, steps_per_epoch, num_epochs, monitored=None):
    """The learning rate of every optimizer step, under the loop's calls to the scheduler."""
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer, scheduler = Adam(0.1, schedule=schedule).build(
        [p], steps_per_epoch=steps_per_epoch, num_epochs=num_epochs)
    out = []
    for epoch in range(num_epochs):
        for _ in range(steps_per_epoch):
            out.append(optimizer.param_groups[0]["lr"])
            p.grad = torch.ones(2)
            optimizer.step()
            scheduler.step_batch()
        scheduler.step_epoch(monitored[epoch] if monitored else 0.0)
    return out


def test_schedules_follow_their_closed_forms():
    assert lrs(ExponentialLR(0.5), 2, 3) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert lrs(StepLR(2, 0.1), 1, 5) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    # linear warm-up from 0.01 x lr over 4 steps, then cosine to min_lr at step 20
    got = lrs(CosineLR(warmup_steps=4, min_lr=0.001), 5, 4)
    total, warmup = 20, 4
    expected = [0.1 * (0.01 + 0.99 * t / warmup) for t in range(warmup)] + [
        0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2
        for t in range(warmup, total)]
    assert got == pytest.approx(expected, rel=1e-6)
    # plateau: the monitored value (higher is better) stalls after epoch 2; patience 1
    got = lrs(ReduceLROnPlateau(factor=0.5, patience=1), 1, 6, [1.0, 2.0, 2.0, 2.0, 2.0, 3.0])
    assert got == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05])


def test_gradient_clipping_and_adamw():
    """clip_norm scales the gradient to that norm before the step (an optimizer pre-step hook,
    so that a captured step clips inside the graph); AdamW decays the weights themselves."""
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer, _ = Adam(0.1, clip_norm=0.5).build([p])
    p.grad = torch.full((4,), 3.0)
    optimizer.step()
    assert p.grad.norm().item() == pytest.approx(0.5)
    w = torch.nn.Parameter(torch.ones(3))
    optimizer, _ = AdamW(0.1, weight_decay=0.5).build([w])
    w.grad = torch.zeros(3)
    optimizer.step()
    assert torch.allclose(w.detach(), torch.full((3,), 1 - 0.1 * 0.5))  # decay alone


class CrashAfter(Callback):
    """Raises in the epoch after ``epoch``: its checkpoint is the last one written."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, state, row):
        if row["epoch"] == self.epoch + 1:
            raise KeyboardInterrupt


@pytest.mark.parametrize("optim", [
    lambda: Adam(3e-3, schedule=CosineLR(warmup_steps=3)),
    lambda: Adam(3e-3, schedule=ReduceLROnPlateau(patience=0, factor=0.5)),
    lambda: AdamW(3e-3, schedule=StepLR(1, 0.7), clip_norm=1.0),
], ids=["cosine-warmup", "plateau", "adamw-step-clip"])
def test_a_stopped_and_resumed_run_equals_the_uninterrupted_one(tmp_path, optim):
    """4 epochs in one go against 2 epochs, a crash during the third, and a resume: the same
    history (lr column included) and weights; the schedule's state is in the checkpoint."""
    x = torch.bernoulli(torch.full((96, 12), 0.3), generator=rng(0))

    def run(folder, callbacks=(), resume=False):
        torch.manual_seed(0)
        model = VAE(12, 2, (8,))
        history = fit(model, x, val=x[:32], num_epochs=4, batch_size=32, optim=optim(),
                      checkpoint_dir=folder, resume=resume, callbacks=callbacks,
                      progress=False)
        return history, model

    full, full_model = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split", [CrashAfter(2)])
    resumed, resumed_model = run(tmp_path / "split", resume=True)
    for column in ("train_elbo", "val_elbo", "lr"):
        assert resumed.column(column) == full.column(column), column
    assert len(set(full.column("lr"))) > 1  # the schedule did move the learning rate
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:Detected call of")  # the scheduler alone, no optimizer step
@pytest.mark.parametrize("schedule", [ExponentialLR(0.9), StepLR(1), CosineLR(warmup_steps=2)],
                         ids=["exponential", "step", "cosine"])
def test_a_device_learning_rate_is_updated_in_place_without_host_syncs(schedule):
    """A captured step reads the learning rate from one device tensor: the schedulers update it
    in place and never read it on the host (the meta device refuses .item()). The same tensor
    learning rate on the CPU, where it can be read, takes the values of a float one under the
    same schedule after every epoch, and stays the same tensor."""
    from pvae.train import Scheduler

    def run(lr, device):
        p = torch.nn.Parameter(torch.zeros(3, device=device))
        optimizer = torch.optim.Adam([p], lr=torch.tensor(1e-2), capturable=True)
        optimizer.param_groups[0]["lr"] = lr
        scheduler = Scheduler(schedule.build(optimizer, 3, 4), schedule.interval)
        seen = []
        for _ in range(4):
            for _ in range(3):
                scheduler.step_batch()
            scheduler.step_epoch(0.0)
            assert optimizer.param_groups[0]["lr"] is lr
            seen.append(float(lr) if device == "cpu" else None)
        return seen

    lr = torch.tensor(1e-2, device="meta")
    run(lr, "meta")
    assert lr.device.type == "meta"
    on_cpu = run(torch.tensor(1e-2, dtype=torch.float64), "cpu")
    # the closed forms after epoch k = 1..4 (3k steps): 0.9^k, 0.1^k; cosine over 12 steps
    # after a 2-step linear warm-up
    expected = {ExponentialLR: lambda k: 0.9**k, StepLR: lambda k: 0.1**k,
                CosineLR: lambda k: (1 + math.cos(math.pi * (3 * k - 2) / 10)) / 2}
    assert on_cpu == pytest.approx([1e-2 * expected[type(schedule)](k) for k in range(1, 5)],
                                   rel=1e-6, abs=1e-15)


def test_bad_optimizer_settings_are_refused():
    with pytest.raises(ValueError, match="lr"):
        Adam(0.0)
    with pytest.raises(ValueError, match="clip_norm"):
        Adam(clip_norm=-1.0)
    with pytest.raises(TypeError, match="schedule must be one of"):
        Adam(schedule=torch.optim.lr_scheduler.ExponentialLR)
    with pytest.raises(ValueError, match="factor"):
        ReduceLROnPlateau(factor=1.0)

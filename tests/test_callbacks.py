"""Training people can watch and steer (issue 29): the history rewritten every epoch, early
stopping with patience and a minimum improvement (paused while beta warms up), the best
checkpoint, and the TensorBoard and MLflow loggers read back with their own readers."""

import csv
import math
import types

import pytest
import torch

from pvae.inference import LinearWarmup, ReparamELBO
from pvae.models import VAE
from pvae.train import (
    Adam,
    BestCheckpoint,
    Callback,
    EarlyStopping,
    HistoryCSV,
    fit,
    load_checkpoint,
)

from conftest import rng


def data(n=96, seed=0):
    return torch.bernoulli(torch.full((n, 12), 0.3), generator=rng(seed))


def train(num_epochs=4, callbacks=(), **kwargs):
    torch.manual_seed(0)
    return fit(VAE(12, 2, (8,)), data(), val=data(32, 1), num_epochs=num_epochs, batch_size=32,
               callbacks=callbacks, progress=False, **kwargs)


def stub(settled=True, name="elbo"):
    """What the callbacks read of the state: the objective's value name and settledness."""
    state = types.SimpleNamespace(objective=types.SimpleNamespace(
        value_name=name, settled=lambda: settled), distributed=False, reason=None)
    state.stop = lambda reason: setattr(state, "reason", reason)
    return state


def feed(callback, values, state=None, name="elbo"):
    """Epoch rows with the given validation values; the epoch after which it stopped."""
    state = state or stub(name=name)
    for epoch, value in enumerate(values, 1):
        callback.on_epoch_end(state, {"epoch": epoch, f"val_{name}": value,
                                      f"train_{name}": math.nan})
        if state.reason:
            return epoch, state.reason
    return None, None


def test_early_stopping_counts_epochs_without_an_improvement_larger_than_min_delta():
    assert feed(EarlyStopping(patience=2), [1.0, 2.0, 1.5, 1.9, 1.8])[0] == 4
    # min_delta 0.5: 2.3 is not enough better than 2.0, 2.6 is
    assert feed(EarlyStopping(patience=2, min_delta=0.5), [1.0, 2.0, 2.3, 2.6, 2.5])[0] is None
    assert feed(EarlyStopping(patience=2, min_delta=0.5), [1.0, 2.0, 2.3, 2.4])[0] == 4
    # a loss: lower is better
    epoch, reason = feed(EarlyStopping(patience=1), [3.0, 2.0, 2.5], name="loss")
    assert epoch == 3 and "val_loss has not improved" in reason and "best 2.0000 at epoch 2" \
        in reason
    # paused while the objective is not settled: nothing counts
    assert feed(EarlyStopping(patience=1), [1.0, 0.0, -1.0], stub(settled=False))[0] is None


def test_early_stopping_ends_fit_with_its_reason_in_the_history_and_csv(tmp_path):
    """Nothing counts as an improvement (min_delta huge): epoch 1 sets the best, epoch 2 is the
    first without improvement and patience 1 stops there; history.csv, rewritten every epoch,
    carries the reason; a resumed run is finished."""
    seen = []

    class ReadsTheCsv(Callback):  # runs after HistoryCSV: the file already has this epoch
        def on_epoch_end(self, state, row):
            with open(tmp_path / "history.csv") as f:
                seen.append(len(list(csv.DictReader(f))))

    callbacks = [EarlyStopping(patience=1, min_delta=1e6), HistoryCSV(tmp_path / "history.csv"),
                 ReadsTheCsv()]
    history = train(6, callbacks, checkpoint_dir=tmp_path)
    assert len(history) == 2 and seen == [1, 2]
    assert history.stop_reason.startswith("early stopping after epoch 2: val_elbo")
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["stopped"] == "" and rows[1]["stopped"] == history.stop_reason
    resumed = train(6, [EarlyStopping(patience=1, min_delta=1e6)], checkpoint_dir=tmp_path,
                    resume=True)
    assert len(resumed) == 2


def test_early_stopping_waits_for_the_kl_warmup():
    """beta warms up over all the run's 12 steps: never settled, never stopped."""
    history = train(4, [EarlyStopping(patience=1, min_delta=1e6)],
                    loss=ReparamELBO(beta=LinearWarmup(100)))
    assert len(history) == 4 and history.stop_reason is None


def test_early_stopping_starts_counting_at_the_first_settled_epoch():
    """beta warms up over the first 6 steps, 3 steps an epoch: after epochs 1 and 2 (steps 2
    and 5) it is still rising and nothing counts; epoch 3 (step 8) sets the best, and with
    nothing counting as an improvement (min_delta huge) patience 1 stops after epoch 4."""
    history = train(8, [EarlyStopping(patience=1, min_delta=1e6)],
                    loss=ReparamELBO(beta=LinearWarmup(6)))
    assert history.column("beta") == [2 / 6, 5 / 6, 1.0, 1.0]
    assert history.stop_reason.startswith("early stopping after epoch 4: val_elbo")
    assert "at epoch 3)" in history.stop_reason


def test_the_best_checkpoint_holds_the_best_epoch(tmp_path):
    history = train(5, [BestCheckpoint(tmp_path / "best.pt")], checkpoint_dir=tmp_path,
                    optim=Adam(0.05))
    val = history.column("val_elbo")
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 1 + max(range(len(val)), key=val.__getitem__)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 5


def test_tensorboard_event_files_hold_every_epochs_scalars(tmp_path):
    pytest.importorskip("tensorboard")  # an optional extra; make test installs it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pvae.loggers import TensorBoardLogger

    history = train(3, [TensorBoardLogger(tmp_path / "tb")])
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for name in ("train_elbo", "val_elbo", "lr", "beta", "images_per_s"):
        got = events.Scalars(name)
        assert [e.step for e in got] == history.column("epoch")
        assert [e.value for e in got] == pytest.approx(history.column(name), rel=1e-6)
    assert events.Tags()["images"] == ["training_curve"]


def test_mlflow_logs_every_epochs_scalars_to_a_local_store(tmp_path):
    pytest.importorskip("mlflow")  # an optional extra; make test installs it
    from mlflow.tracking import MlflowClient

    from pvae.loggers import MLflowLogger

    uri = f"file:{tmp_path / 'mlruns'}"
    logger = MLflowLogger(uri, run_name="test")
    history = train(3, [logger])
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pvae").experiment_id])
    for name in ("train_elbo", "val_elbo"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert [step for step, _ in got] == history.column("epoch")
        assert [value for _, value in got] == pytest.approx(history.column(name), rel=1e-6)
    assert run.data.params["training.batch_size"] == "32"
    assert run.info.status == "FINISHED"

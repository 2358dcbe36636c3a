"""Watching and steering a run from the command line (issue 29): history.csv and TensorBoard
every epoch, early stopping with best.pt, a resumed finished run, evaluate --checkpoint best,
optimizers and schedules recorded through fit's record, --config files (JSON, YAML, a run's
own config.json re-run exactly), help in groups and flags refused for models they do not
belong to."""

import csv
import json

import numpy as np
import pytest
import torch

from pvae.cli import main
from pvae.train import load_checkpoint

TINY = ["--dataset", "digits", "--latent-dim", "2", "--hidden-dims", "8", "--no-progress"]
#: The history columns that a seeded run reproduces (not the timings).
SEEDED = ("epoch", "train_elbo", "val_elbo", "beta", "lr", "stopped")


def rows(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def seeded(run):
    return [{k: row.get(k) for k in SEEDED} for row in rows(run)]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A digits run that early stopping ends: a large learning rate, patience 1, a cosine
    schedule with warm-up, a KL warm-up over the first 20 steps, and TensorBoard."""
    out = tmp_path_factory.mktemp("runs") / "stopped"
    main(["train", *TINY, "--num-epochs", "40", "--num-train", "600", "--num-val", "100",
          "--batch-size", "128", "--lr", "0.02", "--lr-schedule", "cosine", "--warmup-steps",
          "15", "--kl-warmup-steps", "20", "--early-stopping", "1", "--logger", "tensorboard",
          "--out", str(out)])
    return out


def test_early_stopping_keeps_the_best_epoch_and_says_why(stopped_run):
    history = rows(stopped_run)
    assert 2 <= len(history) < 40
    reason = history[-1]["stopped"]
    assert reason.startswith(f"early stopping after epoch {len(history)}: val_elbo has not "
                             "improved by more than 0 for 1 epochs")
    assert all(not row["stopped"] for row in history[:-1])
    state = load_checkpoint(stopped_run / "checkpoint.pt")
    assert state["stop_reason"] == reason and state["epoch"] == len(history)
    # the best epoch: the largest validation ELBO once beta is 1 (after 20 steps, 4 epochs of 5)
    settled = [row for row in history if float(row["beta"]) == 1.0]
    best = max(settled, key=lambda row: float(row["val_elbo"]))
    assert load_checkpoint(stopped_run / "best.pt")["epoch"] == int(best["epoch"])
    assert f"best {float(best['val_elbo']):.4f} at epoch {best['epoch']}" in reason
    config = json.loads((stopped_run / "config.json").read_text())
    assert config["early_stopping"] == {"patience": 1, "min_delta": 0.0}
    assert config["training"]["optim"]["schedule"] == {"name": "CosineLR", "warmup_steps": 15,
                                                        "min_lr": 0.0, "warmup_start": 0.01}


def test_tensorboard_holds_the_scalars_of_every_epoch(stopped_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(stopped_run / "tensorboard")).Reload()
    history = rows(stopped_run)
    for name in ("train_elbo", "val_elbo", "lr", "beta"):
        logged = events.Scalars(name)
        assert [e.step for e in logged] == [int(row["epoch"]) for row in history]
        assert [e.value for e in logged] == pytest.approx([float(r[name]) for r in history],
                                                          rel=1e-6)


def test_resuming_a_finished_run_says_so_in_one_line(stopped_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    capsys.readouterr()
    main(["train", "--config", str(run / "config.json"), "--num-epochs", "50", "--resume",
          "--out", str(run)])
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("pvae: the run is finished (early stopping after epoch") and \
        err.rstrip().endswith("nothing to train")
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == len(rows(stopped_run))


def test_evaluate_the_best_and_the_last_checkpoint(stopped_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    for which in ("best", "last"):
        main(["evaluate", str(run), "--checkpoint", which, "--num-samples", "0",
              "--tsne-points", "200"])
    best = json.loads((run / "metrics_best.json").read_text())
    last = json.loads((run / "metrics.json").read_text())
    assert (best["checkpoint"], last["checkpoint"]) == ("best", "last")
    assert best["epochs"] == load_checkpoint(run / "best.pt")["epoch"] < last["epochs"]
    for folder in ("figures", "figures_best"):
        assert (run / folder / "latent_embedding.png").stat().st_size > 5000


def test_a_runs_config_json_reruns_its_seeded_history_exactly(stopped_run, tmp_path):
    """pvae train --config runs/X/config.json --out runs/Y: the same record (loss, optimizer,
    schedule, early stopping, data) and the same history, epoch by epoch."""
    again = tmp_path / "again"
    main(["train", "--config", str(stopped_run / "config.json"), "--out", str(again),
          "--no-progress"])
    assert json.loads((again / "config.json").read_text()) == \
        json.loads((stopped_run / "config.json").read_text())
    assert seeded(again) == seeded(stopped_run)


@pytest.mark.parametrize("flags", [
    ["--model", "vae", "--estimator", "iwae", "--num-particles", "3", "--gradient", "dreg",
     "--kl-cycle-steps", "7", "--beta", "0.5", "--network", "conv", "--guide", "full",
     "--optimizer", "adamw", "--lr-schedule", "step", "--lr-step-size", "2", "--lr-decay",
     "0.5", "--clip-norm", "5", "--binarize", "static"],
    ["--model", "cvae", "--condition", "top-half", "--prior", "learned", "--estimator", "score",
     "--baseline", "average", "--lr-schedule", "plateau", "--plateau-patience", "1",
     "--min-lr", "1e-5", "--weight-decay", "0.001"],
    ["--model", "hvae", "--latent-dims", "4", "2", "--estimator", "vimco", "--activation",
     "relu", "--lr-schedule", "exponential", "--lr-decay", "0.9", "--early-stopping", "2",
     "--min-delta", "0.1"],
    ["--model", "ae", "--sparsity", "kl", "--code-activation", "sigmoid", "--corruption",
     "mask", "--loss", "bce", "--lr-schedule", "constant"],
    ["--model", "linear-ae", "--latent-dim", "3", "--contractive", "0.1"],
    ["--model", "mae", "--patch-size", "4", "--mask-ratio", "0.5", "--latent-dim", "8"],
], ids=["vae", "cvae", "hvae", "ae", "linear-ae", "mae"])
def test_every_record_maps_back_to_its_flags(tmp_path, flags):
    """A record of each model family, its loss and optimizer (written when fit starts: no
    epoch is needed) is a --config that rebuilds the same record."""
    flags = list(flags)
    if "--latent-dims" not in flags and "--latent-dim" not in flags:
        flags += ["--latent-dim", "2"]
    if flags[1] in ("vae", "cvae", "hvae", "ae"):
        flags += ["--hidden-dims", *(["8", "4"] if flags[1] == "hvae" else ["8"])]
    base = ["train", "--dataset", "digits", "--num-epochs", "0", "--no-progress", "--seed", "3"]
    main([*base, *flags, "--out", str(tmp_path / "a")])
    main(["train", "--config", str(tmp_path / "a" / "config.json"), "--out",
          str(tmp_path / "b")])
    first = json.loads((tmp_path / "a" / "config.json").read_text())
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == first


def test_a_flags_file_in_yaml_or_json_is_overridden_by_the_command_line(tmp_path):
    (tmp_path / "flags.yaml").write_text(
        "dataset: digits\nlatent-dim: 3\nhidden_dims: [8]\nnum_epochs: 0\nlr: 0.01\n"
        "lr_schedule: cosine\nwarmup_steps: 5\nanalytic_kl: true\nlogger: tensorboard\n")
    main(["train", "--config", str(tmp_path / "flags.yaml"), "--latent-dim", "2",
          "--no-analytic-kl", "--out", str(tmp_path / "yaml")])
    config = json.loads((tmp_path / "yaml" / "config.json").read_text())
    assert config["model_config"]["latent_dim"] == 2  # the command line wins
    assert config["model_config"]["hidden_dims"] == [8]
    assert config["training"]["loss"]["analytic_kl"] is False
    assert config["training"]["optim"]["lr"] == 0.01
    assert config["training"]["optim"]["schedule"]["warmup_steps"] == 5
    (tmp_path / "flags.json").write_text(json.dumps({"dataset": "digits", "num_epochs": 0,
                                                     "latent_dim": 2, "hidden_dims": 8}))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((20, 6), dtype=np.float32))
    main(["train", "--config", str(tmp_path / "flags.json"), "--data-file",
          str(tmp_path / "x.npy"), "--out", str(tmp_path / "json")])
    config = json.loads((tmp_path / "json" / "config.json").read_text())
    assert config["dataset"] == "data-file"  # the command line's data replace the file's


def test_optimizer_and_schedule_flags_go_through_fits_record(tmp_path):
    out = tmp_path / "run"
    main(["train", *TINY, "--num-epochs", "3", "--num-train", "200", "--num-val", "0",
          "--batch-size", "100", "--optimizer", "adamw", "--lr", "0.004", "--lr-schedule",
          "step", "--lr-step-size", "2", "--lr-decay", "0.25", "--clip-norm", "3",
          "--out", str(out)])
    optim = json.loads((out / "config.json").read_text())["training"]["optim"]
    assert optim == {"name": "AdamW", "lr": 0.004, "clip_norm": 3.0, "weight_decay": 0.01,
                     "schedule": {"name": "StepLR", "step_size": 2, "gamma": 0.25}}
    # the learning rate of epoch e (the history's lr: while it trained) is 0.004 * 0.25 ** ((e-1) // 2)
    assert [float(r["lr"]) for r in rows(out)] == pytest.approx([0.004, 0.004, 0.001])
    assert not (out / "best.pt").exists()  # no validation data: nothing to call best


def test_help_shows_the_flags_in_groups(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0  # help is not an error
    text = capsys.readouterr().out
    groups = ["data:", "model:", "objective:", "optimization:", "run:"]
    at = [text.index(f"\n{g}\n") for g in groups]
    assert at == sorted(at)
    section = lambda flag: max(g for g in at if g < text.index(f"  {flag}"))  # noqa: E731
    assert section("--data-file") == section("--image-size") == at[0]
    assert section("--likelihood ") == section("--code-activation") == at[1]
    assert section("--estimator") == section("--sparsity ") == at[2]
    assert section("--lr-schedule") == section("--early-stopping") == at[3]
    assert section("--config") == section("--logger") == at[4]


def test_an_unknown_flag_is_named_once_with_one_prefix(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", "x", "--latent-dimm", "3"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "pvae: unrecognized arguments: --latent-dimm 3\n"


def test_the_trained_model_is_what_the_flags_say(tmp_path):
    """--weight-decay and --clip-norm reach torch's optimizer (read back from the
    checkpoint's optimizer state)."""
    out = tmp_path / "run"
    main(["train", *TINY, "--num-epochs", "1", "--num-train", "100", "--num-val", "20",
          "--weight-decay", "0.05", "--out", str(out)])
    groups = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert all(g["weight_decay"] == 0.05 for g in groups)

"""Versioned runs (issue 29): config.json and every checkpoint record the run format and the
pvae, torch and Pyro versions; a run of another format is refused with the version that wrote
it; versions are never compared as settings. ``tests/fixtures/run-format-N`` is a run folder of
each format N, made by

    pvae train --dataset digits --latent-dim 2 --hidden-dims 8 --num-epochs 2 --num-train 200 \\
        --num-val 50 --batch-size 100 --no-progress --out tests/fixtures/run-format-N

(``figures/`` and ``.lock`` removed): raising :data:`pvae.versions.FORMAT` without adding the
new format's folder fails these tests."""

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest
import torch

import pvae
from pvae.cli import main
from pvae.runs import load_run
from pvae.train import load_checkpoint
from pvae.versions import FORMAT, FormatError, versions

FIXTURES = Path(__file__).parent / "fixtures"
CURRENT = FIXTURES / f"run-format-{FORMAT}"


@pytest.fixture
def run(tmp_path):
    """A copy of the current format's fixture (evaluation writes into the folder)."""
    shutil.copytree(CURRENT, tmp_path / "run")
    return tmp_path / "run"


def test_versions_come_from_the_installed_metadata():
    found = versions()
    assert found["pvae"] == pvae.__version__
    assert found["torch"] == importlib.metadata.version("torch")
    assert found["pyro"] == importlib.metadata.version("pyro-ppl")


def test_the_fixture_of_the_current_format_loads_and_evaluates(run, capsys):
    """The small digits run kept in the repository: its config, both checkpoints and an
    evaluation; a change of run layout that breaks it must raise FORMAT and add a fixture."""
    config = json.loads((run / "config.json").read_text())
    assert config["format"] == FORMAT and set(config["versions"]) == {"pvae", "torch", "pyro"}
    model, loaded, state = pvae.load_run(run, device="cpu")
    assert loaded == config and state["epoch"] == 2 and state["format"] == FORMAT
    best, _, best_state = load_run(run, device="cpu", checkpoint="best")
    assert 1 <= best_state["epoch"] <= 2
    assert type(best) is type(model) and best.latent_dim == 2
    main(["evaluate", str(run), "--num-samples", "20", "--iw-num-test", "50", "--tsne-points",
          "0"])
    metrics = json.loads((run / "metrics.json").read_text())
    # 64 binary pixels after two short epochs: better than chance (-64 log 2 = -44.4), finite
    assert -64 < metrics["test_elbo"] < 0 and metrics["iw_log_likelihood"] > metrics["test_elbo"]
    assert (run / "figures" / "latent_embedding.png").stat().st_size > 1000


def test_older_fixtures_are_refused_naming_the_version_that_wrote_them():
    for folder in sorted(FIXTURES.glob("run-format-*")):
        if folder != CURRENT:
            with pytest.raises(FormatError, match=r"written by pvae .* in run format"):
                load_run(folder, device="cpu")


@pytest.mark.parametrize("where", ["config", "checkpoint"])
def test_another_format_is_refused_with_the_version_that_wrote_it(run, where, capsys):
    if where == "config":
        config = json.loads((run / "config.json").read_text())
        config.update(format=FORMAT + 1, versions={**config["versions"], "pvae": "9.9.9"})
        (run / "config.json").write_text(json.dumps(config))
    else:
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        state.update(format=FORMAT + 1, versions={"pvae": "9.9.9"})
        torch.save(state, run / "checkpoint.pt")
        with pytest.raises(FormatError, match="9.9.9"):
            load_checkpoint(run / "checkpoint.pt")
    with pytest.raises(SystemExit) as refused:
        main(["evaluate", str(run), "--num-samples", "0"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.count("\n") == 1
    assert f"was written by pvae 9.9.9 in run format {FORMAT + 1}" in err
    assert f"reads format {FORMAT}" in err


def test_versions_are_never_compared_but_the_format_is(run):
    """Another torch or pvae version resumes and evaluates a run of the same format: versions
    are left out of the settings comparison (config.json against the checkpoint, and a resume
    against the checkpoint)."""
    config = json.loads((run / "config.json").read_text())
    config["versions"] = {"pvae": "0.0.1", "torch": "1.0", "pyro": "0.1"}
    (run / "config.json").write_text(json.dumps(config))
    load_run(run, device="cpu")
    main(["train", "--config", str(run / "config.json"), "--out", str(run), "--resume",
          "--num-epochs", "3", "--no-progress"])
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 3 and state["versions"] == versions()
    assert state["config"]["versions"] == versions()  # the run's record: the code that wrote it


def test_every_checkpoint_records_its_format_and_versions(tmp_path):
    from pvae.models import VAE
    from pvae.train import fit

    fit(VAE(12, 2, (8,)), torch.rand(16, 12).bernoulli(), num_epochs=1, progress=False,
        checkpoint_dir=tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["format"] == FORMAT and state["versions"] == versions()

"""The bad-input catalogue (``tests/bad_inputs.py``): every case fails with the expected error
whose message names what is wrong; on the command line as one ``pvae: ...`` line with the
documented exit code (2: bad usage or input)."""

import re
from pathlib import Path

import pytest
from bad_inputs import cases

IDS = [case[0] for case in cases(Path("unused"))]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("bad-inputs")


def test_catalogue_size():
    assert len(IDS) >= 125 and len(set(IDS)) == len(IDS)
    families = {case[1] for case in cases(Path("unused"))}
    assert {"concurrency", "filesystem", "signals", "hostile-files", "api"} <= families


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case_id", IDS)
def test_bad_input(case_id, scratch):
    case = {c[0]: c for c in cases(scratch)}[case_id]
    _, category, call, expected, pattern, *after = case
    if expected is None:  # a fault handled without an error
        call()
    elif isinstance(expected, int):  # the command line: exit code and one line
        code, err = call()
        assert code == expected, err
        assert err.startswith("pvae: ") and err.strip().count("\n") == 0, err
        assert re.search(pattern, err), err
    else:
        with pytest.raises(expected, match=pattern):
            call()
    for check in after:  # nothing lost, nothing written where it must not be
        check()


def test_numpy_integers_are_sizes():
    import numpy as np
    import torch

    from pvae.models import VAE
    from pvae.train import fit

    model = VAE(np.int64(12), np.int64(2), (np.int32(8),))
    x = torch.bernoulli(torch.full((32, 12), 0.5))
    history = fit(model, x, num_epochs=np.int64(1), batch_size=np.int64(16), progress=False)
    assert len(history) == 1 and model.config["x_dim"] == 12 and type(model.config["x_dim"]) is int


def test_failed_start_does_not_block_the_retry(tmp_path, capsys):
    """A folder holds a run only once a checkpoint exists: a start that failed before it (here
    a CUDA graph asked for on a CPU) leaves no checkpoint, and the corrected retry goes
    through."""
    from pvae.cli import main

    out = str(tmp_path / "run")
    argv = ["train", "--dataset", "digits", "--latent-dim", "2", "--hidden-dims", "8",
            "--num-epochs", "1", "--num-val", "20", "--no-progress", "--out", out,
            "--device", "cpu"]
    with pytest.raises(SystemExit) as failed:
        main([*argv, "--cuda-graph", "on"])
    assert failed.value.code == 2 and "cuda_graph" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    main(argv)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_checkpoint_write_survives_ctrl_c_and_clears_stale_temp_files(tmp_path, monkeypatch):
    """Ctrl-C during torch.save takes effect after the file is complete; temporary files left
    by earlier killed saves are removed when the folder's lock is taken (nobody else can be
    writing them then)."""
    import os
    import signal

    import torch

    from pvae.files import folder_lock
    from pvae.train import checkpoint

    (tmp_path / ".checkpoint.pt.abc12345.tmp").write_bytes(b"left by a killed save")
    real_save = torch.save

    def interrupted_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the write
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", interrupted_save)
    # Python's own Ctrl-C handler, whatever an earlier test in this worker process left
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), folder_lock(tmp_path):
            checkpoint.save_checkpoint(tmp_path / "checkpoint.pt",
                                       {"model": {"w": torch.ones(3)}})
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    state = checkpoint.load_checkpoint(tmp_path / "checkpoint.pt")
    assert torch.equal(state["model"]["w"], torch.ones(3))
    assert not list(tmp_path.glob(".*.tmp"))


def test_lock_removes_only_temporary_files(tmp_path):
    """Taking a folder's lock removes what killed writers left (``.<name>.<8>.tmp`` and the
    fixed names of earlier versions), never other files that end in .tmp."""
    from pvae.files import folder_lock

    stale = [".checkpoint.pt.k_2x9q0z.tmp", ".metrics.json.0a1b2c3d.tmp", ".config.json.tmp",
             "history.csv.tmp"]
    kept = [".notes.tmp", "data.tmp", ".x.tmp.bak"]
    (tmp_path / "figures").mkdir()
    for name in [*stale, *kept]:
        (tmp_path / name).write_text("x")
    (tmp_path / "figures" / ".samples.png.0a1b2c3d.tmp").write_text("x")
    with folder_lock(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, ".lock", "figures"])
    assert not list((tmp_path / "figures").iterdir())

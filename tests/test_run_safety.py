"""Run folders that are safe to share and to write (issue 28), on real files, processes and
signals: atomic writes that never follow a link, one writer per run (a lock), temporary files
removed only when no live writer holds them, folders lost while written, a full or read-only
file system (a small tmpfs where root may mount one), SIGTERM and SIGKILL, inputs bounded by
their headers. The catalogue (``tests/bad_inputs.py``) holds the one-call cases; these need
several processes or a mount.
"""

import contextlib
import fcntl
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from bad_inputs import cli, digits_run

from pvae import data
from pvae.files import (
    FolderInUseError,
    UnsafeFolderError,
    check_folder,
    folder_lock,
    write_bytes,
)
from pvae.models import VAE
from pvae.runs import load_run
from pvae.train import Adam, fit

TRAIN = ["train", "--dataset", "digits", "--latent-dim", "2", "--hidden-dims", "8",
         "--num-val", "20", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained 1-epoch digits run, shared by the tests that only read it."""
    return digits_run(tmp_path_factory.mktemp("safety"))


def _pvae(*argv, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pvae.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def _lock_is_free(folder: Path) -> bool:
    fd = os.open(folder / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` mounted at ``folder`` for the block; the test is skipped where this
    process may not mount one (not root, or no mount namespace rights)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# ---------------------------------------------------------------------------------------------
# writes: atomic, never through a link


def test_a_link_at_the_target_is_replaced_not_written_through(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "metrics.json").symlink_to(outside)
    write_bytes(folder / "metrics.json", b"{}")
    assert outside.read_text() == "precious"
    assert not (folder / "metrics.json").is_symlink()
    assert (folder / "metrics.json").read_bytes() == b"{}"
    assert not list(folder.glob(".*.tmp"))


def test_links_that_stay_inside_the_run_are_allowed(tmp_path):
    shutil.copytree(digits_run(tmp_path), tmp_path / "copy")
    (tmp_path / "copy" / "latest.pt").symlink_to("checkpoint.pt")
    check_folder(tmp_path / "copy")
    load_run(tmp_path / "copy", device="cpu")
    (tmp_path / "copy" / "figures" / "up").symlink_to("../..")
    with pytest.raises(UnsafeFolderError, match="figures/up is a symbolic link"):
        check_folder(tmp_path / "copy")


def test_files_keep_the_umask_permissions(tmp_path):
    write_bytes(tmp_path / "x", b"1")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# one writer per run


def test_lock_is_reentrant_names_the_holder_and_is_released(tmp_path):
    folder = tmp_path / "run"
    with folder_lock(folder, create=True), folder_lock(folder):
        assert (folder / ".lock").read_text().strip() == str(os.getpid())
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from pvae.files import folder_lock\n"
             "with folder_lock(sys.argv[1]): pass", str(folder)], capture_output=True, text=True)
        assert other.returncode != 0
        assert f"in use by process {os.getpid()}" in other.stderr
    assert not folder.exists()  # created for the block and left empty: removed again
    folder.mkdir()
    with folder_lock(folder):
        (folder / "kept").write_text("1")
    assert _lock_is_free(folder) and (folder / "kept").exists()


def test_threads_of_one_process_share_the_lock_until_the_last_lets_go(tmp_path):
    import threading

    entered, leave_first = threading.Barrier(3), threading.Event()

    def hold(wait):
        with folder_lock(tmp_path):
            entered.wait()
            wait()

    first = threading.Thread(target=hold, args=(leave_first.wait,))
    second = threading.Thread(target=hold, args=(lambda: time.sleep(0.5),))
    first.start()
    second.start()
    entered.wait()
    leave_first.set()
    first.join()
    assert not _lock_is_free(tmp_path)  # the second thread still holds it
    second.join()
    assert _lock_is_free(tmp_path)


def test_stale_temp_files_go_only_when_no_live_writer_holds_them(tmp_path):
    """With another process holding the lock, its temporary file survives a second writer's
    attempt; once it is gone (killed), the next writer removes what it left."""
    folder = tmp_path / "run"
    folder.mkdir()
    code = ("import os, sys, time\nfrom pvae.files import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n"
            "    open(os.path.join(sys.argv[1], '.checkpoint.pt.abcd1234.tmp'), 'w').write('x')\n"
            "    print('writing', flush=True)\n    time.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "writing"
        with pytest.raises(FolderInUseError, match=f"in use by process {holder.pid}"):
            with folder_lock(folder):
                pass
        assert (folder / ".checkpoint.pt.abcd1234.tmp").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    with folder_lock(folder):
        assert not list(folder.glob(".*.tmp"))


def test_readers_are_not_blocked(run):
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        model, config, state = load_run(run, device="cpu")
        assert state["epoch"] == 1
    finally:
        holder.terminate()
        holder.communicate()


def test_two_trains_on_one_out_one_wins_and_the_run_stays_whole(tmp_path):
    """Two ``pvae train`` started together on one --out: one trains, the other is refused
    (in use, or the run exists once the first is done); config.json and the checkpoint agree."""
    out = tmp_path / "run"
    procs = [_pvae(*TRAIN, "--num-epochs", "3", "--out", str(out)) for _ in range(2)]
    results = [(p.communicate(timeout=300)[1], p.returncode)[::-1] for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "is in use by process" in refused or "already holds a run" in refused, refused
    _, config, state = load_run(out, device="cpu")
    assert state["epoch"] == 3 and config["training"]["num_epochs"] == 3
    assert not list(out.glob(".*.tmp"))


def test_fit_into_a_run_needs_resume(tmp_path):
    x = torch.bernoulli(torch.full((32, 12), 0.5))
    fit(VAE(12, 2, (8,)), x, num_epochs=1, checkpoint_dir=tmp_path, progress=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds a run's checkpoint"):
        fit(VAE(12, 2, (8,)), x, num_epochs=2, checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    history = fit(VAE(12, 2, (8,)), x, num_epochs=2, checkpoint_dir=tmp_path, resume=True,
                  progress=False)
    assert len(history) == 2


# ---------------------------------------------------------------------------------------------
# the file system: full, read-only, a folder lost


def test_full_disk_names_the_last_good_checkpoint(tmp_path):
    """On a 250 kB tmpfs the first checkpoint (~140 kB) fits, the second (written beside it
    before the rename) does not: one line, exit 1, and the first checkpoint is whole (no
    validation data, so no best.pt takes the room)."""
    with tmpfs(tmp_path / "small", "250k") as small:
        out = small / "run"
        code, err = cli(["train", "--dataset", "digits", "--latent-dim", "4", "--hidden-dims",
                         "64", "--num-epochs", "5", "--num-val", "0", "--no-progress",
                         "--device", "cpu", "--out", str(out)])
        assert code == 1, err
        assert err.count("\n") == 1 and err.startswith(f"pvae: cannot write {out}/checkpoint.pt: "
                                                       "No space left on device; the last good "
                                                       "checkpoint is epoch 1"), err
        assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
        assert not list(out.glob(".*.tmp"))


def test_read_only_run_is_read_but_not_evaluated_into(tmp_path, run):
    with tmpfs(tmp_path / "ro", "2m") as mount:
        shutil.copytree(run, mount / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        load_run(mount / "run", device="cpu")  # a reader
        code, err = cli(["evaluate", str(mount / "run"), "--num-samples", "0"])
        assert code == 1 and err.count("\n") == 1, err
        assert "Read-only file system" in err and "copy the run somewhere writable" in err, err


def test_a_run_whose_folder_is_deleted_stops_at_the_next_save(tmp_path):
    """The folder deleted while ``pvae train`` runs: exit 1 with one line naming what
    happened, and the folder is not recreated (it used to come back without config.json)."""
    out = tmp_path / "run"
    proc = _pvae(*TRAIN, "--num-epochs", "100000", "--out", str(out))
    _wait_for(out / "checkpoint.pt", proc)
    for _ in range(50):  # a save may be creating its temporary file meanwhile
        shutil.rmtree(out, ignore_errors=True)
        if not out.exists():
            break
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1 and err.count("\n") == 1, err
    assert "was deleted or moved away while this process was writing it" in err, err
    assert not out.exists()


def test_a_run_that_lost_its_config_is_repaired_or_resumed(tmp_path):
    """The checkpoint holds the run's one settings record: `pvae repair` rebuilds config.json
    from it, and `--resume` (checked against the checkpoint) writes it again anyway."""
    out = tmp_path / "run"
    assert cli([*TRAIN, "--num-epochs", "1", "--out", str(out)])[0] == 0
    written = json.loads((out / "config.json").read_text())
    (out / "config.json").unlink()
    assert cli(["evaluate", str(out), "--num-samples", "0"])[0] == 2  # names `pvae repair`
    assert cli(["repair", str(out)]) == (0, "")
    assert json.loads((out / "config.json").read_text()) == written
    (out / "config.json").unlink()
    code, err = cli([*TRAIN, "--num-epochs", "2", "--resume", "--out", str(out)])
    assert code == 0, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert json.loads((out / "config.json").read_text())["training"]["num_epochs"] == 2


# ---------------------------------------------------------------------------------------------
# signals


def test_sigterm_ends_training_in_one_line_and_leaves_a_whole_run(tmp_path):
    out = tmp_path / "run"
    proc = _pvae(*TRAIN, "--num-epochs", "100000", "--out", str(out))
    _wait_for(out / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and err.count("\n") == 1, err
    assert err.startswith("pvae: terminated (SIGTERM); the last checkpoint (epoch "), err
    assert err.strip().endswith("is intact: continue with --resume"), err
    epoch = int(err.split("(epoch ")[1].split(")")[0])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == epoch
    assert not list(out.glob(".*.tmp")) and _lock_is_free(out)


# ---------------------------------------------------------------------------------------------
# inputs bounded by their headers


def test_gzip_bomb_is_refused_in_bounded_memory(tmp_path):
    """A 64 MB-of-zeros gzip file behind a header that announces 7,840 bytes: refused after
    reading at most those (and one more), with Python allocating under 1 MB."""
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (10, 28, 28)))
        for _ in range(64):
            f.write(bytes(1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(data.IDXError, match="more than 7856 bytes"):
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_config_asking_for_a_huge_model_is_refused_before_it_is_built(tmp_path, run):
    """config.json and the checkpoint's settings both say hidden_dims [20000, 20000] (3.2 GB
    of weights) beside a 45 kB checkpoint: refused from the shapes alone, in a process whose
    peak memory stays far below what building the model would take."""
    shutil.copytree(run, tmp_path / "huge")
    config = json.loads((tmp_path / "huge" / "config.json").read_text())
    config["model_config"]["hidden_dims"] = [20000, 20000]
    (tmp_path / "huge" / "config.json").write_text(json.dumps(config))
    state = torch.load(tmp_path / "huge" / "checkpoint.pt", weights_only=True)
    state["config"]["model_config"]["hidden_dims"] = [20000, 20000]
    torch.save(state, tmp_path / "huge" / "checkpoint.pt")
    code = ("import resource, sys\nfrom pvae.runs import load_run\nfrom pvae.train import "
            "CheckpointError\ntry:\n    load_run(sys.argv[1], device='cpu')\n"
            "except CheckpointError as e:\n    print(e)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "huge")],
                          capture_output=True, text=True, timeout=300)
    message, maxrss_kb = done.stdout.strip().rsplit("\n", 1)
    assert "does not fit the model" in message and "(20000, 64) in the model" in message
    assert int(maxrss_kb) * 1024 < 1.5 * 2**30, maxrss_kb  # the model alone is 3.2 GB


# ---------------------------------------------------------------------------------------------
# the API: a second fit on the same model


def test_a_second_fit_continues_from_the_weights_with_a_fresh_optimizer():
    """``fit`` trains the model it is given from its current weights: a second call continues
    from where the first left the weights, with a new Adam (no moments), a new schedule and
    the RNGs seeded from ``seed``; so it equals a first ``fit`` of a model holding those
    weights."""
    x = torch.bernoulli(torch.full((64, 12), 0.3), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = VAE(12, 2, (8,))
    fit(model, x, num_epochs=2, batch_size=16, optim=Adam(1e-2), progress=False)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    second = fit(model, x, num_epochs=1, batch_size=16, optim=Adam(1e-2), seed=5, progress=False)
    fresh = VAE(12, 2, (8,))
    fresh.load_state_dict(trained)
    first = fit(fresh, x, num_epochs=1, batch_size=16, optim=Adam(1e-2), seed=5, progress=False)
    assert second.rows[0]["train_elbo"] == first.rows[0]["train_elbo"]
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(trained["encoder.trunk.0.weight"],
                           model.state_dict()["encoder.trunk.0.weight"])

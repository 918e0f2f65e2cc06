"""What a run guarantees (docs/robustness.md): locking, resume rules, up-front checks, signals,
corrupt checkpoints, evaluation inputs, CLI errors, and fault injection (kill / interrupt / resume).

Small runs of ``configs/distorted_mnist.py:r,fcn,tiny`` on a synthetic MNIST folder (gzip IDX files
written by this module), in-process where possible and as ``python -m experiments.*`` subprocesses
where the property is about the command line or about a process dying.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from configs import distorted_mnist  # noqa: E402
from experiments import cli  # noqa: E402
from stn_jax.paper import checkpoints, evaluation, train, workdir as workdir_lib  # noqa: E402
from stn_jax.paper.config import resolve  # noqa: E402
from stn_jax.paper.data import balanced_order  # noqa: E402
from stn_jax.paper.data.files import CacheBuildInterrupted  # noqa: E402
from stn_jax.paper.data.npz import load_npz_test_set  # noqa: E402
from stn_jax.paper.objectives import create_objective  # noqa: E402

ARG = "r,fcn,tiny"
SMALL = {"total_steps": 12, "log_every": 2, "checkpoint_every": 4, "eval_every": 12, "data.test_size": 64,
         "eval_batch_size": 64, "batch_size": 16}


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def write_idx_mnist(folder: Path, train_n: int = 300, test_n: int = 100, seed: int = 0) -> Path:
    """Four gzip IDX files (magic 2051 images (n, 28, 28) uint8, 2049 labels), classes 0-9 in equal measure."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_n), ("t10k", test_n)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):  # a class-dependent bar plus noise: learnable, not trivial
            images[i, 4 + 2 * c:6 + 2 * c, 6:22] = 255
        images = np.maximum(images, (rng.random((n, 28, 28)) * 60).astype(np.uint8))
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    return str(write_idx_mnist(tmp_path_factory.mktemp("idx_mnist")))


def config(source: str, arg: str = ARG, **overrides):
    c = distorted_mnist.get_config(arg)
    c.data.source = source
    for key, value in {**SMALL, **overrides}.items():
        node = c
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return c


def flags(workdir: Path, source: str, arg: str = ARG, **overrides) -> list[str]:
    out = [f"--config=configs/distorted_mnist.py:{arg}", f"--workdir={workdir}", f"--config.data.source={source}"]
    return out + [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]


def env() -> dict:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    e.pop("STN_JAX_TRACEBACK", None)
    return e


def python(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env())


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env())


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str, code: int = 1) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert line.startswith("error:"), proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in line, line
    return line


def metric_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a row cut by a kill is dropped on resume
    return steps


def train_rows(workdir: Path) -> list[int]:
    """Steps of the training-log rows (those with a ``loss``; eval rows hold ``test_*`` keys only)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def checkpoint_arrays(workdir: Path) -> tuple[int, list[np.ndarray]]:
    manager = ocp.CheckpointManager(workdir / "checkpoints")
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.StandardRestore())
    return step, [np.asarray(x) for x in jax.tree.leaves(state)]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before the condition held:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, source) -> Path:
    """A finished 12-step run (checkpoints 4, 8, 12); tests copy it before changing it."""
    workdir = tmp_path_factory.mktemp("done") / "run"
    train.train_and_evaluate(config(source), workdir)
    return workdir


@pytest.fixture
def run_copy(done_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(done_run, dst)
    return dst


# ---------------------------------------------------------------------------
# 1. One run per workdir.
# ---------------------------------------------------------------------------


def test_second_run_in_a_locked_workdir_is_refused_naming_the_holder(tmp_path, source):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with workdir_lib.workdir_lock(workdir):
        with pytest.raises(workdir_lib.WorkdirError) as e:
            train.train_and_evaluate(config(source), workdir)
        # The CLI in another process sees the lock too (flock is per open file description).
        proc = python("-m", "experiments.train", *flags(workdir, source))
    message = str(e.value)
    assert "\n" not in message and f"pid {os.getpid()}" in message and "in use by" in message
    line = assert_one_line_error(proc, "in use by", f"pid {os.getpid()}")
    assert "\n" not in line
    assert not (workdir / "config.json").exists() and not (workdir / "checkpoints").exists()
    # Released: the same workdir can be used now.
    with workdir_lib.workdir_lock(workdir):
        pass


# ---------------------------------------------------------------------------
# 2. Resume rules.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arg", ["rts,st_cnn,affine,tiny", "r,cnn,tiny", "p,fcn,tiny"])
def test_resuming_with_another_model_or_task_is_refused_before_writing(run_copy, source, arg):
    before = {p: p.read_bytes() for p in run_copy.glob("*.json*")}
    steps_before = sorted(os.listdir(run_copy / "checkpoints"))
    with pytest.raises(workdir_lib.WorkdirError) as e:
        train.train_and_evaluate(config(source, arg), run_copy)
    message = str(e.value)
    assert "\n" not in message and message.startswith("this workdir holds fcn on r, not "), message
    assert {p: p.read_bytes() for p in run_copy.glob("*.json*")} == before  # config.json, history, metrics
    assert sorted(os.listdir(run_copy / "checkpoints")) == steps_before


def test_resuming_with_a_changed_setting_announces_and_records_it(run_copy, source, caplog):
    with caplog.at_level(logging.WARNING, logger="stn_jax.paper"):
        train.train_and_evaluate(config(source, **{"optimizer.learning_rate": 0.02}), run_copy)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("changed setting" in w and "optimizer.learning_rate: 0.01 -> 0.02" in w for w in warnings), warnings
    history = [json.loads(line) for line in (run_copy / "config_history.jsonl").read_text().splitlines()]
    assert len(history) == 2
    assert history[0]["changes"] == []
    assert history[1]["changes"] == ["optimizer.learning_rate: 0.01 -> 0.02"]
    assert json.loads((run_copy / "config.json").read_text())["optimizer"]["learning_rate"] == 0.02


def test_evaluate_announces_settings_that_differ_from_the_run(run_copy, source, caplog):
    """Evaluating with another setting than the run's config.json (here the test digits' rotation) scores
    another test set: each changed setting is announced, as a resumed run announces it."""
    before = (run_copy / "config.json").read_bytes()
    with caplog.at_level(logging.WARNING, logger="stn_jax.paper"):
        evaluation.evaluate_checkpoint(config(source), run_copy)
        assert not [r for r in caplog.records if "setting" in r.getMessage()]  # the run's own settings: silent
        evaluation.evaluate_checkpoint(config(source, **{"data.max_angle": 0.0}), run_copy)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "evaluating with a setting other than the run's config.json: data.max_angle: 90.0 -> 0.0" in warnings
    assert (run_copy / "config.json").read_bytes() == before


def test_a_run_caches_its_data_where_config_data_cache_dir_says(tmp_path, source):
    """``--config.data.cache_dir=C``: the test set is cached in C, not in ``<workdir>/data``."""
    workdir, cache = tmp_path / "W", tmp_path / "C"
    train.train_and_evaluate(config(source, **{"data.cache_dir": str(cache), "total_steps": 4}), workdir)
    assert [p.suffix for p in sorted(cache.glob("mnist_r_test_*"))] == [".json", ".npz"]
    assert not (workdir / "data").exists()
    assert json.loads((workdir / "config.json").read_text())["data"]["cache_dir"] == str(cache)


# ---------------------------------------------------------------------------
# 3. Batch sizes; evaluation covers every example.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["batch_size", "eval_batch_size"])
def test_batch_sizes_not_divisible_by_the_devices_are_refused_up_front(tmp_path, source, monkeypatch, key):
    monkeypatch.setattr(jax, "device_count", lambda *a, **k: 4)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"config\.{key}=18 must be divisible by the number of devices \(4\)"):
        train.train_and_evaluate(config(source, **{key: 18}), workdir)
    assert not workdir.exists()  # refused before anything was written


def test_evaluate_counts_every_example_once(tmp_path, source, monkeypatch):
    c = resolve(config(source, **{"data.test_size": 10, "eval_batch_size": 4}))
    run = evaluation.open_run(c, tmp_path)
    assert run.setup.dataset.test_size == 10
    monkeypatch.setattr(type(run.setup.objective), "summarize", lambda self, sums: dict(sums))
    state = jax.device_put(run.setup.state, run.replicated)
    assert evaluation.evaluate(run, state)["count"] == 10
    rng = np.random.default_rng(0)
    npz = tmp_path / "seven.npz"
    np.savez(npz, images=rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), labels=np.arange(7) % 10)
    test = load_npz_test_set(npz, tuple(run.setup.dataset.image_shape), 10)
    assert evaluation.evaluate(run, state, test)["count"] == 7


# ---------------------------------------------------------------------------
# 4. keep_checkpoints; 5. balanced small test sets.
# ---------------------------------------------------------------------------


def test_keep_checkpoints_zero_is_refused(tmp_path, source):
    with pytest.raises(ValueError, match="config.keep_checkpoints must be at least 1, got 0"):
        train.train_and_evaluate(config(source, keep_checkpoints=0), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_small_test_sets_are_a_seeded_class_balanced_subset(tmp_path, source):
    labels = np.repeat(np.arange(10), [30, 3, 10, 10, 10, 10, 10, 10, 10, 10])
    order = balanced_order(labels, 0)
    assert sorted(order) == list(range(len(labels)))
    np.testing.assert_array_equal(order, balanced_order(labels, 0))
    assert not np.array_equal(order, balanced_order(labels, 1))
    for k in (10, 25, 30):  # while every class lasts, counts differ by at most 1
        counts = np.bincount(labels[order[:k]], minlength=10)
        assert counts.max() - counts.min() <= 1, (k, counts)
    c = resolve(config(source, **{"data.test_size": 25}))
    dataset = evaluation.open_run(c, tmp_path).setup.dataset
    test_labels = np.asarray(dataset.test_examples(np.arange(dataset.test_size))["label"])
    counts = np.bincount(test_labels, minlength=10)
    assert len(test_labels) == 25 and (counts > 0).all() and counts.max() - counts.min() <= 1, counts


# ---------------------------------------------------------------------------
# 6. Evaluation inputs.
# ---------------------------------------------------------------------------


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


IMAGES = np.zeros((4, 28, 28), np.uint8)


@pytest.mark.parametrize("name,arrays,error,fragment", [
    ("label_range", dict(images=IMAGES, labels=np.array([0, 1, 2, 10])), ValueError, "must lie in [0, 10)"),
    ("negative", dict(images=IMAGES, labels=np.array([0, -1, 2, 3])), ValueError, "must lie in [0, 10)"),
    ("float_labels", dict(images=IMAGES, labels=np.array([0.0, 1.0, 2.0, 3.0])), ValueError, "must be integers"),
    ("column_labels", dict(images=IMAGES, labels=np.arange(4)[:, None]), ValueError, "must have shape (N,)"),
    ("nan_pixels", dict(images=np.full((4, 28, 28), np.nan, np.float32), labels=np.arange(4)), ValueError,
     "non-finite"),
    ("out_of_range", dict(images=np.full((4, 28, 28), 2.0, np.float32), labels=np.arange(4)), ValueError,
     "must lie in [0, 1]"),
    ("empty_npz", dict(), ValueError, "must hold arrays 'images' and 'labels'"),
    ("empty_arrays", dict(images=np.zeros((0, 28, 28), np.uint8), labels=np.zeros((0,), np.int64)), ValueError,
     "N > 0"),
    ("pickled", dict(images=np.array([object()] * 4, dtype=object), labels=np.arange(4)), ValueError,
     "pickled objects"),
    ("wrong_shape", dict(images=np.zeros((4, 42, 42), np.uint8), labels=np.arange(4)), ValueError,
     "the model expects"),
])
def test_bad_evaluation_inputs_fail_in_one_line(tmp_path, name, arrays, error, fragment):
    path = _npz(tmp_path / f"{name}.npz", **arrays)
    with pytest.raises(error) as e:
        load_npz_test_set(path, (28, 28, 1), 10)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_missing_and_unreadable_npz_fail_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_npz_test_set(tmp_path / "absent.npz", (28, 28, 1), 10)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError) as e:
        load_npz_test_set(garbage, (28, 28, 1), 10)
    assert "\n" not in str(e.value)


def test_evaluate_cli_reports_a_bad_npz_in_one_line(done_run, source, tmp_path):
    bad = _npz(tmp_path / "bad.npz", images=IMAGES, labels=np.array([0, 1, 2, 99]))
    proc = python("-m", "experiments.evaluate", *flags(done_run, source), f"--config.data.test_npz={bad}")
    assert_one_line_error(proc, "labels must lie in [0, 10)")


def test_evaluation_files_for_multi_digit_labels(tmp_path):
    """SVHN's models score five digit positions: an evaluation file holds labels (N, 5) in [0, 11)."""
    images = np.zeros((3, 64, 64, 3), np.uint8)
    good = _npz(tmp_path / "numbers.npz", images=images, labels=np.array([[1, 9, 10, 10, 10]] * 3))
    assert load_npz_test_set(good, (64, 64, 3), 11, (5,)).arrays["label"].shape == (3, 5)
    flat = _npz(tmp_path / "flat.npz", images=images, labels=np.arange(3))
    with pytest.raises(ValueError, match=r"labels must have shape \(N, 5\), got \(3,\)"):
        load_npz_test_set(flat, (64, 64, 3), 11, (5,))
    eleven = _npz(tmp_path / "eleven.npz", images=images, labels=np.full((3, 5), 11))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\)"):
        load_npz_test_set(eleven, (64, 64, 3), 11, (5,))


def test_evaluation_files_are_refused_where_the_objective_needs_more_than_labels(tmp_path):
    run = types.SimpleNamespace(setup=types.SimpleNamespace(objective=create_objective({"name": "triplet"})))
    with pytest.raises(ValueError, match="objective 'triplet' scores more than images and labels") as e:
        evaluation.npz_test_set(_npz(tmp_path / "mine.npz", images=IMAGES, labels=np.arange(4)), run)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------
# 7. SIGINT / SIGTERM.
# ---------------------------------------------------------------------------


@pytest.mark.slow  # two training subprocesses each; about 15 s unloaded, a minute on a busy 2-core machine
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_the_current_step_and_the_rerun_finishes(tmp_path, source, sig):
    workdir = tmp_path / "run"
    args = ("-m", "experiments.train", *flags(workdir, source, total_steps=60, checkpoint_every=50,
                                               eval_every=60))
    proc = start(*args)
    wait_for(lambda: len(metric_steps(workdir)) >= 1, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = last_line(err)
    assert line.startswith(f"interrupted: stopped by signal {sig.name} after step "), line
    step = int(line.split("saved the checkpoint of step ")[1].split()[0])
    assert 0 < step < 60 and (workdir / "checkpoints" / str(step)).is_dir()
    assert "test_error=" not in out
    again = python(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "test_error=" in again.stdout
    assert f"steps {step} -> 60" in again.stderr  # resumed, not restarted
    steps = train_rows(workdir)
    assert steps == list(range(2, 61, 2))


# ---------------------------------------------------------------------------
# 8. Corrupt latest checkpoint.
# ---------------------------------------------------------------------------


def test_a_corrupt_latest_checkpoint_is_skipped_saying_so(run_copy, source, caplog):
    data = run_copy / "checkpoints" / "12" / "default" / "ocdbt.process_0" / "d"
    biggest = max(data.iterdir(), key=lambda p: p.stat().st_size)
    biggest.write_bytes(b"garbage" * 10)
    with caplog.at_level(logging.INFO, logger="stn_jax.paper"):
        result = train.train_and_evaluate(config(source, total_steps=16), run_copy)
    messages = [r.getMessage() for r in caplog.records]
    assert any("checkpoint 12" in m and "cannot be restored" in m for m in messages), messages
    assert any("restored the checkpoint of step 8" in m for m in messages), messages
    assert np.isfinite(result["loss"])
    assert checkpoint_arrays(run_copy)[0] == 16
    assert train_rows(run_copy) == list(range(2, 17, 2))


def test_corrupt_latest_checkpoint_at_the_final_step_is_replaced(run_copy, source):
    """Rerunning a finished run whose final checkpoint is corrupt retrains from the previous one and rewrites it."""
    data = run_copy / "checkpoints" / "12" / "default" / "ocdbt.process_0" / "d"
    biggest = max(data.iterdir(), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])  # truncated
    train.train_and_evaluate(config(source), run_copy)
    c = resolve(config(source))
    run = evaluation.open_run(c, run_copy)
    state = checkpoints.restore_latest(run, checkpoints.checkpoint_manager(run_copy, 3, create=False), run.setup.state)
    assert int(state.step) == 12
    aside = list((run_copy / "unrestorable_checkpoints").iterdir())
    assert [p.name.split("-")[0] for p in aside] == ["12"]  # kept for inspection, out of orbax's way


# ---------------------------------------------------------------------------
# 9. One-line CLI errors.
# ---------------------------------------------------------------------------


def test_cli_workdir_that_is_a_file(tmp_path, source):
    path = tmp_path / "a_file"
    path.write_text("x")
    assert_one_line_error(python("-m", "experiments.train", *flags(path, source)), "is a file")


def test_cli_read_only_workdir(tmp_path, source):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 0o500 does not stop root from writing")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert_one_line_error(python("-m", "experiments.train", *flags(folder / "run", source)), "cannot write")
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("extra,fragment", [
    (["--config.batch_size=abc"], "batch_size"),
    (["--config.totl_steps=5"], "totl_steps"),
])
def test_cli_bad_overrides_fail_in_one_line_and_write_nothing(tmp_path, source, extra, fragment):
    workdir = tmp_path / "run"
    proc = python("-m", "experiments.train", *flags(workdir, source), *extra)
    assert_one_line_error(proc, fragment)
    assert not (workdir / "config.json").exists()


def test_cli_invalid_config_value_writes_no_config_json(tmp_path, source):
    workdir = tmp_path / "run"
    proc = python("-m", "experiments.train", *flags(workdir, source), "--config.keep_checkpoints=0")
    assert_one_line_error(proc, "keep_checkpoints must be at least 1")
    assert not (workdir / "config.json").exists()


def test_cli_missing_config_file(tmp_path):
    proc = python("-m", "experiments.train", "--config=configs/no_such_file.py", f"--workdir={tmp_path / 'w'}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "no_such_file.py" in last_line(proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_cli_missing_workdir():
    proc = python("-m", "experiments.train", f"--config=configs/distorted_mnist.py:{ARG}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "workdir" in last_line(proc.stderr), proc.stderr[-2000:]


# ---------------------------------------------------------------------------
# 10. No duplicate metrics rows after a kill between checkpoints.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_rerun_steps_do_not_duplicate_metrics_rows(tmp_path, source):
    workdir = tmp_path / "run"
    args = ("-m", "experiments.train", *flags(workdir, source, total_steps=200, checkpoint_every=50,
                                               eval_every=200))
    proc = start(*args)
    wait_for(lambda: any(s > 50 for s in metric_steps(workdir)), proc)
    proc.kill()
    proc.communicate(timeout=60)
    ckpt = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert max(metric_steps(workdir)) > ckpt  # rows past the last checkpoint will be re-run
    again = python(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert train_rows(workdir) == list(range(2, 201, 2))


# ---------------------------------------------------------------------------
# 11. Fault injection: killed / interrupted runs end bit-identical to an uninterrupted one.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_fault_injection_kill_and_interrupt_end_bit_identical(tmp_path, source):
    overrides = dict(total_steps=40, checkpoint_every=4, eval_every=40)
    reference = tmp_path / "reference"
    ref = python("-m", "experiments.train", *flags(reference, source, **overrides))
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_line = last_line(ref.stdout)
    ref_step, ref_arrays = checkpoint_arrays(reference)
    assert ref_step == 40
    log_steps = list(range(2, 41, 2))
    assert train_rows(reference) == log_steps

    # (seed, [(signal, when)]): "start" = a random delay after launch (may hit start-up, training or the end),
    # "training" = a random delay after the first log row (mid-training).
    plans = [(0, [(signal.SIGKILL, "start")]), (1, [(signal.SIGINT, "training")]),
             (2, [(signal.SIGKILL, "training"), (signal.SIGKILL, "training")])]
    mid_training = 0
    for seed, faults in plans:
        rng = random.Random(seed)
        workdir = tmp_path / f"faulty{seed}"
        args = ("-m", "experiments.train", *flags(workdir, source, **overrides))
        for sig, when in faults:
            before = set(metric_steps(workdir))
            proc = start(*args)
            if when == "training":
                wait_for(lambda: bool(set(metric_steps(workdir)) - before), proc)
                time.sleep(rng.uniform(0.0, 1.0))
            else:
                time.sleep(rng.uniform(2.0, 8.0))
            if proc.poll() is None:
                logged = metric_steps(workdir)
                mid_training += bool(logged) and max(logged) < 40
                proc.send_signal(sig)
            proc.communicate(timeout=120)
            if sig == signal.SIGINT:
                assert proc.returncode in (0, 130), proc.returncode
        final = python(*args)
        assert final.returncode == 0, (seed, final.stderr[-3000:])
        assert last_line(final.stdout) == ref_line, seed
        step, arrays = checkpoint_arrays(workdir)
        assert step == 40
        assert len(arrays) == len(ref_arrays)
        for a, b in zip(arrays, ref_arrays):
            np.testing.assert_array_equal(a, b, err_msg=f"seed {seed}")
        assert train_rows(workdir) == log_steps, seed
    assert mid_training >= 2  # the faults did land inside training, not only before or after it


@pytest.mark.parametrize("interrupt,line", [
    (CacheBuildInterrupted("stopped by Ctrl-C while building the cache C/svhn_train; the partial cache was "
                           "removed: run the same command to build it again"),
     "interrupted: stopped by Ctrl-C while building the cache C/svhn_train; the partial cache was removed: run the "
     "same command to build it again"),
    (KeyboardInterrupt(), "interrupted: stopped by Ctrl-C (SIGINT) outside the training loop; run the same command "
                          "to go on (training resumes from its last checkpoint)"),
])
def test_cli_reports_ctrl_c_anywhere_in_one_line(capsys, interrupt, line):
    """Ctrl-C during a data cache build (or anywhere outside the training loop) ends in one line, status 130."""
    def stopped(argv):
        raise interrupt

    with pytest.raises(BaseException) as stop:  # an uncaught KeyboardInterrupt would stop the test session
        cli._reporting(stopped)([])
    assert isinstance(stop.value, SystemExit) and stop.value.code == 130
    assert capsys.readouterr().err == line + "\n"


# The error tensorstore raised when a 3 MB tmpfs filled up during a checkpoint write (orbax 0.12.8).
FULL_DISK = ('RESOURCE_EXHAUSTED: Error writing "first_nonfinite_step/0" in OCDBT database at local file '
             '"W/checkpoints/8.orbax-checkpoint-tmp/default.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: '
             '"W/checkpoints/8.orbax-checkpoint-tmp/d/5684": Failed to write 655175 bytes to file 13: No space left '
             "on device [os_error_code='28']")


class _ClosedLoopLeftover:
    """Deleted, it raises what the callbacks of an aborted orbax write raise: an unraisable exception."""

    def __del__(self):
        raise RuntimeError("Event loop is closed")


def test_a_full_disk_during_a_checkpoint_write_ends_in_one_line(tmp_path, source, monkeypatch, caplog):
    """The write of step 8 fails as on a full disk: orbax's writer thread logs a traceback, its callbacks leave
    "Event loop is closed" exceptions, tensorstore raises a ValueError. What remains is one line with what to do;
    the records of the write of step 4, which succeeded, are reported as usual."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # restored after the test
    save = ocp.CheckpointManager.save

    def save_until_the_disk_is_full(self, step, *args, **kwargs):
        absl = logging.getLogger("absl")
        if step < 8:
            absl.warning("orbax wrote step %d", step)
            return save(self, step, *args, **kwargs)
        try:
            raise ValueError(FULL_DISK)
        except ValueError:
            absl.exception("[thread=array_type_handler] _SignalingThread.run() raised an exception")
        _ClosedLoopLeftover()
        raise ValueError(FULL_DISK)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_the_disk_is_full)
    workdir = tmp_path / "run"
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as stop:
        cli._reporting(lambda argv: train.train_and_evaluate(config(source), workdir))([])
    message = str(stop.value.code)
    assert message == (f"error: [Errno 28] No space left on device: could not write the checkpoint of step 8: "
                       f"'{workdir / 'checkpoints'}'; free disk space (or use a --workdir on another disk) and rerun "
                       f"the same command to resume from the last checkpoint")
    assert "orbax wrote step 4" in caplog.text and "raised an exception" not in caplog.text
    _ClosedLoopLeftover()  # a late one, after the error: still held back
    assert unraisable == []
    sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError("another error")))
    assert len(unraisable) == 1  # other unraisable exceptions are reported as usual


def test_cli_reports_a_full_disk_in_one_line_with_what_to_do(monkeypatch, capsys):
    """A full disk (ENOSPC) during a run ends in one line that says how to go on."""
    import errno

    from experiments import cli

    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "workdirs/run/checkpoints/12")

    with pytest.raises(SystemExit) as stop:
        cli._reporting(full)([])
    message = str(stop.value.code)
    assert message.startswith("error: [Errno 28] No space left on device") and "\n" not in message
    assert "rerun the same command to resume" in message

"""Checkpoints, --resume and SIGINT/SIGTERM/SIGKILL during `tune`: an interrupted run ends where an uninterrupted one does."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from promptune.api import tune
from promptune.checkpoint import INDEX_NAME, CheckpointError, default_checkpoint_dir, has_checkpoint
from promptune.stop import RunInterrupted, StopSignals
from promptune.reporting import SilentReporter
from promptune.runtime import Runtime
from promptune.train import CAPTURE_MODE, Trainer, TrainConfig, TrainStep, compile_mode

from conftest import make_shape_folder

VOLATILE = {"seconds", "finished_at"}  # wall-clock facts: the only metadata a resumed run may change


def read_prompt_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def assert_same_result(a: Path, b: Path) -> None:
    tensors_a, meta_a = read_prompt_file(a)
    tensors_b, meta_b = read_prompt_file(b)
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        assert torch.equal(tensors_a[key], tensors_b[key]), key  # bit-identical, not merely close
    training_a, training_b = json.loads(meta_a.pop("training")), json.loads(meta_b.pop("training"))
    assert meta_a == meta_b
    assert {k: v for k, v in training_a.items() if k not in VOLATILE} == {k: v for k, v in training_b.items() if k not in VOLATILE}


class SignalAt(SilentReporter):
    """Sends this process a real signal after training step `step` of epoch `epoch` (step 0: at that epoch's end)."""

    def __init__(self, epoch: int, step: int, signum: int = signal.SIGINT) -> None:
        self.target = (epoch, step)
        self.signum = signum
        self.epoch = 0
        self.steps = 0

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.epoch, self.steps = epoch, 0

    def step(self, loss: float, acc: float, images_per_s: float) -> None:
        self.steps += 1
        if (self.epoch, self.steps) == self.target:
            os.kill(os.getpid(), self.signum)

    def epoch_end(self, stats) -> None:
        if (self.epoch, 0) == self.target:
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    return make_shape_folder(tmp_path_factory.mktemp("resume") / "data", per_class=8, seed=3)


def _options(method: str, clip_files, vit_file) -> dict:
    if method == "spt":
        backbone = dict(backbone="test_vit", weights=str(vit_file))
    else:
        backbone = dict(backbone=str(clip_files[0]), weights=str(clip_files[1]), shots=6)
    return dict(method=method, epochs=3, batch_size=4, workers=0, device="cpu", seed=7, **backbone)


# ------------------------------------------------------------------------------------------- in-process resume


@pytest.mark.parametrize("method", ["spt", "sep"])  # sep also trains a parameter the prompt file does not keep
@pytest.mark.parametrize("stop_at", [(2, 2), (1, 0)], ids=["mid-epoch", "epoch-boundary"])
def test_interrupted_then_resumed_equals_uninterrupted(method, stop_at, small_folder, clip_files, vit_file, tmp_path):
    options = _options(method, clip_files, vit_file)
    reference = tune(small_folder, out=tmp_path / "reference.safetensors", **options).path
    assert not default_checkpoint_dir(reference).exists()  # a finished run cleans its checkpoint up

    out = tmp_path / "prompts.safetensors"
    with pytest.raises(RunInterrupted) as stopped:
        tune(small_folder, out=out, reporter=SignalAt(*stop_at), **options)
    assert stopped.value.exit_code == 130
    assert not out.exists()
    folder = default_checkpoint_dir(out)
    index = json.loads((folder / INDEX_NAME).read_text())
    assert (index["trainer"]["epoch"], index["trainer"]["progress"]["step"]) == (stop_at[0] - (stop_at[1] > 0), stop_at[1])
    assert index["stopped_by"] == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored after the run

    tune(small_folder, out=out, resume=True, **options)
    assert_same_result(reference, out)
    assert not folder.exists()


def test_resume_refuses_a_different_run(small_folder, vit_file, tmp_path):
    options = _options("spt", None, vit_file)
    out = tmp_path / "p.safetensors"
    with pytest.raises(RunInterrupted):
        tune(small_folder, out=out, reporter=SignalAt(1, 1), **options)

    with pytest.raises(CheckpointError, match=r"holds the checkpoint of an unfinished run; add --resume"):
        tune(small_folder, out=out, **options)
    with pytest.raises(CheckpointError, match=r"--lr \(0.001 in the checkpoint, 0.002 now\)"):
        tune(small_folder, out=out, resume=True, **{**options, "lr": 0.002})
    with pytest.raises(CheckpointError, match=r"--prompts-per-layer"):
        tune(small_folder, out=out, resume=True, options={"prompts_per_layer": 3}, **options)
    extra = small_folder.parent / "extra"
    make_shape_folder(extra, per_class=9, seed=3)
    with pytest.raises(CheckpointError, match=r"the training images"):
        tune(extra, out=out, resume=True, **options)
    assert has_checkpoint(default_checkpoint_dir(out))  # refusing never costs the user their checkpoint


def test_resume_and_checkpoint_mistakes(small_folder, vit_file, tmp_path):
    options = _options("spt", None, vit_file)
    out = tmp_path / "p.safetensors"
    with pytest.raises(CheckpointError, match=r"Nothing to resume: there is no checkpoint"):
        tune(small_folder, out=out, resume=True, **options)
    with pytest.raises(CheckpointError, match=r"drop --no-checkpoint"):
        tune(small_folder, out=out, resume=True, checkpoint=False, **options)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"is a file; give a folder"):
        tune(small_folder, out=out, checkpoint_dir=tmp_path / "file", **options)

    folder = tmp_path / "ckpt"
    with pytest.raises(RunInterrupted):
        tune(small_folder, out=out, checkpoint_dir=folder, reporter=SignalAt(1, 1), **options)
    index = json.loads((folder / INDEX_NAME).read_text())
    state = folder / index["state_file"]
    damaged = bytearray(state.read_bytes())
    damaged[-1] ^= 0xFF
    state.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=r"is damaged \(its state file does not match its sha256\)"):
        tune(small_folder, out=out, checkpoint_dir=folder, resume=True, **options)
    index["format_version"] = 99
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"format version 99; .*upgrade promptune"):
        tune(small_folder, out=out, checkpoint_dir=folder, resume=True, **options)


def test_an_unwritable_checkpoint_folder_is_refused_before_training(small_folder, vit_file, tmp_path, monkeypatch):
    import promptune.fileio

    target = tmp_path / "locked" / "nested"
    (tmp_path / "out").mkdir()
    asked: list[Path] = []
    real_mkstemp = promptune.fileio.tempfile.mkstemp

    def no_write(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own keyword
        asked.append(Path(dir))
        if Path(dir) == tmp_path:  # as root, the file system's refusal is simulated
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(promptune.fileio.tempfile, "mkstemp", no_write)
    with pytest.raises(CheckpointError, match=r"Cannot write checkpoints in .*\(permission denied\); pass --checkpoint-dir "
                                              r"DIR or --no-checkpoint"):
        tune(small_folder, out=tmp_path / "out" / "p.safetensors", checkpoint_dir=target,
             **_options("spt", None, vit_file))
    assert asked == [tmp_path / "out", tmp_path]  # --out's folder, then the nearest folder of the checkpoint that exists
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and list((tmp_path / "out").iterdir()) == []


def test_no_checkpoint_writes_none(small_folder, vit_file, tmp_path):
    out = tmp_path / "p.safetensors"
    with pytest.raises(RunInterrupted, match=r"nothing was saved"):
        tune(small_folder, out=out, checkpoint=False, reporter=SignalAt(1, 1), **_options("spt", None, vit_file))
    assert list(tmp_path.iterdir()) == []


def test_trainer_compile_option_wraps_the_training_step():
    model = torch.nn.Linear(2, 2)
    model.training_loss = lambda images, labels: (images.sum() * 0, images)
    model.param_groups = lambda decay: [{"params": list(model.parameters()), "weight_decay": decay}]
    model.has_unused_parameters = lambda: False
    cfg = TrainConfig(epochs=1, lr=0.1, weight_decay=0.0, batch_size=2)
    plain = Trainer(model, cfg, Runtime(torch.device("cpu")), 1)
    assert isinstance(plain.step, TrainStep) and plain.forward is plain.step and plain.step.method is model
    images = torch.ones(2, 2)
    assert plain.forward(images, None)[1] is images  # the step's forward is the method's training loss
    compiled = Trainer(model, cfg, Runtime(torch.device("cpu")), 1, compile_step=True)
    assert compiled.forward is not compiled.step and compiled.forward._orig_mod is compiled.step  # compiled lazily
    assert compiled.compile_mode is None and plain.compile_mode is None  # the CPU fuses kernels, captures nothing


def test_compile_captures_cuda_graphs_on_one_gpu_only():
    assert compile_mode(Runtime(torch.device("cuda", 0))) == CAPTURE_MODE == "reduce-overhead"
    assert compile_mode(Runtime(torch.device("cuda", 0), rank=1, world_size=2)) is None  # DDP: fused kernels only
    assert compile_mode(Runtime(torch.device("cpu"))) is None
    assert compile_mode(Runtime(torch.device("mps"))) is None


def test_a_captured_step_marks_each_step_and_keeps_a_copy_of_its_loss(monkeypatch):
    """CUDA-graph replays overwrite the previous replay's outputs: the step's loss is read later (once per refresh),
    so a captured step returns a copy, and tells torch where each step begins."""
    model = torch.nn.Linear(2, 3)
    model.training_loss = lambda images, labels: (model(images).square().mean(), model(images))
    model.param_groups = lambda decay: [{"params": list(model.parameters()), "weight_decay": decay}]
    model.has_unused_parameters = lambda: False
    cfg = TrainConfig(epochs=1, lr=0.1, weight_decay=0.0, batch_size=2)
    trainer = Trainer(model, cfg, Runtime(torch.device("cpu")), 1)
    outputs, marks = [], []
    step = trainer.forward
    trainer.forward = lambda *args: outputs.append(step(*args)) or outputs[-1]
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    images, labels = torch.ones(2, 2), torch.tensor([0, 1])
    loss, _ = trainer.train_step(images, labels)
    assert loss.untyped_storage().data_ptr() == outputs[0][0].untyped_storage().data_ptr() and not marks  # eager
    trainer.compile_mode = CAPTURE_MODE
    loss, hits = trainer.train_step(images, labels)
    assert marks == [1]
    assert loss.untyped_storage().data_ptr() != outputs[1][0].untyped_storage().data_ptr()
    torch.testing.assert_close(loss, outputs[1][0].detach(), rtol=0, atol=0)


def test_stop_signals_outside_training_and_twice():
    with StopSignals() as stop:
        with pytest.raises(RunInterrupted, match=r"Interrupted by SIGTERM; nothing was saved"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    with StopSignals() as stop, stop.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested and stop.received == signal.SIGINT
        with pytest.raises(RunInterrupted, match=r"second SIGINT; stopped at once"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ---------------------------------------------------------------------------------- real processes, real signals


def _command(folder: Path, vit_file: Path, out: Path, workers: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "promptune", "tune", str(folder), "--backbone", "test_vit", "--weights", str(vit_file),
            "--epochs", "4", "--batch-size", "2", "--seed", "3", "--device", "cpu", "--workers", str(workers),
            "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)


@pytest.fixture(scope="module")
def process_reference(small_folder, vit_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "reference.safetensors"
    result = _run(_command(small_folder, vit_file, out, 0, "-q"))
    assert result.returncode == 0, result.stderr
    return out


def _start_and_signal(command: list[str], folder: Path, signum: int) -> subprocess.CompletedProcess:
    """Start `tune`, wait for its first epoch checkpoint, then send `signum` (in epoch 2 or its validation)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 240
    while not (folder / INDEX_NAME).exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize("signum, code, workers", [(signal.SIGINT, 130, 1), (signal.SIGTERM, 143, 0)],
                         ids=["SIGINT-1-worker", "SIGTERM-0-workers"])
def test_signal_to_a_real_tune_then_resume(signum, code, workers, small_folder, vit_file, process_reference, tmp_path):
    out = tmp_path / "prompts.safetensors"
    folder = default_checkpoint_dir(out)
    stopped = _start_and_signal(_command(small_folder, vit_file, out, workers), folder, signum)
    assert stopped.returncode == code, stopped.stderr
    assert f"Interrupted by {signal.Signals(signum).name}; saved a checkpoint" in stopped.stderr
    assert "Resume with: promptune tune" in stopped.stderr and "--resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr and not out.exists()

    resumed = _run(_command(small_folder, vit_file, out, workers, "--resume", "-q"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_result(process_reference, out)  # also across worker counts: augmentation is seeded per sample
    assert not folder.exists()


def test_sigkill_keeps_the_previous_prompt_file_and_the_last_checkpoint(small_folder, vit_file, process_reference, tmp_path):
    out = tmp_path / "prompts.safetensors"
    out.write_bytes(process_reference.read_bytes())  # the user's earlier result, about to be overwritten
    before = out.read_bytes()
    killed = _start_and_signal(_command(small_folder, vit_file, out, 0), default_checkpoint_dir(out), signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert out.read_bytes() == before

    resumed = _run(_command(small_folder, vit_file, out, 0, "--resume", "-q"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_result(process_reference, out)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no checkpoint, no temp files left behind

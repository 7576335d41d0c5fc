"""Nothing a user owns is lost or damaged (issue 10): --out never replaces a file that is not a prompt file nor writes
into the class folders, one `tune` at a time per prompt file, a disk that refuses writes is named before any image is
read, promptune's own folders are never read as data, and `predict` takes exactly what it is given."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from typer.testing import CliRunner

import promptune
import promptune.data.loader
import promptune.data.sampling
import promptune.fileio as fileio
from promptune.artifact import is_prompt_file, load_prompt_file
from promptune.cli import app
from promptune.data import scan_classes
from promptune.errors import PromptuneError
from promptune.fileio import MARKER_NAME
from promptune.outputs import lock_path
from promptune.reporting import SilentReporter
from promptune.stop import RunInterrupted
from promptune.train import Trainer

from conftest import make_shape_folder

runner = CliRunner()


# ------------------------------------------------------------------------------------------------------- helpers


@pytest.fixture()
def data(tmp_path) -> Path:
    return make_shape_folder(tmp_path / "data", per_class=3)


def tune(data: Path, out: Path, coop_args: list[str], *extra: object):
    args = ["tune", data, *coop_args, "--epochs", "1", "--batch-size", "8", "--shots", "2", "--workers", "0",
            "--device", "cpu", "--out", out, "--json", *extra]
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The one `Error: ...` sentence of a refused command (no traceback, non-zero exit, nothing on stdout)."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    assert errors[0].endswith(".") and not re.search(r"[.!?] [A-Z]", errors[0]), errors[0]
    return errors[0]


@pytest.fixture()
def no_images_read(monkeypatch) -> None:
    """A refused `tune` must stop before it decodes a single image, let alone trains."""
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("an image was read or training started")

    for module in (promptune.data.sampling, promptune.data.loader):  # where choosing and loading images decode them
        monkeypatch.setattr(module, "decode_image", refuse)
    monkeypatch.setattr(Trainer, "fit", refuse)


# --------------------------------------------------------------------------------------------------------- --out


def test_out_onto_a_training_image_is_refused_and_the_image_kept(data, tmp_path, coop_args, no_images_read):
    """`tune --out data/red_square/000.png` replaced the training image and exited 0."""
    image = data / "red_square" / "000.png"
    before = image.read_bytes()
    line = error_line(tune(data, image, coop_args))
    assert f"--out '{image}' is inside the class folder '{data / 'red_square'}'" in line
    assert image.read_bytes() == before


def test_out_inside_a_class_folder_of_a_split_folder_is_refused(tmp_path, coop_args, no_images_read):
    make_shape_folder(tmp_path / "split" / "train", per_class=2)
    make_shape_folder(tmp_path / "split" / "test", per_class=2)
    out = tmp_path / "split" / "test" / "blue_triangle" / "prompts.safetensors"  # a new file, but among test images
    assert "inside the class folder" in error_line(tune(tmp_path / "split", out, coop_args))
    assert not out.exists()


@pytest.mark.parametrize("kind", ["text", "weights"])
def test_out_over_a_file_that_is_not_a_prompt_file_is_refused(kind, data, tmp_path, coop_args, clip_files,
                                                               no_images_read):
    """A notes file, or the backbone's own safetensors weights, is never overwritten by a prompt file."""
    out = tmp_path / "notes.txt"
    if kind == "text":
        out.write_text("mine")
    else:
        out = Path(shutil.copy(clip_files[1], tmp_path / "model.safetensors"))
    before = out.read_bytes()
    line = error_line(tune(data, out, coop_args))
    assert f"--out '{out}' is an existing file that is not a promptune prompt file" in line
    assert out.read_bytes() == before


def test_out_may_replace_an_earlier_prompt_file(data, tmp_path, coop_args, coop_prompts):
    out = Path(shutil.copy(coop_prompts, tmp_path / "prompts.safetensors"))
    result = tune(data, out, coop_args)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() != coop_prompts.read_bytes() and is_prompt_file(out)
    assert not lock_path(out).exists()


# ----------------------------------------------------------------------------------------------- read-only disks


def _refuse_writes_in(monkeypatch, folder: Path, code: int) -> None:
    """Simulate a file system that refuses new files in `folder` (tests run as root, which ignores permissions)."""
    real_mkstemp = fileio.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own keyword
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise OSError(code, os.strerror(code), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("code, cause", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_unwritable_out_fails_before_any_image_is_read(code, cause, data, tmp_path, coop_args, monkeypatch,
                                                      no_images_read):
    """`--out` on a read-only file system with --no-checkpoint trained to the end, then failed to write."""
    (tmp_path / "ro").mkdir()
    _refuse_writes_in(monkeypatch, tmp_path / "ro", code)
    out = tmp_path / "ro" / "prompts.safetensors"
    line = error_line(tune(data, out, coop_args, "--no-checkpoint"))
    assert f"Cannot write --out '{out}' ({cause})" in line
    assert sorted((tmp_path / "ro").iterdir()) == []


def test_unwritable_checkpoint_folder_names_the_cause(data, tmp_path, coop_args, monkeypatch, no_images_read):
    (tmp_path / "ro").mkdir()
    _refuse_writes_in(monkeypatch, tmp_path / "ro", errno.EROFS)
    folder = tmp_path / "ro" / "run.checkpoint"
    line = error_line(tune(data, tmp_path / "prompts.safetensors", coop_args, "--checkpoint-dir", folder))
    assert f"Cannot write checkpoints in '{folder}' (read-only file system)" in line


# -------------------------------------------------------------------------------------------------------- the lock


def _hold_lock(out: Path, pid: int) -> Path:
    path = lock_path(out)
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2024-01-01T00:00:00+00:00"}))
    return path


def test_a_second_tune_to_the_same_out_is_refused_while_the_first_holds_the_lock(data, tmp_path, coop_args,
                                                                                 coop_prompts, no_images_read):
    out = Path(shutil.copy(coop_prompts, tmp_path / "prompts.safetensors"))
    before = out.read_bytes()
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = _hold_lock(out, first.pid)
        held = lock.read_bytes()
        line = error_line(tune(data, out, coop_args))
        assert f"Another promptune tune (process {first.pid} on {socket.gethostname()}" in line
        assert f"is writing '{out}'" in line and "give another --out" in line
        assert lock.read_bytes() == held  # the first run's lock is never touched
        assert out.read_bytes() == before
        assert not (tmp_path / "prompts.checkpoint").exists()
    finally:
        first.kill()
        first.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(data, tmp_path, coop_args):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "prompts.safetensors"
    _hold_lock(out, gone.pid)
    result = tune(data, out, coop_args)
    assert result.exit_code == 0, result.output
    assert f"note: taking over the lock '{lock_path(out)}' of a run that no longer runs (process {gone.pid}" in result.stderr
    assert is_prompt_file(out) and not lock_path(out).exists()


def test_two_real_tune_processes_to_one_out(data, tmp_path, coop_args):
    """The first process holds the lock from its checks to its last write; a second run meanwhile is refused."""
    out = tmp_path / "prompts.safetensors"
    command = [sys.executable, "-m", "promptune", "tune", str(data), *coop_args, "--epochs", "100000",
               "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", str(out), "-q"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 240
        while not (out.with_name("prompts.checkpoint") / "checkpoint.json").exists():  # training, lock held
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.05)
        line = error_line(tune(data, out, coop_args))
        assert f"Another promptune tune (process {first.pid} on" in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143  # it stopped at our request, cleanly, and let go of its lock
    assert not lock_path(out).exists()


# ----------------------------------------------------------------------------- promptune's own folders are not data


class InterruptAtFirstStep(SilentReporter):
    def step(self, loss: float, acc: float, images_per_s: float) -> None:
        os.kill(os.getpid(), signal.SIGINT)


def test_a_checkpoint_inside_the_data_folder_is_not_a_class_and_the_run_resumes(data, clip_files):
    """The checkpoint folder `<out>.checkpoint/` in DATA_DIR was read as a fourth class, so resuming failed."""
    config, weights = clip_files
    options = dict(method="coop", backbone=str(config), weights=str(weights), epochs=2, shots=2, batch_size=2,
                   workers=0, device="cpu", out=data / "prompts.safetensors")
    with pytest.raises(RunInterrupted):
        promptune.tune(data, reporter=InterruptAtFirstStep(), **options)
    folder = data / "prompts.checkpoint"
    assert (folder / "checkpoint.json").is_file() and (folder / MARKER_NAME).is_file()
    assert sorted(scan_classes(data)) == ["blue_triangle", "green-circle", "red_square"]
    result = promptune.tune(data, resume=True, **options)
    assert result.class_names == ["blue_triangle", "green-circle", "red_square"]
    assert not folder.exists()  # removed with its marker once the prompt file is written


def test_a_report_inside_the_evaluated_folder_is_not_a_class(data, coop_prompts):
    for _ in range(2):  # the second eval finds the first one's report folder in DATA_DIR
        result = runner.invoke(app, ["eval", str(data), "--prompts", str(coop_prompts), "--report",
                                     str(data / "report"), "--device", "cpu", "--workers", "0", "--json", "--quiet"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["n_classes"] == 3
    assert (data / "report" / "confusion.png").is_file() and (data / "report" / MARKER_NAME).is_file()


def test_a_report_into_a_class_folder_is_refused(data, coop_prompts):
    """`eval --report data/red_square` wrote confusion.png among the images, and the next tune trained on it."""
    before = sorted(p.name for p in (data / "red_square").iterdir())
    result = runner.invoke(app, ["eval", str(data), "--prompts", str(coop_prompts), "--report",
                                 str(data / "red_square"), "--device", "cpu", "--workers", "0"])
    line = error_line(result)
    assert f"--report '{data / 'red_square'}' holds 3 images (a class folder?)" in line
    assert sorted(p.name for p in (data / "red_square").iterdir()) == before


def test_a_report_in_a_new_folder_below_a_class_folder_is_never_read_as_images(data, coop_prompts):
    result = runner.invoke(app, ["eval", str(data), "--prompts", str(coop_prompts), "--report",
                                 str(data / "red_square" / "report"), "--device", "cpu", "--workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert (data / "red_square" / "report" / "confusion.png").is_file()
    assert [p.name for p in scan_classes(data)["red_square"]] == ["000.png", "001.png", "002.png"]


# ------------------------------------------------------------------------------------------------------ predict


@pytest.fixture(scope="module")
def model(coop_prompts):
    return promptune.load(coop_prompts, device="cpu")


def _probabilities(predictions) -> list[list[float]]:
    return [p.probabilities for p in predictions]


def test_predict_takes_one_path_as_one_input(model, shape_folder):
    """`model.predict("photo.png")` iterated over the characters and read "/" as a folder."""
    image = sorted((shape_folder / "red_square").iterdir())[0]
    for single in (str(image), image):
        predictions, problems = model.predict(single, workers=0)
        assert problems == [] and [p.path for p in predictions] == [str(image)]
        assert len(predictions[0].labels) == 3 and sum(predictions[0].probabilities) == pytest.approx(1, abs=1e-5)


def test_predict_on_pil_images_and_tensors_equals_predict_on_the_file(model, shape_folder, tmp_path):
    files = sorted((shape_folder / "green-circle").iterdir())[:2]
    gray = tmp_path / "gray.png"
    Image.open(files[0]).convert("L").save(gray)
    reference, _ = model.predict([*files, gray], workers=0)
    pils = [Image.open(path).convert("RGB") for path in files]
    pixels = torch.stack([pil_to_tensor(image) for image in pils])  # (2, 3, H, W) uint8
    gray_pixels = pil_to_tensor(Image.open(gray))  # (1, H, W) uint8
    for inputs in ([*pils, gray_pixels], [pixels, gray_pixels], [pixels.float() / 255, gray_pixels.float() / 255],
                   [pixels[0], pixels[1], gray_pixels]):
        predictions, problems = model.predict(inputs, workers=0)
        assert problems == []
        assert [p.path for p in predictions] == ["<image 0>", "<image 1>", "<image 2>"]
        assert [p.labels for p in predictions] == [p.labels for p in reference]
        torch.testing.assert_close(torch.tensor(_probabilities(predictions)), torch.tensor(_probabilities(reference)),
                                   atol=1e-6, rtol=0)


def test_predict_keeps_input_order_across_files_and_images(model, shape_folder):
    files = sorted((shape_folder / "blue_triangle").iterdir())[:2]
    predictions, _ = model.predict([str(files[0]), Image.open(files[1]), files[1]], workers=0)
    assert [p.path for p in predictions] == [str(files[0]), "<image 0>", str(files[1])]
    assert predictions[1].probabilities == pytest.approx(predictions[2].probabilities, abs=1e-6)


@pytest.mark.parametrize("bad, words", [
    (5, "not int"),
    (b"photo.png", "not bytes"),
    ([["a.png"]], "not list"),
    ({"path": "a.png"}, "not dict"),
    (torch.zeros(2, 2), "(C, H, W) or (B, C, H, W) with 1 or 3 channels, not (2, 2)"),
    (torch.zeros(3, 8, 8, dtype=torch.int32), "must be uint8 (0-255) or float (0-1), not int32"),
    (torch.randn(3, 8, 8) * 3, "un-normalised pixels in [0, 1], not values from"),
])
def test_predict_refuses_other_inputs_naming_their_type(model, bad, words):
    with pytest.raises(PromptuneError) as caught:
        model.predict(bad, workers=0)
    message = str(caught.value)
    assert words in message and message.endswith(".") and not re.search(r"[.!?] [A-Z]", message), message


def test_predict_refuses_a_numpy_array_naming_its_type(model):
    numpy = pytest.importorskip("numpy")
    with pytest.raises(PromptuneError, match=r"not numpy\.ndarray\.$"):
        model.predict(numpy.zeros((8, 8, 3), dtype=numpy.uint8), workers=0)


def test_predict_on_a_folder_without_images_says_so(coop_prompts, tmp_path):
    """It said "no such file or image" for a folder that exists."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    (folder / "table.csv").write_text("x")
    (folder / ".hidden").write_text("x")
    result = runner.invoke(app, ["predict", str(folder), "--prompts", str(coop_prompts), "--device", "cpu", "-q"])
    assert result.exit_code == 1
    assert f"Error: {folder}: a folder with no images (2 files of other types skipped)." in result.stderr


# --------------------------------------------------------------------------------------- evaluating training images


def test_the_prompt_file_recognises_its_training_images_and_eval_warns(coop_prompts, shape_folder, shape_test_folder):
    """`eval` on the training folder reported inflated figures without a word."""
    recorded = load_prompt_file(coop_prompts).training["train_image_sha256"]
    on_disk = {fileio.file_sha256(path)[:12] for path in shape_folder.rglob("*.png")}
    assert len(recorded) == load_prompt_file(coop_prompts).training["train_images"] == 6  # 2 shots x 3 classes
    assert recorded == sorted(recorded) and set(recorded) <= on_disk and all(len(h) == 12 for h in recorded)

    args = ["--prompts", str(coop_prompts), "--device", "cpu", "--workers", "0", "--json", "--no-zero-shot"]
    on_training = runner.invoke(app, ["eval", str(shape_folder), *args])
    assert on_training.exit_code == 0, on_training.output
    assert json.loads(on_training.stdout)["training_images"] == 6
    assert ("warning: 6 of the 36 evaluated images were used to train this prompt file, so these figures overstate "
            "its accuracy on new images.") in on_training.stderr
    on_new = runner.invoke(app, ["eval", str(shape_test_folder), *args])
    assert json.loads(on_new.stdout)["training_images"] == 0 and "warning" not in on_new.stderr

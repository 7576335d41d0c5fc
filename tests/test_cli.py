"""The `promptune` command end to end (tune -> eval -> predict), --out safety and interrupted runs.

Every bad input (one sentence, no traceback) is a case in the table in test_bad_inputs.py.

click >= 8.2 keeps stdout and stderr apart in `CliRunner` results: `result.stdout` is what a pipe would get,
`result.stderr` holds warnings and errors, and `result.output` interleaves both.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import promptune
import promptune.run as tune_run
import promptune.artifact as artifact
from promptune.cli import app
from promptune.methods.coop import CoOp
from promptune.train import Trainer, TrainSummary

runner = CliRunner()


# ------------------------------------------------------------------------------------------------------- helpers


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_ok(result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output


def assert_user_error(result, *words: str, code: int | None = None) -> str:
    """Non-zero exit through SystemExit (not a crash), one 'Error: ...' sentence as the last line, no traceback."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), f"crashed with {result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    line = errors[0]
    assert result.stderr.strip().splitlines()[-1] == line, result.stderr
    assert line.endswith("."), line
    assert not re.search(r"[.!?] [A-Z]", line), f"more than one sentence: {line}"
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    return line


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that wrongly falls back to ./prompts.safetensors writes here


@pytest.fixture(scope="module")
def backbone_args(clip_files) -> list[str]:
    config, weights = clip_files
    return ["--method", "coop", "--backbone", str(config), "--weights", str(weights)]


@pytest.fixture(scope="module")
def fast(backbone_args) -> list[str]:
    return [*backbone_args, "--epochs", "2", "--batch-size", "12", "--workers", "0", "--device", "cpu", "--shots", "4"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, shape_folder, fast):
    out = tmp_path_factory.mktemp("cli") / "prompts.safetensors"
    result = invoke("tune", shape_folder, *fast, "--out", out)
    return result, out


@pytest.fixture(scope="module")
def prompts(tuned) -> Path:
    result, out = tuned
    assert_ok(result)
    return out


@pytest.fixture(scope="module")
def class_names(shape_folder) -> list[str]:
    return sorted(p.name for p in shape_folder.iterdir() if p.is_dir())


# ----------------------------------------------------------------------------------------------------- end to end


def test_tune_writes_the_prompt_file(tuned, class_names):
    result, out = tuned
    assert_ok(result)
    assert out.is_file()
    assert f"Wrote {out}" in result.stdout
    assert "Trained coop" in result.stdout and "for 2 epochs" in result.stdout
    assert "epoch 1:" in result.stderr and "epoch 2:" in result.stderr  # one line per epoch when not on a TTY
    assert promptune.load(out, device="cpu").trained_classes == class_names
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left behind


def test_tune_json_summary(shape_folder, fast, tmp_path, class_names):
    out = tmp_path / "p.safetensors"
    result = invoke("tune", shape_folder, *fast, "--epochs", "1", "--out", out, "--json")
    assert_ok(result)
    summary = json.loads(result.stdout)
    assert summary["prompt_file"] == str(out) and summary["method"] == "coop"
    assert summary["classes"] == class_names
    assert summary["train_per_class"] == {name: 4 for name in class_names}
    assert summary["epochs_run"] == 1
    assert "epoch 1:" not in result.stderr  # --json keeps the terminal for the JSON


def test_eval_json(prompts, shape_test_folder, class_names):
    result = invoke("eval", shape_test_folder, "--prompts", prompts, "--workers", "0", "--device", "cpu", "--json")
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["n_images"] == 30 and report["n_classes"] == 3
    for key in ("top1", "balanced_accuracy", "zero_shot_top1", "zero_shot_balanced_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert report["top5"] is None  # 3 classes: the true one is always in the top 5, so top-5 says nothing
    assert report["majority_baseline"] == 0.333333 and report["split"] == "all" and report["new_classes"] == []
    assert set(report["per_class"]) == set(class_names)
    assert report["skipped"] == []
    assert "coop prompts on tiny-clip.json" in result.stderr  # the header goes to stderr, not into the JSON


def test_eval_text(prompts, shape_test_folder, class_names):
    result = invoke("eval", shape_test_folder, "--prompts", prompts, "--workers", "0", "--device", "cpu", "--quiet")
    assert_ok(result)
    assert "top-1:" in result.stdout and "zero-shot CLIP top-1:" in result.stdout
    assert all(name in result.stdout for name in class_names)
    assert result.stderr == ""


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_predict_json_lines(prompts, shape_test_folder, class_names):
    image = shape_test_folder / class_names[0] / "000.png"
    result = invoke("predict", image, shape_test_folder / class_names[1], "--prompts", prompts, "--workers", "0",
                    "--device", "cpu", "--json")
    assert_ok(result)
    lines = _json_lines(result.stdout)
    assert len(lines) == 1 + 10
    assert lines[0]["path"] == str(image)
    for line in lines:
        assert set(line) == {"path", "predictions"}
        predictions = line["predictions"]
        assert len(predictions) == 3  # top-5 capped at the 3 classes
        assert all(set(p) == {"label", "probability"} for p in predictions)
        assert sorted(p["label"] for p in predictions) == class_names
        probabilities = [p["probability"] for p in predictions]
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probabilities)
        assert sum(probabilities) <= 1.0 + 1e-5


def test_predict_top_k_and_new_classes(prompts, shape_test_folder):
    folder = shape_test_folder / "red_square"
    result = invoke("predict", folder, "--prompts", prompts, "--workers", "0", "--device", "cpu", "--json",
                    "--top-k", "2", "--classes", "cat, dog, red square")
    assert_ok(result)
    lines = _json_lines(result.stdout)
    assert len(lines) == 10
    for line in lines:
        labels = [p["label"] for p in line["predictions"]]
        assert len(labels) == 2 and set(labels) <= {"cat", "dog", "red square"}
        assert sum(p["probability"] for p in line["predictions"]) <= 1.0 + 1e-5


def test_predict_text(prompts, shape_test_folder):
    image = shape_test_folder / "red_square" / "000.png"
    result = invoke("predict", image, "--prompts", prompts, "--workers", "0", "--device", "cpu", "--top-k", "1")
    assert_ok(result)
    assert result.stdout.startswith(f"{image}: ") and result.stdout.strip().endswith("%")


# ---------------------------------------------------------------------------------------------- help and version


def test_app_help_lists_the_commands():
    result = invoke("--help")
    assert_ok(result)
    for word in ("tune", "eval", "predict", "--version"):
        assert word in result.stdout


@pytest.mark.parametrize("command, options", [
    ("tune", ["--method", "--backbone", "--weights", "--shots", "--epochs", "--batch-size", "--lr", "--device", "--out",
              "--seed", "--ctx-init", "--n-ctx"]),
    ("eval", ["--prompts", "--json", "--device", "--batch-size", "--zero-shot"]),
    ("predict", ["--prompts", "--top-k", "--classes", "--json", "--device"]),
])
def test_command_help(command, options):
    result = invoke(command, "--help")
    assert_ok(result)
    assert f"promptune {command}" in result.stdout
    for option in options:
        assert option in result.stdout, option


def test_version():
    result = invoke("--version")
    assert_ok(result)
    assert result.stdout.strip() == f"promptune {promptune.__version__} (PyPI package promptune-vision)"


# ------------------------------------------------------------------------------------------ user mistakes
# Bad data folders, images, options and prompt files: the table in test_bad_inputs.py.


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device(shape_folder, fast, prompts, tmp_path):
    assert_user_error(invoke("tune", shape_folder, *fast, "--device", "cuda", "--out", tmp_path / "p.safetensors"), "CUDA")
    assert_user_error(invoke("eval", shape_folder, "--prompts", prompts, "--device", "cuda"), "CUDA")


# ------------------------------------------------------------------------------------ --out and interrupted tunes


def _must_not_run(*_args, **_kwargs):
    raise AssertionError("the command went on to load data or a backbone before checking --out")


def test_out_into_a_missing_folder_fails_before_training(shape_folder, fast, tmp_path, monkeypatch):
    monkeypatch.setattr(tune_run, "load_training_data", _must_not_run)
    monkeypatch.setattr(tune_run, "load_backbone", _must_not_run)
    result = invoke("tune", shape_folder, *fast, "--out", tmp_path / "missing" / "p.safetensors")
    assert_user_error(result, "missing", "does not exist")
    assert not (tmp_path / "missing").exists()


def test_out_is_a_folder(shape_folder, fast, tmp_path, monkeypatch):
    monkeypatch.setattr(tune_run, "load_training_data", _must_not_run)
    assert_user_error(invoke("tune", shape_folder, *fast, "--out", tmp_path), "folder")


@pytest.fixture()
def existing(prompts, tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return Path(shutil.copy(prompts, folder / "prompts.safetensors"))


def _assert_untouched(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp or partial file beside it
    promptune.load(path, device="cpu")


def test_interrupted_training_leaves_the_prompt_file_untouched(shape_folder, fast, existing, monkeypatch):
    before = existing.read_bytes()

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    result = invoke("tune", shape_folder, *fast, "--out", existing)
    assert_user_error(result, "interrupted", code=130)
    _assert_untouched(existing, before)


def test_diverged_training_leaves_the_prompt_file_untouched(shape_folder, fast, existing, monkeypatch):
    before = existing.read_bytes()
    real_loss = CoOp.training_loss

    def diverging(self, images, labels):
        loss, logits = real_loss(self, images, labels)
        return loss * float("nan"), logits

    monkeypatch.setattr(CoOp, "training_loss", diverging)
    result = invoke("tune", shape_folder, *fast, "--epochs", "1", "--out", existing)
    assert_user_error(result, "diverged", "--lr")
    _assert_untouched(existing, before)


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_failure_while_writing_leaves_the_prompt_file_untouched(shape_folder, fast, existing, monkeypatch, failure):
    before = existing.read_bytes()
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: TrainSummary())  # skip training: only the write matters
    real_save = artifact.save_file

    def dies_mid_write(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise failure

    monkeypatch.setattr(artifact, "save_file", dies_mid_write)
    result = invoke("tune", shape_folder, *fast, "--out", existing)
    assert_user_error(result, "interrupted" if isinstance(failure, KeyboardInterrupt) else "No space left")
    _assert_untouched(existing, before)

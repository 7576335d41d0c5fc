"""Silent traps, unclear messages and terminal polish (issue 10). The one-sentence errors are cases in the table of
test_bad_inputs.py; this file holds what needs more than a command line: warnings, image limits in loader workers,
the progress bar, Ctrl-C, a closed pipe, and --help."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import signal
import subprocess
import sys

import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

import promptune
import promptune.api
import promptune.run
import promptune.cli as cli
from promptune.cli import app
from promptune.methods.registry import METHOD_OPTIONS, METHODS, POOLS, SPT_INITS, method_flags
from promptune.methods.spt import SPT
from promptune.methods.vit_blocks import POOLS as VIT_POOLS
from promptune.stop import RunInterrupted

from conftest import make_shape_folder

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _flat(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------- class lists


def test_a_class_name_with_a_semicolon_among_several_warns_once(coop_prompts, shape_folder):
    image = sorted((shape_folder / "red_square").iterdir())[0]
    result = invoke("predict", image, image.parent, "--prompts", coop_prompts, "--classes", "cat; dog,bird", "--device",
                    "cpu", "--workers", "0", "-q")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: class name 'cat; dog' contains ';'; --classes separates names with commas, so if it "
                        "is several classes, write 'cat, dog'."]


# ---------------------------------------------------------------------------------------------- image limits


def test_max_image_pixels_reaches_the_loader_workers(coop_prompts, shape_folder, monkeypatch):
    """A real 20,000 x 20,000 photo was called a decompression bomb with no way out: --max-image-pixels sets the limit,
    in the worker processes too (each shape image is 40 x 40 = 1600 pixels)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the command sets it for the process
    image = sorted((shape_folder / "red_square").iterdir())[0]
    args = ["predict", image, "--prompts", coop_prompts, "--device", "cpu", "--workers", "1", "-q", "--json"]
    refused = invoke(*args, "--max-image-pixels", "1000")
    assert refused.exit_code == 1 and refused.stdout == ""
    assert (f"Error: {image}: unreadable image (1600 pixels is over the decompression-bomb limit of 1000 pixels; "
            f"--max-image-pixels raises it).") in refused.stderr
    allowed = invoke(*args, "--max-image-pixels", "1600")
    assert allowed.exit_code == 0 and json.loads(allowed.stdout)["path"] == str(image)
    bad = invoke(*args, "--max-image-pixels", "0")
    assert bad.exit_code == 1 and "Error: --max-image-pixels must be at least 1, got 0." in bad.stderr


def test_tiny_images_train_with_one_warning(tmp_path, coop_args):
    """1x1 px images trained silently; now one warning with a count (the tiny CLIP sees 32 px: under 4 px warns)."""
    data = make_shape_folder(tmp_path / "data", per_class=2)
    for path in list(data.rglob("*.png"))[:4]:
        Image.new("RGB", (1, 1), (200, 40, 40)).save(path)
    result = invoke("tune", data, *coop_args, "--epochs", "1", "--shots", "2", "--workers", "0", "--device", "cpu",
                    "--out", tmp_path / "p.safetensors", "--json")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "px on their shorter side" in line]
    assert warnings == ["warning: 4 of the 6 training images are under 4 px on their shorter side, while the backbone "
                        "sees 32 px: they are upscaled more than 8x, which leaves little to learn from."]


# ------------------------------------------------------------------------------------------ terminal and output


@pytest.mark.parametrize("epochs, words", [(1, "for 1 epoch in"), (2, "for 2 epochs in")])
def test_the_summary_counts_epochs_in_english(epochs, words, tmp_path, shape_folder, coop_args):
    result = invoke("tune", shape_folder, *coop_args, "--epochs", epochs, "--shots", "1", "--workers", "0",
                    "--device", "cpu", "--out", tmp_path / "p.safetensors", "-q")
    assert result.exit_code == 0, result.output
    assert words in result.stdout


def test_the_epoch_bar_shows_no_figures_before_the_first_step(monkeypatch):
    """It showed "loss 0.000 acc 0.0% 0 img/s" until the first step ended."""
    screen = Console(file=io.StringIO(), width=160, force_terminal=False)
    monkeypatch.setattr(cli, "_stderr_console", lambda: screen)
    reporter = cli.ProgressReporter()
    try:
        reporter.epoch_start(1, 3, 10)
        before = _render(reporter)
        reporter.step(0.5, 0.25, 12.0)
        after = _render(reporter)
    finally:
        reporter.close()
    assert "epoch 1/3" in before and "0/10" in before and "loss" not in before and "img/s" not in before
    assert "1/10" in after and "loss 0.500  acc 25.0%  12 img/s" in after


def _render(reporter: cli.ProgressReporter) -> str:
    console = Console(file=io.StringIO(), width=160)
    console.print(reporter.progress.get_renderable())
    return console.file.getvalue()


def test_ctrl_c_ends_the_progress_line_before_the_message(monkeypatch, tmp_path, shape_folder):
    """The "Interrupted by SIGINT ..." message was printed while the epoch bar was still drawn, on the same line."""
    events: list[str] = []

    class Recorded(cli.ProgressReporter):
        def close(self) -> None:
            events.append("bar closed")
            super().close()

    def interrupted(_run):
        raise RunInterrupted(signal.SIGINT, tmp_path / "p.checkpoint", "at epoch 1, step 2 of 5")

    monkeypatch.setattr(cli, "ProgressReporter", Recorded)
    monkeypatch.setattr(cli, "_show_progress", lambda quiet: True)
    monkeypatch.setattr(cli, "_warn", lambda message: events.append(message))
    monkeypatch.setattr(promptune.run.TuneRun, "run", interrupted)
    result = invoke("tune", shape_folder, "--out", tmp_path / "p.safetensors")
    assert result.exit_code == 130
    assert events[0] == "bar closed"
    assert events[1].startswith("Interrupted by SIGINT; saved a checkpoint at epoch 1, step 2 of 5")
    assert events[2].startswith("Resume with: promptune ")  # the command line as typed (here: pytest's)


def test_a_closed_pipe_ends_predict_quietly_with_exit_0(coop_prompts, tmp_path):
    """`promptune predict ... | head` exited 1 (and could print a traceback when Python flushed stdout at exit)."""
    folder = make_shape_folder(tmp_path / "many", per_class=20)
    classes = ",".join(f"class {i}" for i in range(60))  # 60 probabilities a line: far more output than a pipe holds
    command = [sys.executable, "-m", "promptune", "predict", str(folder), "--prompts", str(coop_prompts), "--classes",
               classes, "--top-k", "60", "--json", "-q", "--device", "cpu", "--workers", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.readline()
    process.stdout.close()  # what `head -1` does after its line
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, stderr
    assert json.loads(first)["path"].endswith(".png")
    assert stderr == ""


# ----------------------------------------------------------------------------------------------------------- --help


def test_help_lists_choices_and_real_defaults_without_python_types():
    tune = _flat(invoke("tune", "--help").stdout)
    for shown in ("--method [auto|sep|coop|spt|vpt]", "--device [auto|cuda|cuda:N|mps|cpu]",
                  "--precision [auto|fp32|bf16|fp16]", "--init [random|mean|max|kmeans]", "--depth [deep|shallow]",
                  "--pool [token|avg|max|avgmax|map|prr]", "--epochs N Training epochs. Default: sep 50, coop 50, spt 30, "
                  "vpt 30.", "--weight-decay WD Weight decay. Default: sep 0.0005, coop 0.0005, spt 0.01, vpt 0.01.",
                  "--n-ctx N [sep, coop] Learned text context tokens. Default: sep 6, coop 16.", "DATA_DIR Folder"):
        assert shown in tune, shown
    assert "the method's" not in tune
    predict = _flat(invoke("predict", "--help").stdout)
    assert "PATH Images, folders or glob patterns." in predict and "--max-image-pixels N" in predict
    for command in ("tune", "eval", "predict"):
        text = invoke(command, "--help").stdout
        assert not re.search(r"<\w+(\[\w+\])?>", text), f"a Python type in {command} --help"


def test_every_flag_a_message_names_exists():
    """The SEP option error listed --gate-init, which `tune` does not have ("No such option")."""
    tune = invoke("tune", "--help").stdout
    for method in METHODS:
        for flag in method_flags(method):
            assert re.search(rf"{flag}\b", tune), f"{flag} ({method}) is not a tune option"


def test_the_option_registry_matches_the_methods():
    """--help shows each method option's default from the registry: it must be the method's real default."""
    from promptune.methods.coop import DEFAULT_N_CTX

    resolved = {("coop", "n_ctx"): DEFAULT_N_CTX}  # None in its config: 16, or the --ctx-init phrase's length
    for option in METHOD_OPTIONS.values():
        for method, default in zip(option.methods, option.defaults):
            value = getattr(METHODS[method].load().Config(), option.field)
            assert (resolved.get((method, option.field)) if value is None else value) == default, (option.field, method)
        assert all(option.field in {f.name for f in dataclasses.fields(METHODS[m].load().Config)} for m in option.methods)
    assert POOLS == VIT_POOLS and SPT.init_choices == SPT_INITS


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from promptune.cli import app; "
            "r = CliRunner().invoke(app, ['tune', '--help']); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

"""Many processes on CPU (gloo, no GPU needed): what two processes learn, evaluate and predict equals one process's.

Why two processes with batch B can equal one process with batch 2B here: each step's images are split between the
ranks so that together they are exactly the one-process batch (same images, same augmentation seeds); every loss term
is a mean over the batch's images or independent of the batch, and each rank weights its mean by its share of the
step's images before DDP averages the gradients, so the average is the gradient of the global mean even when the
shares differ (the data below makes them differ, and leaves one rank without images in the last step). The tiny
backbones have no BatchNorm and no dropout, so nothing else depends on how a batch is split. What is left is float
summation order (and thread count): the learned tensors agree to ~1e-7, checked against 1e-5.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import promptune
from promptune.api import Scored
from promptune.checkpoint import INDEX_NAME, CheckpointError, default_checkpoint_dir
from promptune.cli import app
from promptune.data import SeededBatches, ShardedBatches
from promptune.errors import DataError, DeviceError
from promptune.launch import Place
from promptune.run import TuneOptions, TuneRun
from promptune.runtime import Runtime, _rank_device

from conftest import make_shape_folder

VOLATILE = {"seconds", "finished_at"}


# ------------------------------------------------------------------------------------------------ how batches split


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_ranks_batches_of_a_step_are_one_process_batch_of_batch_size_times_world(world):
    size, batch = 11, 2
    one = SeededBatches(size, batch * world, seed=4)
    ranks = [SeededBatches(size, batch, seed=4, rank=rank, world=world) for rank in range(world)]
    for epoch in (1, 2):
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        steps = [list(sampler) for sampler in ranks]
        assert {len(s) for s in steps} == {len(one)} == {-(-size // (batch * world))}  # same step count everywhere
        for k, whole in enumerate(one):
            parts = [steps[rank][k] for rank in range(world)]
            assert sorted(pair for part in parts for pair in part) == sorted(whole)  # (index, seed) pairs
            assert max(map(len, parts)) - min(map(len, parts)) <= 1  # shares differ by one image at most
    one.set_epoch(1)
    first = list(one)
    one.set_epoch(2)
    assert list(one) != first  # a new order every epoch
    ranks[0].set_epoch(2, start=1)
    assert list(ranks[0]) == steps[0][1:]  # resuming after step 1 continues with step 2, nothing else changes


def test_evaluation_shards_whole_batches_without_padding():
    size, batch, world = 23, 4, 3
    shards = [list(ShardedBatches(size, batch, rank, world)) for rank in range(world)]
    assert [len(ShardedBatches(size, batch, rank, world)) for rank in range(world)] == [2, 2, 2]
    batches = sorted(b for shard in shards for b in shard)
    assert batches == [list(range(i, min(i + batch, size))) for i in range(0, size, batch)]  # each image once
    shares = Scored.merge([Scored(sum(shard, []), {"x": torch.tensor(sum(shard, []), dtype=torch.float)}, [])
                           for shard in reversed(shards)])
    assert shares.indices == list(range(size)) and shares.outputs["x"].tolist() == list(range(size))


def test_each_process_takes_the_gpu_of_its_local_rank_or_is_refused():
    where = Place(rank=1, local_rank=1, world_size=2, local_world_size=2)
    assert _rank_device("cpu", where) == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"--device cuda:1 names one device, but each of the 2 processes"):
        _rank_device("cuda:1", where)
    with pytest.raises(DeviceError, match=r"Apple MPS runs one process"):
        _rank_device("mps", where)


@pytest.mark.parametrize("args, message", [
    (["--gpus", "2"], "--gpus 2 needs 2 CUDA GPUs, but this machine has none; add --device cpu"),
    (["--gpus", "0", "--device", "cpu"], "--gpus must be between 1 and 1024, got 0."),
    (["--gpus", "2", "--device", "cuda:1"], "CUDA GPU is available"),
    (["--gpus", "2", "--device", "cpu", "--epochs", "0"], "--epochs must be between 1 and 100000"),
])
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpus_mistakes_are_refused_before_any_process_starts(args, message, tmp_path):
    result = CliRunner().invoke(app, ["tune", str(tmp_path), "--out", str(tmp_path / "p.safetensors"), *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ") and message in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []  # refused before any process started or anything was written


def test_gpus_under_torchrun_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(app, ["tune", str(tmp_path), "--gpus", "2", "--device", "cpu"])
    assert result.exit_code == 1 and "--gpus starts its own processes; under torchrun leave it out" in result.stderr


def test_only_parameters_that_get_no_gradient_ask_ddp_to_search(clip_files, vit_file):
    """`has_unused_parameters` (find_unused_parameters) is true exactly when a learned parameter gets no gradient:
    SEP with proto_weight 0 (its prototypes) and SPT/VPT as a linear probe (no prompts); false otherwise."""
    from promptune.backbones import load_backbone
    from promptune.methods import get_method

    clip = load_backbone(str(clip_files[0]), str(clip_files[1]))
    vit = load_backbone("test_vit", str(vit_file))
    cases = [("sep", clip, {}), ("sep", clip, {"proto_weight": 0.0}), ("coop", clip, {"n_ctx": 2}),
             ("spt", vit, {}), ("spt", vit, {"prompts_per_layer": 0}), ("vpt", vit, {"depth": "shallow"})]
    for name, backbone, options in cases:
        cls = get_method(name)
        method = cls(backbone, ["a", "b", "c"], cls.make_config(options))
        method.train()
        size = backbone.preprocess.size
        loss, _ = method.training_loss(torch.randn(2, 3, size, size), torch.tensor([0, 2]))
        loss.backward()
        idle = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
        assert method.has_unused_parameters() == bool(idle), (name, options, idle)


# ---------------------------------------------------------------------------- two real processes: the runtime itself


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(rank: int, port: int, folder: str, clip_files: tuple[str, str], vit_file: str) -> None:
    """One of two processes joined the way torchrun joins them (its environment), on CPU with gloo."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", HF_HUB_OFFLINE="1")
    runtime = Runtime.create("cpu")
    assert (runtime.rank, runtime.world_size, runtime.distributed) == (rank, 2, True)
    assert runtime.all_sum([rank + 1, 1]) == [3.0, 2.0]
    assert runtime.any(rank == 1) and not runtime.any(False)
    assert runtime.broadcast(f"from {rank}") == "from 0"
    assert runtime.gather(rank * 10) == [0, 10]

    def only_rank_zero_runs_this() -> None:
        assert rank == 0
        raise DataError("rank 0 found a problem")

    try:
        runtime.on_primary(only_rank_zero_runs_this)
        raise AssertionError("on_primary swallowed the error")
    except DataError as error:
        assert str(error) == "rank 0 found a problem"  # raised on every rank, so none waits forever

    for method, backbone in (("spt", dict(backbone="test_vit", weights=vit_file)),
                             ("sep", dict(backbone=clip_files[0], weights=clip_files[1], shots=5))):
        run = TuneRun(TuneOptions(Path(folder), method=method, device="cpu", workers=0, batch_size=3, seed=2,
                                  checkpoint=False, out=Path(folder).parent / f"unused-{rank}.safetensors", **backbone))
        run.setup()
        built = run.build()
        run.prepare(built)
        prepared = {name: p.detach().clone() for name, p in built.model.named_parameters() if p.requires_grad}
        save_file(prepared, str(Path(folder).parent / f"{method}-rank{rank}.safetensors"))


def test_two_processes_prepare_identical_tensors_before_ddp(tmp_path, clip_files, vit_file):
    """Rank 0 alone scans the images, errors reach every rank, and the data-dependent initialisation is identical on
    both ranks before DDP wraps the model (SPT: the same seeded sample everywhere; SEP: class sums all-reduced)."""
    folder = make_shape_folder(tmp_path / "data", per_class=7, seed=9)
    paths = (str(clip_files[0]), str(clip_files[1]))
    mp.spawn(_two_ranks, args=(_free_port(), str(folder), paths, str(vit_file)), nprocs=2, join=True)
    for method, backbone in (("spt", dict(backbone="test_vit", weights=str(vit_file))),
                             ("sep", dict(backbone=paths[0], weights=paths[1], shots=5))):
        rank0, rank1 = (load_file(str(tmp_path / f"{method}-rank{r}.safetensors")) for r in (0, 1))
        run = TuneRun(TuneOptions(folder, method=method, device="cpu", workers=0, batch_size=3, seed=2,
                                  checkpoint=False, out=tmp_path / "one.safetensors", **backbone))
        run.setup()
        built = run.build()
        run.prepare(built)
        for name, p in built.model.named_parameters():
            if p.requires_grad:
                assert torch.equal(rank0[name], rank1[name]), (method, name)
                torch.testing.assert_close(rank0[name], p.detach(), atol=1e-6, rtol=0)  # = one process (SEP: sum order)


# ------------------------------------------------------------------------- the commands in two processes, end to end


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(), timeout=600)


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = make_shape_folder(tmp_path_factory.mktemp("ddp") / "data", per_class=9, seed=5)
    (folder / "red_square" / "broken.png").write_bytes(b"not an image")  # skipped by rank 0's scan, counted once
    return folder


def _spt(data: Path, vit_file: Path, out: Path, *extra: str) -> list[str]:
    # 21 training images, 2 images a step: 11 steps, and in the last one rank 1 has no image at all.
    return ["-m", "promptune", "tune", str(data), "--backbone", "test_vit", "--weights", str(vit_file), "--epochs", "5",
            "--seed", "3", "--device", "cpu", "--workers", "0", "--out", str(out), "--gpus", "2", "--batch-size", "1",
            *extra]


@pytest.fixture(scope="module")
def spt_two(data, vit_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spt2") / "prompts.safetensors"
    result = _run(_spt(data, vit_file, out, "-q"))
    assert result.returncode == 0, result.stderr
    return out


def _assert_same_training(two: dict, one: dict) -> None:
    for key in ("epochs_run", "best_epoch", "best_val_acc", "final_train_acc", "train_images", "val_images",
                "skipped_files", "epochs", "seed"):
        assert two[key] == one[key], key  # counts and accuracies are exact across ranks
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-5)
    assert (two["processes"], one["processes"]) == (2, 1) and two["batch_size"] * 2 == one["batch_size"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spt", "sep"])
def test_two_processes_learn_what_one_process_learns_with_twice_the_batch(method, data, vit_file, clip_files, spt_two,
                                                                       tmp_path):
    if method == "spt":
        two = spt_two
        one = promptune.tune(data, backbone="test_vit", weights=str(vit_file), epochs=5, seed=3, device="cpu",
                             workers=0, batch_size=2, out=tmp_path / "one.safetensors").path
    else:
        # 15 training images, 10 a step: the last step's 5 split 3 + 2; 12 validation images in batches of 5 per rank
        # split 7 + 5, so every count must be exact for the accuracies to match.
        two = tmp_path / "two" / "prompts.safetensors"
        two.parent.mkdir()
        clip = ["--backbone", str(clip_files[0]), "--weights", str(clip_files[1]), "--shots", "5"]
        result = _run(["-m", "promptune", "tune", str(data), *clip, "--epochs", "2", "--seed", "1", "--device", "cpu",
                       "--workers", "0", "--out", str(two), "--gpus", "2", "--batch-size", "5", "-q"])
        assert result.returncode == 0, result.stderr
        one = promptune.tune(data, backbone=str(clip_files[0]), weights=str(clip_files[1]), shots=5, epochs=2, seed=1,
                             device="cpu", workers=0, batch_size=10, out=tmp_path / "one.safetensors").path
    assert [p.name for p in two.parent.iterdir()] == [two.name]  # exactly one prompt file, no checkpoint left
    tensors_two, meta_two = _tensors(two)
    tensors_one, meta_one = _tensors(one)
    assert tensors_two.keys() == tensors_one.keys()
    difference = max(float((tensors_two[k] - tensors_one[k]).abs().max()) for k in tensors_one)
    print(f"\n{method}: max |learned tensor difference| 2 processes x batch B vs 1 process x batch 2B = {difference:.3g}")
    assert difference < 1e-5
    _assert_same_training(json.loads(meta_two["training"]), json.loads(meta_one["training"]))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_torchrun_eval_and_predict_print_what_one_process_prints(command, data, clip_files, tmp_path):
    prompts = tmp_path / "sep.safetensors"
    promptune.tune(data, backbone=str(clip_files[0]), weights=str(clip_files[1]), shots=3, epochs=1, device="cpu",
                   workers=0, out=prompts, checkpoint=False)
    test = make_shape_folder(tmp_path / "test", per_class=5, seed=8)
    (test / "green-circle" / "broken.png").write_bytes(b"\x89PNG broken")
    target = [str(test)] if command == "eval" else [str(test / "red_square"), str(test / "green-circle")]
    args = ["-m", "promptune", command, *target, "--prompts", str(prompts), "--weights", str(clip_files[1]),
            "--device", "cpu", "--workers", "0", "--batch-size", "4", "--json"]
    one = CliRunner().invoke(app, args[2:])  # one process, in this one
    two = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args])
    assert one.stdout and two.stdout == one.stdout  # 4 batches, 2 per rank, gathered back in input order
    assert two.stderr.count("sep prompts on") == 1  # rank 0 alone talks
    assert two.stderr.count("broken.png") == 1 and one.stderr.count("broken.png") == 1
    assert (two.returncode == 0) == (one.exit_code == 0) == (command == "eval")  # predict: exit 1 for the bad image


@pytest.mark.slow
def test_sigterm_to_two_processes_saves_one_checkpoint_and_resume_finishes_the_same(data, vit_file, spt_two, tmp_path):
    out = tmp_path / "prompts.safetensors"
    folder = default_checkpoint_dir(out)
    process = subprocess.Popen([sys.executable, *_spt(data, vit_file, out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 300
    while not (folder / INDEX_NAME).exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # to the launcher, which passes it on to both processes
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert stderr.count("Interrupted by SIGTERM; saved a checkpoint") == 1 and "Traceback" not in stderr
    assert "--gpus 2" in stderr.split("Resume with: ")[1] and not out.exists()
    index = json.loads((folder / INDEX_NAME).read_text())
    assert index["stopped_by"] == "SIGTERM" and index["run"]["processes"] == 2
    assert len(list(folder.glob("state-*.safetensors"))) == 1  # written once, by rank 0

    with pytest.raises(CheckpointError, match=r"differs from the checkpoint's in the number of processes \(2 in the "
                                              r"checkpoint, 1 now\)"):
        promptune.tune(data, backbone="test_vit", weights=str(vit_file), epochs=5, seed=3, device="cpu", workers=0,
                       batch_size=1, out=out, resume=True)

    resumed = _run(_spt(data, vit_file, out, "--resume", "-q"))
    assert resumed.returncode == 0, resumed.stderr
    tensors, meta = _tensors(out)
    reference, reference_meta = _tensors(spt_two)
    assert all(torch.equal(tensors[k], reference[k]) for k in reference)  # bit-identical to the uninterrupted run
    training, reference_training = json.loads(meta["training"]), json.loads(reference_meta["training"])
    assert {k: v for k, v in training.items() if k not in VOLATILE} == \
        {k: v for k, v in reference_training.items() if k not in VOLATILE}
    assert [p.name for p in tmp_path.iterdir()] == [out.name]

"""distributed.py: rank/world mapping, backends, precision back-ends, and the one-process-per-device
launcher running a real 2-process gloo training job that must match one process with twice the batch."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_WAVEGLOW, make_lj_corpus

import distributed
import train
from glow import WaveGlow

CPU = torch.device("cpu")


def test_rank_and_world_come_from_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert distributed.distributed_env(None, "cpu", env) == (3, 8, 1, "env")
    assert distributed.distributed_env(3, "cpu", env) == (3, 8, 1, "env")  # agreeing -r is fine
    with pytest.raises(ValueError, match="-r 2 conflicts with RANK=3"):
        distributed.distributed_env(2, "cpu", env)
    assert distributed.distributed_env(None, "cpu", {}) == (0, 1, 0, "single")


def test_upstream_rank_flag_maps_to_world_size_or_local_devices():
    assert distributed.distributed_env(0, "cpu", {}) == (0, 1, 0, "rank-flag")  # a CPU counts as one device
    assert distributed.distributed_env(1, "cpu", {"WORLD_SIZE": "2"}) == (1, 2, 0, "rank-flag")
    with pytest.raises(ValueError, match="outside the world of 2"):
        distributed.distributed_env(2, "cpu", {"WORLD_SIZE": "2"})


def test_backend_follows_the_device():
    assert distributed.choose_backend(CPU, "auto") == "gloo"
    assert distributed.choose_backend(CPU, "gloo") == "gloo"
    with pytest.raises(ValueError, match="dist_backend is 'nccl' but training runs on cpu"):
        distributed.choose_backend(CPU, "nccl")


def test_precision_backends_on_cpu(monkeypatch):
    monkeypatch.setattr(distributed, "cpu_supports_bf16", lambda: True)  # a CPU with bf16 units (test_precision.py)
    dtype, note = distributed.autocast_dtype(CPU, True)
    assert dtype == torch.bfloat16 and "bfloat16" in note
    assert distributed.autocast_dtype(CPU, True, "bfloat16") == (torch.bfloat16, "")
    assert distributed.autocast_dtype(CPU, True, "float16")[0] == torch.bfloat16  # no fp16 autocast on CPUs
    assert distributed.autocast_dtype(CPU, False, "bfloat16") == (None, "")
    assert not distributed.make_grad_scaler(CPU, dtype).is_enabled()  # bf16 needs no loss scaling
    assert distributed.make_grad_scaler(CPU, torch.float16).is_enabled()
    with pytest.raises(RuntimeError, match="--amp_backend apex needs a CUDA GPU or an Ascend NPU"):
        distributed.load_apex_amp(CPU)


def precision_config(**changes):
    return {"fp16_run": False, "amp_dtype": "auto", "amp_backend": "native", **changes}


def test_make_precision_picks_one_set_up_and_describes_it(monkeypatch):
    monkeypatch.setattr(distributed, "cpu_supports_bf16", lambda: True)  # a CPU with bf16 units (test_precision.py)
    plain = distributed.make_precision(CPU, precision_config())
    assert (plain.amp_dtype, plain.describe(), plain.uses_apex) == (None, "float32", False)
    assert plain.state_dict() == {"scaler": None, "amp": None}  # as a float32 checkpoint holds them
    with plain.autocast():
        assert not torch.is_autocast_enabled("cpu")
    low = distributed.make_precision(CPU, precision_config(fp16_run=True, amp_dtype="bfloat16"))
    assert (low.amp_dtype, low.describe(), low.note) == (torch.bfloat16, "torch.bfloat16", "")
    with low.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    scaled = distributed.Precision(CPU, torch.float16)
    assert scaled.describe() == "torch.float16 with a GradScaler" and scaled.state_dict()["scaler"]["scale"] > 1
    with pytest.raises(RuntimeError, match="--amp_backend apex needs a CUDA GPU"):
        distributed.make_precision(CPU, precision_config(fp16_run=True, amp_backend="apex"))
    # apex only where fp16_run asks for low precision at all
    assert distributed.make_precision(CPU, precision_config(amp_backend="apex")).describe() == "float32"


def tiny_step_setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    return model, torch.optim.Adam(model.parameters(), lr=0.1), torch.randn(4, 6)


@pytest.mark.parametrize("clip_norm", [float("inf"), 0.05])
def test_precision_backward_and_step_are_the_plain_float32_sequence(clip_norm):
    model, optimizer, x = tiny_step_setup()
    model.weight.grad = None
    model(x).pow(2).mean().backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    expected = [p.detach().clone() for p in model.parameters()]

    model, optimizer, x = tiny_step_setup()
    precision = distributed.make_precision(CPU, precision_config())
    norm = precision.backward(model(x).pow(2).mean(), optimizer, list(model.parameters()), clip_norm)
    precision.step(optimizer, finite=True)
    assert torch.equal(norm, expected_norm)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected, strict=True))


def test_a_step_that_is_not_finite_leaves_the_weights_alone():
    for precision in (distributed.make_precision(CPU, precision_config()), distributed.Precision(CPU, torch.float16)):
        model, optimizer, x = tiny_step_setup()
        before = [p.detach().clone() for p in model.parameters()]
        norm = precision.backward(model(x).sum() * float("inf"), optimizer, list(model.parameters()), float("inf"))
        assert not torch.isfinite(norm)
        precision.step(optimizer, finite=False)  # the GradScaler finds the overflow itself and skips the step
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_precision_state_round_trips_through_a_checkpoint_dict():
    source = distributed.Precision(CPU, torch.float16)
    model, optimizer, x = tiny_step_setup()
    source.backward(model(x).sum() * float("inf"), optimizer, list(model.parameters()), float("inf"))
    source.step(optimizer, finite=False)  # an overflow halves the loss scale
    state = source.state_dict()
    assert state["scaler"]["scale"] == 65536.0 / 2 and state["amp"] is None
    target = distributed.Precision(CPU, torch.float16)
    target.load_state_dict(state)
    assert target.state_dict() == state
    plain = distributed.Precision(CPU, None)
    plain.load_state_dict(state)  # a float32 run resumed from an fp16 one: nothing to load
    assert plain.state_dict() == {"scaler": None, "amp": None}


def test_launcher_splits_its_flags_from_train_flags():
    launcher, train_argv = distributed.launcher_args(["-c", "config.json", "--device", "cpu", "-batch_size", "4",
                                                      "--nproc_per_node", "2"])
    assert launcher.nproc_per_node == 2 and train_argv == ["-c", "config.json", "--device", "cpu", "-batch_size", "4"]
    assert distributed.torchrun_argv(launcher, "train.py", train_argv) == \
        ["--nproc_per_node=2", "--standalone", "train.py"] + train_argv
    launcher, _ = distributed.launcher_args(["--device", "cpu", "-c", "c.json"])
    assert launcher.nproc_per_node == 1  # one process on a CPU unless asked
    launcher, _ = distributed.launcher_args(["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1",
                                             "--nproc_per_node", "8"])
    assert distributed.torchrun_argv(launcher, "train.py", []) == [
        "--nproc_per_node=8", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500",
        "train.py"]


def test_two_ranks_with_batch_b_match_one_rank_with_batch_2b(tmp_path):
    """A real 2-process gloo job, started by the launcher (torchrun underneath), against one process.

    Clips exactly one segment long leave no random crop, and DistributedSampler hands the two ranks
    together the same clips as the single rank's double batch: the updates must agree.
    """
    segment = 2048
    wavs = sorted((make_lj_corpus(tmp_path / "LJSpeech", n_clips=8, seconds=segment / 22050) / "wavs").glob("*.wav"))
    (tmp_path / "train.txt").write_text("\n".join(map(str, wavs)) + "\n")
    config = {"train_config": {"batch_size": 2, "learning_rate": 1e-3, "workers": 0, "step_stop": 2, "device": "cpu"},
              "data_config": {"training_files": str(tmp_path / "train.txt"), "segment_length": segment},
              "waveglow_config": {**TINY_WAVEGLOW, "n_mel_channels": 20}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    common = ["-c", str(tmp_path / "config.json"), "--dist_timeout", "120"]

    result = subprocess.run([sys.executable, str(REPO / "distributed.py"), "--nproc_per_node", "2", *common,
                             "-output_directory", str(tmp_path / "two_ranks")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    two_ranks_log = result.stdout
    assert "on cpu x 2 processes" in two_ranks_log and "global batch 2 x 2 = 4 clips" in two_ranks_log
    assert json.loads((tmp_path / "two_ranks" / "config.json").read_text())["dist_config"]["dist_timeout"] == 120

    one_rank_log = io.StringIO()
    with contextlib.redirect_stdout(one_rank_log):
        assert train.main(common + ["-batch_size", "4", "-output_directory", str(tmp_path / "one_rank")]) == 0
    one_rank_log = one_rank_log.getvalue()

    def losses(log):  # rank 0 alone logs, once per iteration; the loss is averaged over the ranks
        return [(int(i), float(loss)) for i, loss in re.findall(r"^(\d+):\tloss:(\S+)\ttime:", log, re.M)]
    assert [i for i, _ in losses(two_ranks_log)] == [i for i, _ in losses(one_rank_log)] == [1, 2]
    for (_, two), (_, one) in zip(losses(two_ranks_log), losses(one_rank_log), strict=True):
        assert two == pytest.approx(one, abs=1e-6)
    two_ranks = torch.load(tmp_path / "two_ranks" / "waveglow_2", weights_only=True)
    one_rank = torch.load(tmp_path / "one_rank" / "waveglow_2", weights_only=True)
    assert two_ranks["samples_seen"] == one_rank["samples_seen"] == 8
    torch.manual_seed(1234)  # train.py's seed: the weights both runs started from
    initial = WaveGlow(**config["waveglow_config"]).state_dict()
    for name, weight in one_rank["model"].items():
        assert torch.allclose(two_ranks["model"][name], weight, atol=1e-6), name
        # two Adam steps move every weight (the first only the zero-initialised end layers)
        assert not torch.allclose(weight, initial[name], atol=1e-5), name


# Each rank: 100 broadcasts and 100 all-reduces through distributed.py, counting the all-reduces after which their tensor
# still had references beyond its own; then it leaves at once, as a rank with nothing to save does. torch._dynamo is imported first, as fused Adam
# imports it in training: from then on the group outlives destroy_process_group.
COLLECTIVES_PROBE = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import torch._dynamo
import distributed
dist.init_process_group("gloo")
rank, held = dist.get_rank(), 0
for i in range(100):
    assert distributed.broadcast_from_rank0(i if rank == 0 else -1, torch.device("cpu")) == i
    summed = torch.full((3,), float(rank + 1))
    before = summed._use_count()
    assert distributed.all_reduce_sum(summed).tolist() == [3.0] * 3
    held += summed._use_count() != before
print(f"rank {rank}: {held} collectives returned while the backend still held their tensor", flush=True)
distributed.cleanup_distributed()
"""


def test_collectives_return_only_once_gloo_has_let_go_of_their_tensors(tmp_path):
    """A gloo worker releases a finished operation's tensors a moment after the caller wakes, and needs the GIL to;
    in a process already in its exit, that aborted it (SIGABRT). distributed.py's collectives return only once
    the worker is done with their tensors."""
    (tmp_path / "probe.py").write_text(COLLECTIVES_PROBE)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(tmp_path / "probe.py"), str(REPO)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: 0 collectives returned while the backend still held their tensor" in result.stdout


# The fewest page faults of allocating, filling and freeing a 64 MiB tensor, over 4 tries each: outside the block,
# inside it (after a 96 MiB tensor and 3 such tensors have grown the heap) and after it; in a fresh interpreter,
# whose heap holds no free 64 MiB yet. The 96 MiB come first because a freed block of exactly 64 MiB may not
# serve the next one: a small block allocated after it (the layout varies with what was imported) keeps it from
# merging with the heap's top, and the next request needs its alignment on top of its size.
MEMORY_REUSE_PROBE = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import distributed
def fewest_faults(count=4):
    counts = []
    for _ in range(count):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(64 * 2 ** 18).sum()  # 4-byte floats, every page written
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts)
outside = fewest_faults()
with distributed.cpu_memory_reuse(torch.device("cpu")):
    torch.ones(96 * 2 ** 18).sum()  # a freed hole with room for 64 MiB and the small blocks allocated beside it
    fewest_faults(count=3)
    inside = fewest_faults()
print(distributed._glibc() is not None, outside, inside, fewest_faults())
"""


def test_cpu_training_reuses_freed_memory_and_leaves_malloc_as_it_was():
    probe = subprocess.run([sys.executable, "-c", MEMORY_REUSE_PROBE, str(REPO)], capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr
    has_glibc, outside, inside, after = probe.stdout.split()
    if has_glibc != "True":
        pytest.skip("cpu_memory_reuse tunes glibc's malloc; this platform has none, and the block changes nothing")
    outside, inside, after = int(outside), int(inside), int(after)
    if outside < 2 ** 13:  # 64 MiB is 16384 pages of 4 KiB; far fewer faults: huge pages or another allocator
        pytest.skip(f"a fresh 64 MiB buffer costs only {outside} page faults here (huge pages?): nothing to save")
    assert inside < outside / 20, (inside, outside)  # freed memory served the next tensor
    assert after > outside / 2, (after, outside)  # the block's end handed the memory back, as glibc does


def test_memory_reuse_leaves_malloc_alone_off_the_cpu(monkeypatch):
    def no_glibc_calls():
        raise AssertionError("cpu_memory_reuse tuned malloc for a GPU run")
    monkeypatch.setattr(distributed, "_glibc", no_glibc_calls)
    with distributed.cpu_memory_reuse(torch.device("cuda", 0)):
        pass
    with distributed.cpu_memory_reuse(CPU, enabled=False):  # bench.py's baseline rows
        pass

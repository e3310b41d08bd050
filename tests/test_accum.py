"""Gradient accumulation (train_config.grad_accum_steps): k micro-batches of B clips make the update of one batch
of k x B on the same clips and crops, DDP synchronises once per update, and iterations, throughput, checkpoints
and resume count updates."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import train
from config import ConfigError, resolve_config
from conftest import REPO, TINY_WAVEGLOW, make_lj_corpus, perturb_end_layers

LOSS_LINE = re.compile(r"^(\d+):\tloss:(\S+)\ttime:(\d+\.\d{9})\t$", re.M)
MODEL = {**TINY_WAVEGLOW, "n_mel_channels": 20}
NO_STOP = SimpleNamespace(signal_name=None)


def write_config(folder, training_files, name="config.json", **train_config):
    config = {"train_config": {"output_directory": str(folder / "out"), "epochs": 4, "learning_rate": 1e-3,
                               "iters_per_checkpoint": 1000, "workers": 0, "device": "cpu", **train_config},
              "data_config": {"training_files": str(training_files), "segment_length": 2048},
              "waveglow_config": MODEL}
    path = folder / name
    path.write_text(json.dumps(config))
    return path


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main([str(a) for a in argv])
    assert code == 0, err.getvalue()
    return out.getvalue()


def losses(log):
    return {int(i): float(loss) for i, loss, _ in LOSS_LINE.findall(log)}


def assert_close_tensors(a, b, rtol):
    """Each tensor of dict b within rtol of a's, relative to its norm. (Elementwise, Adam's division by the
    running gradient scale magnifies the rounding of near-zero gradients, which differs with the summation order.)"""
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert (b[name] - tensor).norm() <= rtol * tensor.norm(), name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("accum")
    wavs = sorted((make_lj_corpus(root / "LJSpeech", n_clips=12, seconds=0.5) / "wavs").glob("*.wav"))
    (root / "train.txt").write_text("\n".join(map(str, wavs)) + "\n")  # 12 clips: 3 updates of 4 per epoch
    return root


@pytest.fixture(scope="module")
def accumulated(corpus):
    """Batch 2 x 2 micro-batches: 5 updates, checkpoints at 2 (the end of an epoch's 2nd update) and 4."""
    folder = corpus / "accumulated"
    folder.mkdir()
    config = write_config(folder, corpus / "train.txt", batch_size=2, grad_accum_steps=2, step_stop=5,
                          iters_per_checkpoint=2)
    return {"config": config, "log": run(["-c", config]), "out": folder / "out"}


def one_update(corpus, folder, batch_size, grad_accum_steps):
    """(train_step's results, gradients, weights after the step) of one update on the corpus's first 4 clips,
    from the seeded weights with the end layers perturbed, so that every layer has a gradient."""
    folder = folder / f"batch{batch_size}_steps{grad_accum_steps}"  # a run's own output directory (its lock)
    folder.mkdir()
    config, _ = resolve_config(["-c", str(write_config(folder, corpus / "train.txt", batch_size=batch_size,
                                                       grad_accum_steps=grad_accum_steps))])
    run_ = train.set_up(config)
    torch.manual_seed(5)
    perturb_end_layers(run_.model, 0.05)
    clips = [run_.trainset[i] for i in range(4)]
    mel, audio = torch.stack([m for m, _ in clips]), torch.stack([a for _, a in clips])
    result = train.train_step(run_, NO_STOP, mel, audio)
    parameters = dict(run_.model.named_parameters())
    return result, {n: p.grad.clone() for n, p in parameters.items()}, {n: p.detach().clone() for n, p in
                                                                         parameters.items()}


def test_two_micro_batches_of_2_make_the_update_of_one_batch_of_4(corpus, tmp_path):
    (big_loss, big_norm, big_finite, _), big_grads, big_weights = one_update(corpus, tmp_path, 4, 1)
    (loss, norm, finite, _), grads, weights = one_update(corpus, tmp_path, 2, 2)
    assert big_finite and finite
    assert loss == pytest.approx(big_loss, rel=1e-6) and norm == pytest.approx(big_norm, rel=1e-6)
    assert all(g.norm() > 0 for g in big_grads.values())
    assert_close_tensors(big_grads, grads, rtol=1e-5)
    assert_close_tensors(big_weights, weights, rtol=1e-6)


def test_training_with_accumulation_follows_training_with_the_big_batch(corpus, accumulated):
    folder = corpus / "big_batch"
    folder.mkdir()
    big_log = run(["-c", write_config(folder, corpus / "train.txt", batch_size=4, step_stop=2)])
    big = torch.load(folder / "out" / "waveglow_2", weights_only=True)
    small = torch.load(accumulated["out"] / "waveglow_2", weights_only=True)
    assert_close_tensors(big["model"], small["model"], rtol=1e-6)
    for key in ("iteration", "epoch", "samples_in_epoch", "samples_seen"):
        assert small[key] == big[key], key
    assert small["samples_seen"] == 8 and small["samples_in_epoch"] == 8
    # the loss line reports the mean over the update's micro-batches: the big batch's loss
    for i in (1, 2):
        assert losses(accumulated["log"])[i] == pytest.approx(losses(big_log)[i], rel=1e-6, abs=1e-7)
    torch.manual_seed(1234)  # the runs' seed: the weights both started from
    initial = train.WaveGlow(**MODEL).state_dict()
    assert any(not torch.allclose(w, initial[n]) for n, w in small["model"].items())  # the updates did move them


def test_iterations_throughput_and_log_count_updates(accumulated):
    log = accumulated["log"]
    assert "12 training clips, global batch 2 x 1 x 2 micro-batches = 4 clips of 2048 samples, " \
           "3 iterations per epoch" in log
    assert list(losses(log)) == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in accumulated["out"].glob("waveglow_*")) == ["waveglow_2", "waveglow_4",
                                                                             "waveglow_5"]
    times = [float(t) for _, _, t in LOSS_LINE.findall(log)]
    fps = float(re.search(r"^Epoch 0 FPS:(\S+)$", log, re.M).group(1))
    assert fps == pytest.approx(3 * 4 / sum(times[:3]), rel=1e-5)  # 3 updates of 4 clips (fewer than 5: all timed)
    samples = float(re.search(r"^Epoch 0 samples/s:(\S+)$", log, re.M).group(1))
    assert samples == pytest.approx(fps * 2048, abs=0.1)
    last = torch.load(accumulated["out"] / "waveglow_5", weights_only=True)
    assert last["iteration"] == 5 and last["epoch"] == 1 and last["samples_in_epoch"] == 8 and \
        last["samples_seen"] == 20


def test_resume_in_the_middle_of_an_epoch_is_exact(corpus, accumulated):
    four = torch.load(accumulated["out"] / "waveglow_4", weights_only=True)
    assert four["epoch"] == 1 and four["samples_in_epoch"] == 4  # one update into epoch 1
    folder = corpus / "resumed"
    folder.mkdir()
    log = run(["-c", accumulated["config"], "-checkpoint_path", accumulated["out"] / "waveglow_4",
               "-output_directory", folder / "out"])
    assert "Resumed from" in log and "at iteration 4 (epoch 1, batch 1)" in log
    assert losses(log) == {5: losses(accumulated["log"])[5]}
    resumed = torch.load(folder / "out" / "waveglow_5", weights_only=True)
    uninterrupted = torch.load(accumulated["out"] / "waveglow_5", weights_only=True)
    assert all(torch.equal(resumed["model"][n], w) for n, w in uninterrupted["model"].items())


@pytest.fixture
def single_process_group(tmp_path):
    """A one-process gloo group, so that train.set_up wraps the model in DistributedDataParallel in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_synchronises_once_per_update(corpus, tmp_path, single_process_group):
    config, _ = resolve_config(["-c", str(write_config(tmp_path, corpus / "train.txt", batch_size=2,
                                                       grad_accum_steps=3))])
    run_ = train.set_up(config)
    assert isinstance(run_.model, torch.nn.parallel.DistributedDataParallel)
    all_reduces = []

    def counting_all_reduce(state, bucket):
        all_reduces.append(bucket.index())
        return default_hooks.allreduce_hook(state, bucket)
    run_.model.register_comm_hook(None, counting_all_reduce)
    clips = [run_.trainset[i] for i in range(6)]
    mel, audio = torch.stack([m for m, _ in clips]), torch.stack([a for _, a in clips])
    counts = []
    for clips_in_update in (2, 2, 6, 2):  # the first update lets DDP settle its buckets
        all_reduces.clear()
        *_, finite, _ = train.train_step(run_, NO_STOP, mel[:clips_in_update], audio[:clips_in_update])
        assert finite
        counts.append(len(all_reduces))
    assert counts[1] > 0 and counts[2] == counts[1] == counts[3]  # 3 micro-batches, one synchronisation


@pytest.mark.parametrize("bad_micro_batch", [0, 1])
def test_an_update_with_a_non_finite_micro_batch_is_skipped(corpus, tmp_path, bad_micro_batch):
    config, _ = resolve_config(["-c", str(write_config(tmp_path, corpus / "train.txt", batch_size=2,
                                                       grad_accum_steps=2))])
    run_ = train.set_up(config)
    clips = [run_.trainset[i] for i in range(4)]
    mel, audio = torch.stack([m for m, _ in clips]), torch.stack([a for _, a in clips])
    criterion, calls = run_.criterion, []

    def failing_criterion(output):
        calls.append(1)
        loss = criterion(output)
        return loss * float("inf") if len(calls) == bad_micro_batch + 1 else loss
    run_.criterion = failing_criterion
    before = {n: p.detach().clone() for n, p in run_.model.state_dict().items()}
    loss_value, _, finite, _ = train.train_step(run_, NO_STOP, mel, audio)
    assert len(calls) == 2 and not finite and not np.isfinite(loss_value)
    assert all(torch.equal(p, before[n]) for n, p in run_.model.state_dict().items())
    run_.criterion = criterion
    loss_value, norm, finite, _ = train.train_step(run_, NO_STOP, mel, audio)
    assert finite and np.isfinite(loss_value) and np.isfinite(norm)


def test_config_key_and_flags(corpus, tmp_path):
    config_path = write_config(tmp_path, corpus / "train.txt", batch_size=2)
    assert resolve_config(["-c", str(config_path)])[0]["train_config"]["grad_accum_steps"] == 1
    for flag in ("-grad_accum_steps", "--grad_accum_steps"):
        assert resolve_config(["-c", str(config_path), flag, "3"])[0]["train_config"]["grad_accum_steps"] == 3
    with pytest.raises(ConfigError, match=r"train_config\.grad_accum_steps must be positive"):
        resolve_config(["-c", str(config_path), "-grad_accum_steps", "0"])
    code_err = io.StringIO()
    with contextlib.redirect_stderr(code_err), contextlib.redirect_stdout(io.StringIO()):
        code = train.main(["-c", str(config_path), "-batch_size", "4", "-grad_accum_steps", "4"])
    assert code == 2 and "x 4 grad_accum_steps" in code_err.getvalue()  # 12 clips, 16 per update


def test_two_ranks_accumulating_match_two_ranks_with_double_batches(tmp_path):
    """Real 2-process gloo jobs (the launcher, torchrun underneath): batch 2 x 2 micro-batches against batch 4."""
    segment = 2048
    wavs = sorted((make_lj_corpus(tmp_path / "LJSpeech", n_clips=8, seconds=segment / 22050) / "wavs").glob("*.wav"))
    (tmp_path / "train.txt").write_text("\n".join(map(str, wavs)) + "\n")
    weights = {}
    for name, batch, steps in (("accumulated", 2, 2), ("double", 4, 1)):
        config = write_config(tmp_path, tmp_path / "train.txt", name=f"{name}.json", batch_size=batch,
                              grad_accum_steps=steps, step_stop=2, output_directory=str(tmp_path / name))
        result = subprocess.run([sys.executable, str(REPO / "distributed.py"), "--nproc_per_node", "2", "-c",
                                 str(config), "--dist_timeout", "120"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert "= 8 clips" in result.stdout and "1 iterations per epoch" in result.stdout
        weights[name] = (losses(result.stdout), torch.load(tmp_path / name / "waveglow_2", weights_only=True))
    (accumulated_losses, accumulated), (double_losses, double) = weights["accumulated"], weights["double"]
    assert list(accumulated_losses) == list(double_losses) == [1, 2]
    for i in (1, 2):
        assert accumulated_losses[i] == pytest.approx(double_losses[i], rel=1e-6, abs=1e-7)
    assert accumulated["samples_seen"] == double["samples_seen"] == 16
    assert_close_tensors(double["model"], accumulated["model"], rtol=1e-6)


def test_launcher_passes_accumulation_and_a_ready_list(corpus, accumulated, tmp_path):
    """test/train_finetune_1p.sh with --training_files (no --data_path) and --grad_accum_steps."""
    env = {**os.environ, "TEST_OUTPUT_DIR": str(tmp_path / "logs")}
    result = subprocess.run(["bash", str(REPO / "test" / "train_finetune_1p.sh"), f"--c={accumulated['config']}",
                             f"--training_files={corpus / 'train.txt'}", "--batch-size=2", "--grad_accum_steps=3",
                             f"--checkpoint_path={accumulated['out'] / 'waveglow_2'}", "--step_stop=2",
                             f"--output_directory={tmp_path / 'finetuned'}", "--device=cpu", "--workers=0"],
                            capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    log = (tmp_path / "logs" / "0" / "train_0.log").read_text()
    assert "-grad_accum_steps 3" in log and "global batch 2 x 1 x 3 micro-batches = 6 clips" in log
    assert "Warm start from" in log and list(losses(log)) == [1, 2]
    assert not (tmp_path / "logs" / "0" / "train_files.txt").exists()  # the given list, no split made
    summary = dict(line.split(" = ", 1) for line in
                   (tmp_path / "logs" / "0" / "WaveGlow_for_PyTorch_bs2_1p_acc.log").read_text().splitlines())
    assert float(summary["TrainingTime"]) == pytest.approx(2 * 3 * 1000 / float(summary["ActualFPS"]), abs=0.01)

"""Faults injected for real, each with what must follow: kill -9 of training (at random moments and halfway
through a checkpoint write), a full disk or a blocked destination while saving, a rank of a 2-process job that
dies or hangs, a data loader still alive at exit, a corpus of broken audio, a loss that diverges, bad config
files and bad inference inputs.

Covered elsewhere and not repeated here: SIGTERM / SIGINT (test_train.py), an injected NaN step and the stop
after too many (test_train.py), atomic save_checkpoint under a simulated full disk, truncated or foreign
checkpoints (test_checkpoint.py), each bad audio file in the dataset (test_mel2samp.py), bad mels and lists
given to inference (test_inference.py).
"""
import contextlib
import io
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_WAVEGLOW, make_lj_corpus, speechlike, write_wav

import inference
import train
from checkpoint import load_checkpoint, load_model, save_checkpoint
from glow import WaveGlow

MODEL = {**TINY_WAVEGLOW, "n_mel_channels": 20}  # 20 mel bands keep checkpoints small (the upsampler dominates)
LOSS_LINE = re.compile(r"^(\d+):\tloss:(\S+)\t", re.M)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    wavs = sorted((make_lj_corpus(root / "LJSpeech", n_clips=8) / "wavs").glob("*.wav"))
    (root / "train.txt").write_text("\n".join(map(str, wavs)) + "\n")  # 4 iterations of 2 clips per epoch
    return root


def write_config(folder, corpus, **train_config):
    config = {
        "train_config": {"output_directory": str(folder / "out"), "epochs": 1000, "batch_size": 2,
                         "learning_rate": 1e-3, "iters_per_checkpoint": 1, "iters_per_validation": 0,
                         "workers": 0, "device": "cpu", **train_config},
        "data_config": {"training_files": str(corpus / "train.txt"), "segment_length": 2048},
        "waveglow_config": MODEL,
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def run_in_process(argv):
    """train.main here: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def checkpoints(folder):
    """{iteration: path} of the checkpoints visible under their final names."""
    return {int(p.name.split("_")[1]): p for p in folder.glob("waveglow_*")}


def wait_for(condition, what, timeout, process=None):
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the process ended (exit code {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout} s waiting for {what}")
        time.sleep(0.02)


def children(pid):
    found = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(child) for child in f.read().split()]
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has finished
    except OSError:
        return False


@pytest.fixture
def spawn(tmp_path):
    """Starts Python scripts with their output in files (no pipe to fill); kills whatever is left at the end."""
    started = []

    def start(argv, name, env=None):
        with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
            process = subprocess.Popen([sys.executable, *map(str, argv)], cwd=tmp_path, stdout=out, stderr=err,
                                       env=env or ENV)
        process.out = lambda: (tmp_path / f"{name}.out").read_text(errors="replace")
        process.err = lambda: (tmp_path / f"{name}.err").read_text(errors="replace")
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:  # not reaped yet, so its pid (and its children's) cannot be anyone else's
            for pid in children(process.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
        process.wait(timeout=30)


# ---- kill -9 -------------------------------------------------------------------------------------------

STALLING_TRAIN = '''"""train.py whose Nth checkpoint write stops halfway, as on a stuck disk, and says so on stderr."""
import io, os, runpy, sys, time
import torch

repo, stall_at = sys.argv[1], int(sys.argv[2])
real_save, saves = torch.save, []


def stalling_save(obj, f, *args, **kwargs):
    saves.append(obj.get("iteration"))
    if len(saves) != stall_at:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[:len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    print(f"STALLED writing iteration {saves[-1]}", file=sys.stderr, flush=True)
    time.sleep(600)


torch.save = stalling_save
sys.path.insert(0, repo)
sys.argv = [os.path.join(repo, "train.py")] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_kill_9_at_random_moments_and_mid_save_then_resume_matches_an_uninterrupted_run(tmp_path, corpus, spawn):
    step_stop = 40
    config = write_config(tmp_path, corpus, step_stop=step_stop)
    out = tmp_path / "out"
    (tmp_path / "stalling_train.py").write_text(STALLING_TRAIN)
    delays = random.Random(20240611)
    newest, partial = None, None
    for attempt, how in enumerate(["at random", "mid-save", "at random", "not at all"]):
        resume = ["-checkpoint_path", newest] if newest else []
        if how == "mid-save":
            process = spawn([tmp_path / "stalling_train.py", REPO, 3, "-c", config, *resume], f"run{attempt}")
        else:
            process = spawn([REPO / "train.py", "-c", config, *resume], f"run{attempt}")
        if newest:
            wait_for(lambda process=process: "Resumed from" in process.out(), "the resume", 120, process)
            assert f"at iteration {int(newest.name.split('_')[1])} " in process.out()
        if partial:  # the hidden half file of the save killed in the previous run is cleaned away
            wait_for(lambda process=process: "removed 1 partial checkpoint file" in process.out(), "the clean-up note", 60, process)
            assert not partial.exists()
            partial = None
        if how == "not at all":
            assert process.wait(timeout=120) == 0, process.err()
            break
        if how == "mid-save":
            wait_for(lambda process=process: "STALLED" in process.err(), "the stalled save", 120, process)
            stalled = int(re.search(r"STALLED writing iteration (\d+)", process.err()).group(1))
            assert not (out / f"waveglow_{stalled}").exists(), "a half-written checkpoint under its final name"
            (partial,) = out.glob(f".waveglow_{stalled}.*.tmp")  # the half file, hidden
            assert partial.stat().st_size > 0
        else:
            wait_for(lambda process=process: LOSS_LINE.search(process.out()), "the first training step", 120, process)
            time.sleep(delays.uniform(0.0, 0.5))
        assert process.poll() is None, "the run finished before it could be killed"
        process.kill()
        assert process.wait(timeout=30) == -signal.SIGKILL
        # Whatever the moment, every checkpoint under its final name is whole and says what it is.
        saved = checkpoints(out)
        for iteration, path in saved.items():
            assert load_checkpoint(path)["iteration"] == iteration
        if how == "mid-save":
            assert max(saved) == stalled - 1
        newest = saved[max(saved)] if saved else None  # none yet: the next run starts afresh
        json.loads((out / "config.json").read_text())
    resumed_log = process.out()

    # The same run, never interrupted, checkpointing only at the end
    code, reference_log, err = run_in_process(["-c", config, "-output_directory", tmp_path / "reference",
                                               "-iters_per_checkpoint", 1000])
    assert code == 0, err
    reference = torch.load(tmp_path / "reference" / f"waveglow_{step_stop}", weights_only=True)
    final = torch.load(out / f"waveglow_{step_stop}", weights_only=True)
    resumed_losses = dict(LOSS_LINE.findall(resumed_log))
    assert resumed_losses and resumed_losses == {i: loss for i, loss in LOSS_LINE.findall(reference_log)
                                                 if i in resumed_losses}
    for name, weight in reference["model"].items():
        torch.testing.assert_close(final["model"][name], weight, rtol=0, atol=1e-7, msg=name)
    assert final["samples_seen"] == reference["samples_seen"] == 2 * step_stop
    assert not list(out.glob(".*.tmp"))


# ---- saving fails --------------------------------------------------------------------------------------

def test_disk_full_on_the_second_save_stops_cleanly_and_keeps_the_first(tmp_path, corpus, monkeypatch):
    real_save, calls = torch.save, []

    def disk_fills_up(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"the first bytes of a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_fills_up)
    code, log, err = run_in_process(["-c", write_config(tmp_path, corpus, step_stop=5)])
    monkeypatch.undo()
    out = tmp_path / "out"
    assert code == 1
    assert f"could not save checkpoint {out / 'waveglow_2'}: [Errno 28] No space left on device" in err
    assert f"the newest complete checkpoint of this run is {out / 'waveglow_1'}" in err
    assert "Traceback" not in err and max(int(i) for i, _ in LOSS_LINE.findall(log)) == 2  # stopped there
    assert sorted(os.listdir(out)) == ["config.json", "waveglow_1"]  # no half file left behind
    assert load_checkpoint(out / "waveglow_1")["iteration"] == 1
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "waveglow_1").stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any new file, not private
    code, log, err = run_in_process(["-c", write_config(tmp_path, corpus, step_stop=2),
                                     "-checkpoint_path", out / "waveglow_1"])
    assert code == 0 and "Resumed from" in log, err


def test_a_blocked_checkpoint_name_or_output_folder_is_a_clear_error(tmp_path, corpus):
    out = tmp_path / "out"
    (out / "waveglow_2").mkdir(parents=True)  # something squats the name the 2nd checkpoint must take
    (out / "waveglow_2" / "keep").write_text("not ours to remove")
    code, _, err = run_in_process(["-c", write_config(tmp_path, corpus, step_stop=4)])
    assert code == 1 and f"could not save checkpoint {out / 'waveglow_2'}" in err and "Is a directory" in err
    assert load_checkpoint(out / "waveglow_1")["iteration"] == 1
    assert sorted(os.listdir(out)) == ["config.json", "waveglow_1", "waveglow_2"]
    assert os.listdir(out / "waveglow_2") == ["keep"]

    (tmp_path / "a_file").write_text("")
    code, _, err = run_in_process(["-c", write_config(tmp_path, corpus, output_directory=str(tmp_path / "a_file"))])
    assert code == 1 and f"cannot write to output_directory {tmp_path / 'a_file'}" in err and "Traceback" not in err


# ---- a rank dies or hangs ------------------------------------------------------------------------------

def worker_pids(process, world_size):
    """{rank: pid} of train.py processes started under `process` (the launcher), once all are up."""
    found = {}

    def all_up():
        for pid in children(process.pid):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
                if b"RANK" in env:
                    found[int(env[b"RANK"])] = pid
        return len(found) == world_size
    wait_for(all_up, "the training processes", 60, process)
    return found


LEAKED_LOADER = """
import torch, train
class Numbers(torch.utils.data.Dataset):
    def __len__(self): return 100
    def __getitem__(self, i): return torch.tensor(i)
loader = torch.utils.data.DataLoader(Numbers(), batch_size=2, num_workers=1, worker_init_fn=train.ignore_stop_signals)
batches = iter(loader)
next(batches)
cycle = [batches]
cycle.append(cycle)  # the worker's loader survives until exit, as when a traceback keeps a loop's frame
del batches, cycle
print("leaving", flush=True)
"""


def test_a_loader_left_alive_at_exit_does_not_hang_the_process():
    """train.py's DataLoader workers ignore SIGTERM (so a stop signal to the group lets the step finish), which
    is what multiprocessing sends them at exit before it waits for them: it must not wait forever."""
    result = subprocess.run([sys.executable, "-c", LEAKED_LOADER], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "leaving\n", result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_a_killed_rank_ends_the_whole_job_quickly(tmp_path, corpus, spawn):
    config = write_config(tmp_path, corpus, iters_per_checkpoint=1000)
    launcher = spawn([REPO / "distributed.py", "--nproc_per_node", 2, "-c", config, "--dist_timeout", 60], "job")
    ranks = worker_pids(launcher, 2)
    wait_for(lambda: LOSS_LINE.search(launcher.out()), "the first training step", 120, launcher)
    killed = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    try:
        code = launcher.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the job still runs 90 s after one of its ranks was killed")
    assert code != 0 and time.monotonic() - killed < 60
    assert "a training process failed" in launcher.err()
    wait_for(lambda: not alive(ranks[0]), "rank 0 to be gone", 10)


def test_a_hung_rank_times_the_other_out_after_dist_timeout(tmp_path, corpus, spawn):
    """Upstream's `-r RANK` launch, no supervising launcher: a stopped peer must not block rank 0 forever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = json.loads(write_config(tmp_path, corpus, iters_per_checkpoint=1000).read_text())
    config["dist_config"] = {"dist_url": f"tcp://127.0.0.1:{port}", "dist_timeout": 5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = {**ENV, "WORLD_SIZE": "2"}
    ranks = [spawn([REPO / "train.py", "-c", tmp_path / "config.json", "-r", rank], f"rank{rank}", env)
             for rank in (0, 1)]
    wait_for(lambda: LOSS_LINE.search(ranks[0].out()), "the first training step", 120, ranks[0])
    ranks[1].send_signal(signal.SIGSTOP)  # alive but silent, as a wedged host or a stuck device would be
    stopped = time.monotonic()
    try:
        code = ranks[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("rank 0 still waits 60 s after its peer stopped, with dist_timeout 5 s")
    assert code != 0 and time.monotonic() - stopped < 30
    assert re.search("timed out|timeout", ranks[0].err(), re.I)


# ---- broken audio in a real run ------------------------------------------------------------------------

def broken_corpus(folder):
    """Good clips, awkward but usable files and unusable ones, listed with blank lines and a Latin-1 name and
    transcript; returns (list path, number of files whose headers pass)."""
    folder.mkdir()
    paths = [write_wav(folder / f"good_{i}.wav", speechlike(0.2, f0=100 + 10 * i, seed=i)) for i in range(9)]
    whole = write_wav(folder / "cut_short.wav", speechlike(0.2, seed=20)).read_bytes()
    (folder / "cut_short.wav").write_bytes(whole[:len(whole) // 2])  # header promises more than is there
    paths.append(folder / "cut_short.wav")
    paths.append(write_wav(folder / "rate_44100.wav", speechlike(0.2, 44100, seed=21), 44100))
    paths.append(write_wav(folder / "stereo.wav", np.stack([speechlike(0.2, seed=22)] * 2, axis=1)))
    paths.append(write_wav(folder / "eight_bit.wav", speechlike(0.2, seed=23), subtype="PCM_U8"))
    latin1 = os.fsencode(folder) + b"/caf\xe9.wav"  # a Latin-1 name: not valid UTF-8
    os.rename(os.fsencode(write_wav(folder / "latin1.wav", speechlike(0.2, seed=24))), latin1)
    for name, bad_value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        audio = speechlike(0.2, seed=25)
        audio[1000] = bad_value
        paths.append(write_wav(folder / name, audio, subtype="FLOAT"))
    (folder / "empty.wav").write_bytes(b"")
    (folder / "noise.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    (folder / "header_only.wav").write_bytes(whole[:44])
    write_wav(folder / "one_sample_short_of_a_hop.wav", speechlike(0.2)[:255])
    unusable = ["empty.wav", "noise.wav", "header_only.wav", "one_sample_short_of_a_hop.wav", "missing.wav"]
    lines = [os.fsencode(p) for p in paths[:3]] + [b"", b"   "] + [os.fsencode(p) for p in paths[3:]]
    lines += [os.fsencode(folder / name) for name in unusable] + [latin1 + b"|d\xe9j\xe0 vu, a Latin-1 transcript"]
    listing = folder.parent / "train.txt"
    listing.write_bytes(b"\n".join(lines) + b"\n\n")
    return listing, len(paths) + 1


def test_a_corpus_of_broken_files_trains_with_a_skip_count_or_stops_in_strict_mode(tmp_path, spawn):
    listing, usable_headers = broken_corpus(tmp_path / "wavs")
    assert usable_headers == 16  # 8 iterations of 2 per epoch: every file is drawn in epoch 0
    config = write_config(tmp_path, tmp_path, step_stop=10, iters_per_checkpoint=1000, workers=1)
    assert json.loads(config.read_text())["data_config"]["training_files"] == str(listing)
    process = spawn([REPO / "train.py", "-c", config], "lenient")  # workers in their own processes, as usual
    assert process.wait(timeout=120) == 0, process.err()
    log, warnings = process.out(), process.err()
    assert "16 training clips" in log and "Reached step_stop 10" in log
    assert "note: 7 unusable training files skipped so far" in log  # 5 by their headers, 2 when read
    assert "skipping 5 of 21 listed files are unusable" in warnings and "empty.wav" in warnings
    for name in ("nan.wav", "inf.wav"):
        assert re.search(rf"skipping \S*{name}: contains NaN or infinite samples", warnings)
    for name in ("cut_short", "rate_44100", "stereo", "eight_bit", "caf", "good_"):
        assert not re.search(rf"skipping [^\n]*{name}", warnings.split("listed files are unusable")[1]), name
    final = torch.load(tmp_path / "out" / "waveglow_10", weights_only=True)
    assert all(torch.isfinite(weight).all() for weight in final["model"].values())

    # strict mode: the run refuses the list, naming the files, before it writes anything
    code, _, err = run_in_process(["-c", config, "-strict_data", "true", "-output_directory", tmp_path / "strict"])
    assert code == 1 and "5 of 21 listed files are unusable" in err and str(tmp_path / "wavs" / "empty.wav") in err
    assert not (tmp_path / "strict").exists()
    # ... and a file that only fails when read, inside a DataLoader worker, stops it with its name, no traceback
    nan_list = tmp_path / "nan_list.txt"
    nan_list.write_text("".join(f"{tmp_path / 'wavs' / name}\n" for name in ["good_0.wav", "good_1.wav", "nan.wav"]))
    code, _, err = run_in_process(["-c", config, "-strict_data", "true", "-training_files", nan_list,
                                   "-batch_size", 1, "-output_directory", tmp_path / "strict"])
    assert code == 1 and f"error: {tmp_path / 'wavs' / 'nan.wav'}: contains NaN or infinite samples" in err
    assert "Traceback" not in err


# ---- divergence ----------------------------------------------------------------------------------------

def test_a_really_diverging_run_stops_and_its_last_checkpoint_is_finite_and_loads(tmp_path, corpus):
    code, log, err = run_in_process(["-c", write_config(tmp_path, corpus, learning_rate=10.0, max_nonfinite_steps=3,
                                                        step_stop=20)])
    assert code == 1 and "3 non-finite steps in a row" in err
    losses = [(int(i), float(loss)) for i, loss in LOSS_LINE.findall(log)]
    last_finite = max(i for i, loss in losses if math.isfinite(loss))
    assert 1 <= last_finite < losses[-1][0] and losses[-1][0] - last_finite == 3  # three bad steps in a row
    named = int(re.search(r"the last checkpoint, waveglow_(\d+) in", err).group(1))
    assert sorted(checkpoints(tmp_path / "out")) == list(range(1, named + 1))
    model, _ = load_model(tmp_path / "out" / f"waveglow_{named}")
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())
    kept = load_checkpoint(tmp_path / "out" / f"waveglow_{named}")["model"]
    good = load_checkpoint(tmp_path / "out" / f"waveglow_{last_finite}")["model"]
    assert all(torch.equal(kept[name], weight) for name, weight in good.items())  # skipped steps changed nothing


# ---- config --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, code, message", [
    (lambda c: c["data_config"].update(hop_length=300), 2, "values that work for hop 300: 2, 4, 6, 10, 12,"),
    (lambda c: c["train_config"].update(learning_rate=math.inf), 2, "learning_rate must be a finite number"),
    (lambda c: c["train_config"].update(sigma=-1.0), 2, "train_config.sigma must be positive"),
    (lambda c: c["train_config"].update(batch_size=2.5), 2, "train_config.batch_size must be an integer"),
    (lambda c: c["train_config"].update(iters_per_checkpoint=0), 2, "iters_per_checkpoint must be positive"),
    (lambda c: c["waveglow_config"].update(n_flows=0), 2, "n_flows must be a positive integer"),
    (lambda c: c["waveglow_config"].update(n_early_size=8), 2, "n_early_size=8 is too large"),
    (lambda c: c["waveglow_config"]["WN_config"].update(dropout=0.1), 2, "unknown key waveglow_config.WN_config"),
    (lambda c: c["waveglow_config"]["WN_config"].update(n_channels=-16), 2, "n_channels'] must be a positive"),
    (lambda c: [c], 2, "must hold a JSON object"),
    (lambda c: b"{\"train_config\": {\"output_directory\": \"caf\xe9\"}}", 2, "is not valid JSON"),
])
def test_bad_config_files_are_errors_naming_the_key(tmp_path, corpus, change, code, message):
    path = write_config(tmp_path, corpus)
    config = json.loads(path.read_text())
    changed = change(config)
    if isinstance(changed, bytes):
        path.write_bytes(changed)
    else:
        path.write_text(json.dumps(config if changed is None else changed))
    got, _, err = run_in_process(["-c", path])
    assert got == code and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_folder_as_config_file_is_an_error(tmp_path):
    code, _, err = run_in_process(["-c", tmp_path])
    assert code == 2 and f"cannot read config file {tmp_path}" in err


# ---- inference inputs ----------------------------------------------------------------------------------

def test_inference_refuses_broken_checkpoints_and_still_makes_the_good_files(tmp_path, capsys):
    config = {"waveglow_config": {**TINY_WAVEGLOW, "WN_config": dict(TINY_WAVEGLOW["WN_config"])}}
    torch.manual_seed(0)
    weights = WaveGlow(**config["waveglow_config"]).state_dict()
    good = tmp_path / "waveglow_5"
    save_checkpoint(good, {"model": weights, "config": config, "iteration": 5, "format": "waveglow-pytorch"})
    torch.save(torch.randn(80, 6) - 4, tmp_path / "good.pt")
    torch.save(torch.full((80, 6), math.inf), tmp_path / "inf.pt")
    torch.save(torch.zeros(80, 0), tmp_path / "no_frames.pt")
    whole = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "list.txt").write_text("inf.pt\ngood.pt\nno_frames.pt\ncut.pt\n")
    args = ["-f", str(tmp_path / "list.txt"), "--seed", "0"]
    assert inference.main(args + ["-w", str(good), "-o", str(tmp_path / "out")]) == 1
    assert os.listdir(tmp_path / "out") == ["good_synthesis.wav"]
    errors = capsys.readouterr().err
    assert f"{tmp_path / 'inf.pt'}: the mel contains NaN or infinite values" in errors
    assert f"{tmp_path / 'no_frames.pt'}: mel of shape (80, 0)" in errors
    assert f"{tmp_path / 'cut.pt'}: cannot read it" in errors and "3 of 4 inputs failed" in errors

    truncated = tmp_path / "truncated_checkpoint"
    truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 3])
    wider = tmp_path / "wider_checkpoint"
    save_checkpoint(wider, {"model": weights, "format": "waveglow-pytorch", "config": {"waveglow_config": {
        **TINY_WAVEGLOW, "WN_config": {"n_layers": 2, "n_channels": 32, "kernel_size": 3}}}})
    for checkpoint, reason in ((truncated, "truncated, corrupt or not a PyTorch checkpoint"),
                               (wider, "another architecture")):
        assert inference.main(args + ["-w", str(checkpoint), "-o", str(tmp_path / f"out_{checkpoint.name}")]) == 1
        errors = capsys.readouterr().err
        assert "error: " in errors and str(checkpoint) in errors and reason in errors and "Traceback" not in errors
        assert not (tmp_path / f"out_{checkpoint.name}").exists()  # refused before anything was made

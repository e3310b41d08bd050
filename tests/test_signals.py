"""Stopping and resuming through the launchers, and one run per output directory.

Ctrl-C is typed for real: the launcher runs in a session of its own whose terminal is a pseudo-terminal, and
b"\\x03" written to its master side makes the terminal send SIGINT to its foreground process group, as a
terminal window does. SIGTERM goes to the launcher's whole process group, as Slurm's scancel and `timeout`
send it. Each stop must save a checkpoint, keep the log whole, print one line naming the checkpoint and the
command that resumes from it, and exit 130 (SIGINT) or 143 (SIGTERM); that command must continue exactly.
"""
import contextlib
import io
import json
import os
import pty
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_WAVEGLOW, make_lj_corpus

import run_lock
import train
from checkpoint import load_checkpoint
from glow import WaveGlow

LOSS_LINE = re.compile(r"^(\d+):\tloss:(\S+)\t", re.M)
RESUME_LINE = re.compile(r"^\[INFO\] training stopped by (SIG\w+), checkpoint (.+?); resume with: (.+)$", re.M)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """10 clips (2 held out by the launchers' --n_test=2) and a tiny config that never checkpoints by itself."""
    root = tmp_path_factory.mktemp("signals")
    corpus = make_lj_corpus(root / "LJSpeech", n_clips=10, seconds=0.5)
    config = json.loads((REPO / "config.json").read_text())
    config["waveglow_config"] = {**TINY_WAVEGLOW, "n_mel_channels": 20}
    config["data_config"]["segment_length"] = 2048
    config["train_config"].update(batch_size=2, iters_per_checkpoint=1000, iters_per_validation=0)
    (root / "tiny.json").write_text(json.dumps(config))
    return root, corpus, root / "tiny.json"


def launcher_params(corpus, config, checkpoints, *extra):
    return [f"--data_path={corpus}", f"--output_directory={checkpoints}", f"--c={config}", "--batch-size=2",
            "--device=cpu", "--epochs=1000", "--n_test=2", "--workers=0", *extra]


def run_in_terminal(argv, env, type_when, keys=b"\x03", timeout=150):
    """argv in a new session with a pseudo-terminal; `keys` are typed once `type_when` (a regex) shows up in its
    output. Returns (exit code, output)."""
    pid, terminal = pty.fork()  # the child: session leader, the pty its controlling terminal
    if pid == 0:
        os.execvpe(argv[0], argv, env)
    output, typed, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.2)[0]:
                try:
                    data = os.read(terminal, 65536)
                except OSError:  # EIO: every process holding the terminal has gone
                    break
                if not data:
                    break
                output += data
            if not typed and re.search(type_when, output.decode(errors="replace").replace("\r\n", "\n"), re.M):
                os.write(terminal, keys)
                typed = True
        else:
            os.killpg(pid, signal.SIGKILL)
            pytest.fail(f"still running after {timeout} s:\n{output.decode(errors='replace')[-3000:]}")
    finally:
        os.close(terminal)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace").replace("\r\n", "\n")


def losses(text):
    return dict(LOSS_LINE.findall(text))


def check_stop(output, log, signal_name, checkpoints, *resume_flags):
    """The stop's one resume line and its checkpoint: returns (iteration saved, resume command as argv)."""
    assert "Traceback" not in output and "SignalException" not in output and "[Error]" not in output, output
    (line,) = RESUME_LINE.findall(output)
    assert line[0] == signal_name
    checkpoint = line[1]
    iteration = int(checkpoint.rsplit("_", 1)[1])
    assert os.path.dirname(checkpoint) == str(checkpoints)
    assert load_checkpoint(checkpoint)["iteration"] == iteration
    assert f"Received {signal_name}: checkpoint saved to {checkpoint}\n" in log
    assert log.rstrip("\n").endswith(line[2])  # the log keeps every line, the launcher's last one too
    assert sorted(map(int, losses(log))) == list(range(1, iteration + 1))
    command = shlex.split(line[2])
    assert command[-1] == f"--checkpoint_path={checkpoint}" and all(flag in command for flag in resume_flags)
    assert not list(checkpoints.glob(".lock")), "the run's lock outlived it"
    return iteration, command


def test_ctrl_c_in_a_terminal_saves_and_the_printed_command_resumes_exactly(workspace, tmp_path):
    root, corpus, config = workspace
    checkpoints, logs = tmp_path / "checkpoints", tmp_path / "logs"
    env = {**ENV, "TEST_OUTPUT_DIR": str(logs)}
    code, output = run_in_terminal(["bash", str(REPO / "test" / "train_performance_1p.sh"),
                                    *launcher_params(corpus, config, checkpoints, "--step_stop=8")],
                                   env, type_when=r"^2:\tloss:")
    assert code == 130, output[-3000:]
    log = (logs / "0" / "train_0.log").read_text()
    stopped_at, command = check_stop(output, log, "SIGINT", checkpoints)
    assert stopped_at < 8, "the run ended before the Ctrl-C"
    interrupted_losses = losses(log)
    train_command = shlex.split(re.search(r"^\[INFO\] (.*train\.py .*)$", output, re.M).group(1))

    # The printed command (TEST_OUTPUT_DIR=... bash test/...sh ... --checkpoint_path=...) continues the run.
    assignments = dict(word.split("=", 1) for word in command[:1] if word.startswith("TEST_OUTPUT_DIR="))
    resumed = subprocess.run(command[len(assignments):], env={**env, **assignments}, capture_output=True, text=True,
                             timeout=150)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Resumed from {checkpoints / f'waveglow_{stopped_at}'} at iteration {stopped_at} " in resumed.stdout
    resumed_losses = losses(resumed.stdout)
    assert sorted(map(int, resumed_losses)) == list(range(stopped_at + 1, 9))

    # The same training, never interrupted: the same losses, line for line.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train.main(train_command[2:] + ["-output_directory", str(tmp_path / "reference")]) == 0
    assert {**interrupted_losses, **resumed_losses} == losses(out.getvalue())


def test_sigterm_to_the_8p_launcher_saves_and_second_runs_are_refused(workspace, tmp_path, sleeper):
    root, corpus, config = workspace
    checkpoints, logs, taken = tmp_path / "checkpoints", tmp_path / "logs", tmp_path / "taken"
    env = {**ENV, "TEST_OUTPUT_DIR": str(logs)}
    launcher = ["bash", str(REPO / "test" / "train_full_8p.sh"), *launcher_params(corpus, config, checkpoints)]
    with open(tmp_path / "job.out", "w") as out:
        job = subprocess.Popen([*launcher, "--nproc=2"], stdout=out, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)  # a process group of its own, as a batch job has
    output = lambda: (tmp_path / "job.out").read_text()  # noqa: E731
    try:
        # Meanwhile, a 2-process job into a directory a live process holds: all of it ends, with one message.
        lock = write_lock(taken, pid=sleeper.pid, start_time=run_lock.process_start_time(sleeper.pid))
        (taken / "train.txt").write_text("\n".join(map(str, sorted((corpus / "wavs").glob("*.wav")))) + "\n")
        refused = subprocess.run([sys.executable, str(REPO / "distributed.py"), "--nproc_per_node", "2", "-c",
                                  str(config), "-training_files", str(taken / "train.txt"), "-device", "cpu",
                                  "-output_directory", str(taken)], env=ENV, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode == 1, refused.stderr[-3000:]
        busy = f"error: output_directory {taken} is in use by another run (pid {sleeper.pid} on "
        assert refused.stderr.count(busy) == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "exitcode" not in refused.stderr and "a training process failed" not in refused.stderr
        assert sorted(p.name for p in taken.iterdir()) == [".lock", "train.txt"] and json.loads(lock.read_text())

        deadline = time.monotonic() + 120
        while not LOSS_LINE.search(output()):
            assert job.poll() is None and time.monotonic() < deadline, output()[-3000:]
            time.sleep(0.2)
        holder = json.loads((checkpoints / ".lock").read_text())  # rank 0 of the job
        assert holder["host"] == socket.gethostname() and holder["pid"] != job.pid
        # A second launcher with the same log folder is refused before it writes there ...
        second = subprocess.run([*launcher, "--nproc=1"], env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and f"{logs / '0'} is in use by another run (pid {job.pid} on" in second.stderr
        # ... and so is a run into the job's output directory.
        code, log, err = run(["-c", config, "-training_files", logs / "0" / "train_files.txt", "-device", "cpu",
                              "-output_directory", checkpoints])
        assert code == 1 and f"{checkpoints} is in use by another run (pid {holder['pid']} on" in err
        assert job.poll() is None, "the job ended early"

        os.killpg(job.pid, signal.SIGTERM)
        assert job.wait(timeout=90) == 143, output()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    log = (logs / "0" / "train_0.log").read_text()
    assert log.startswith("[INFO] ") and "distributed.py --nproc_per_node=2" in log.splitlines()[0]
    check_stop(output(), log, "SIGTERM", checkpoints, "--nproc=2")
    assert not (logs / "0" / ".launcher_train.lock").exists()


def test_the_fine_tune_resume_line_resumes_instead_of_warm_starting():
    script = (f'source {shlex.quote(str(REPO / "test" / "common.sh"))}; also_accepted="warm_start"; '
              'resume_parameters=(--warm_start=false); parse_parameters "$@"; resume_command "ft out/waveglow_5"')
    done = subprocess.run(["bash", "-c", script, "test/train_finetune_1p.sh", "--data_path=my voice",
                           "--checkpoint_path=pretrained.pt", "--warm_start=true", "--epochs=3"],
                          capture_output=True, text=True, env={k: v for k, v in ENV.items() if k != "TEST_OUTPUT_DIR"})
    assert done.returncode == 0, done.stderr
    assert shlex.split(done.stdout) == ["bash", "test/train_finetune_1p.sh", "--data_path=my voice", "--epochs=3",
                                        "--warm_start=false", "--checkpoint_path=ft out/waveglow_5"]


def write_config(folder, corpus):
    config = {"train_config": {"output_directory": str(folder / "out"), "epochs": 1000, "batch_size": 2,
                               "iters_per_checkpoint": 1000, "step_stop": 1, "workers": 0, "device": "cpu"},
              "data_config": {"training_files": str(folder / "train.txt"), "segment_length": 2048},
              "waveglow_config": {**TINY_WAVEGLOW, "n_mel_channels": 20}}
    (folder / "train.txt").write_text("\n".join(map(str, sorted((corpus / "wavs").glob("*.wav")))) + "\n")
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def sleeper():
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def write_lock(folder, **owner):
    folder.mkdir(parents=True, exist_ok=True)
    lock = {"host": socket.gethostname(), "command": "python train.py -c old.json", "started": "earlier", **owner}
    (folder / ".lock").write_text(json.dumps(lock))
    return folder / ".lock"


def test_stale_locks_are_replaced_and_live_ones_refuse(workspace, tmp_path, sleeper):
    _, corpus, _ = workspace
    config, out = write_config(tmp_path, corpus), tmp_path / "out"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)

    write_lock(out, pid=dead_pid, start_time="x")  # a run killed with -9
    code, log, err = run(["-c", config])
    assert code == 0, err
    assert f"note: replaced the stale lock {out / '.lock'} (pid {dead_pid} is not running;" in log
    assert (out / "waveglow_1").is_file() and not (out / ".lock").exists()

    live = run_lock.process_start_time(sleeper.pid)
    write_lock(out, pid=sleeper.pid, start_time=live + "0")  # the pid came back as another process
    code, log, _ = run(["-c", config, "-step_stop", 2, "-checkpoint_path", out / "waveglow_1"])
    assert code == 0 and f"(pid {sleeper.pid} now belongs to another process;" in log

    for owner in ({"pid": sleeper.pid, "start_time": live}, {"pid": 1, "start_time": "1", "host": "elsewhere"}):
        lock = write_lock(out, **owner)
        before, config_written = lock.read_text(), (out / "config.json").stat().st_mtime_ns
        code, log, err = run(["-c", config, "-step_stop", 3])
        assert code == 1 and not LOSS_LINE.search(log)
        assert f"error: output_directory {out} is in use by another run (pid {owner['pid']} on " \
               f"{owner.get('host', socket.gethostname())}, started earlier: python train.py -c old.json)" in err
        assert f"delete {lock}" in err
        assert lock.read_text() == before and (out / "config.json").stat().st_mtime_ns == config_written

    lock.write_text("")  # a claim killed between creating and writing its lock, long ago
    os.utime(lock, (time.time() - 60, time.time() - 60))
    claim = run_lock.claim_directory(str(out), log=lambda message: None)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    claim.release()
    assert not lock.exists()


def test_two_claims_at_once_only_one_wins(tmp_path):
    """Four processes claim one folder at the same moment; the winner keeps its lock until told to end."""
    racer = ("import os, sys, time, run_lock\n"
             "folder, go, done = sys.argv[1:]\n"
             "while not os.path.exists(go):\n    time.sleep(0.01)\n"
             "try:\n    run_lock.claim_directory(folder)\nexcept run_lock.OutputDirectoryBusy:\n    sys.exit(3)\n"
             "while not os.path.exists(done):\n    time.sleep(0.01)\n")
    folder, go, done = tmp_path / "out", tmp_path / "go", tmp_path / "done"
    folder.mkdir()
    racers = [subprocess.Popen([sys.executable, "-c", racer, str(folder), str(go), str(done)], cwd=REPO)
              for _ in range(4)]
    time.sleep(1)
    go.touch()
    deadline = time.monotonic() + 60
    while sum(r.poll() is not None for r in racers) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    done.touch()
    assert sorted(r.wait(timeout=60) for r in racers) == [0, 3, 3, 3]
    assert not (folder / ".lock").exists()  # removed by the winner at its exit


def test_a_second_sigint_stops_at_once_without_a_traceback(workspace, tmp_path, monkeypatch):
    _, corpus, _ = workspace

    class TwiceInterruptedWaveGlow(WaveGlow):
        calls = 0

        def forward(self, forward_input):
            TwiceInterruptedWaveGlow.calls += 1
            if TwiceInterruptedWaveGlow.calls == 2:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in step 2: the step is to finish, then save ...
                os.kill(os.getpid(), signal.SIGINT)  # ... a second one: stop now
            return super().forward(forward_input)
    monkeypatch.setattr(train, "WaveGlow", TwiceInterruptedWaveGlow)
    handler = signal.getsignal(signal.SIGINT)
    code, log, err = run(["-c", write_config(tmp_path, corpus), "-step_stop", 5])
    assert code == 130
    assert "error: stopped at once by SIGINT (Ctrl-C), without saving" in err and "Traceback" not in err
    assert sorted(map(int, losses(log))) == [1] and not list((tmp_path / "out").glob("waveglow_*"))
    assert signal.getsignal(signal.SIGINT) is handler and not (tmp_path / "out" / ".lock").exists()

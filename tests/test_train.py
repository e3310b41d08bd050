"""train.py on tiny models and a 12-clip corpus: flags and config, log lines, checkpoints, exact resume,
validation, tensorboard, non-finite steps, warm start and SIGTERM.

One training run (module fixture) serves most checks; the others are a few iterations each.
"""
import contextlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY_WAVEGLOW, make_lj_corpus

import glow
import train
from checkpoint import load_checkpoint
from evaluate import validation_nll
from mel2samp import Mel2Samp

LOSS_LINE = re.compile(r"^(\d+):\tloss:(\S+)\ttime:(\d+\.\d{9})\t$", re.M)
FPS_LINE = re.compile(r"^Epoch (\d+) FPS:(\d+\.\d{9})$", re.M)
SAMPLES_LINE = re.compile(r"^Epoch (\d+) samples/s:(\d+\.\d)$", re.M)
VALIDATION_LINE = re.compile(r"^Validation loss (\d+): (-?\d+\.\d{9})$", re.M)
# 20 mel bands keep checkpoints small: with 80, the 80x80x1024 upsampler is nearly all of a tiny model.
MODEL = {**TINY_WAVEGLOW, "n_mel_channels": 20}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    wavs = sorted((make_lj_corpus(root / "LJSpeech") / "wavs").glob("*.wav"))
    (root / "train.txt").write_text("\n".join(map(str, wavs[2:])) + "\n")  # 10 clips: 5 batches of 2
    (root / "val.txt").write_text("\n".join(map(str, wavs[:2])) + "\n")
    return root


def write_config(folder, corpus, name="config.json", **train_config):
    config = {
        "train_config": {"output_directory": str(folder / "out"), "epochs": 2, "batch_size": 2,
                         "learning_rate": 1e-3, "iters_per_checkpoint": 1000, "iters_per_validation": 0,
                         "workers": 0, "device": "cpu", **train_config},
        "data_config": {"training_files": str(corpus / "train.txt"), "segment_length": 2048},
        "waveglow_config": MODEL,
    }
    path = folder / name
    path.write_text(json.dumps(config, indent=2))
    return path


def run(argv):
    """train.main in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def losses(log):
    return {int(i): loss for i, loss, _ in LOSS_LINE.findall(log)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """7 iterations (5 per epoch), checkpoints and validation every 3, tensorboard on."""
    folder = tmp_path_factory.mktemp("trained")
    config = write_config(folder, corpus, iters_per_checkpoint=3, iters_per_validation=3, step_stop=7,
                          with_tensorboard=True, validation_files=str(corpus / "val.txt"))
    code, log, err = run(["-c", config])
    assert code == 0, err
    return {"config": config, "log": log, "out": folder / "out"}


def test_log_lines_checkpoints_and_step_stop(trained):
    log = trained["log"]
    assert [int(i) for i, _, _ in LOSS_LINE.findall(log)] == list(range(1, 8))
    assert all(float(loss) == float(loss) for loss in losses(log).values())  # finite numbers, not nan
    assert "Reached step_stop 7" in log
    assert sorted(p.name for p in trained["out"].glob("waveglow_*")) == ["waveglow_3", "waveglow_6", "waveglow_7"]
    assert not list(trained["out"].glob(".*tmp"))  # no leftovers of the atomic writes
    first, last = float(losses(log)[1]), float(losses(log)[7])
    assert last < first  # seven Adam steps at 1e-3 do lower the training loss


def test_fps_is_clips_per_second_from_the_fifth_iteration(trained):
    log = trained["log"]
    times = [float(t) for _, _, t in LOSS_LINE.findall(log)]
    fps = dict(FPS_LINE.findall(log))
    assert set(fps) == {"0", "1"}
    # epoch 0 ran iterations 1-5, so only the 5th is timed; epoch 1 ran two, fewer than five: all count
    assert float(fps["0"]) == pytest.approx(2 / times[4], rel=1e-5)
    assert float(fps["1"]) == pytest.approx(2 * 2 / (times[5] + times[6]), rel=1e-5)
    samples = dict(SAMPLES_LINE.findall(log))
    assert float(samples["0"]) == pytest.approx(float(fps["0"]) * 2048, abs=0.1)


def test_checkpoint_holds_what_exact_resume_needs(trained):
    raw = torch.load(trained["out"] / "waveglow_6", map_location="cpu", weights_only=True)
    assert raw["format"] == "waveglow-pytorch" and raw["format_version"] == 1
    assert raw["iteration"] == 6 and raw["learning_rate"] == 1e-3
    assert raw["epoch"] == 1 and raw["samples_in_epoch"] == 2 and raw["samples_seen"] == 12  # 6th batch: 1st of epoch 1
    assert set(raw["rng"]) >= {"python", "numpy", "torch"}
    assert raw["optimizer"]["state"] and raw["scaler"] is None  # float32 run: no loss scaling
    assert not any(k.startswith("module.") for k in raw["model"])
    saved_config = json.loads((trained["out"] / "config.json").read_text())
    assert raw["config"] == saved_config
    assert saved_config["train_config"]["max_nonfinite_steps"] == 20  # a default filled in
    assert saved_config["waveglow_config"] == MODEL
    last = load_checkpoint(trained["out"] / "waveglow_7")
    assert last["flavour"] == "waveglow-pytorch" and last["epoch"] == 1 and last["samples_in_epoch"] == 4


def test_validation_loss_is_the_held_out_nll(trained, corpus):
    log = trained["log"]
    validation = dict(VALIDATION_LINE.findall(log))
    assert set(validation) == {"3", "6", "7"}  # every 3 iterations and at the end
    model = glow.WaveGlow(**MODEL)
    model.load_state_dict(load_checkpoint(trained["out"] / "waveglow_3")["model"])
    valset = Mel2Samp(str(corpus / "val.txt"), 2048, 1024, 256, 1024, 22050, 0.0, 8000.0, n_mel_channels=20,
                      deterministic=True, seed=1234)
    loader = torch.utils.data.DataLoader(valset, batch_size=2)
    assert validation_nll(model, loader, 1.0, torch.device("cpu")) == pytest.approx(float(validation["3"]), abs=1e-6)
    assert float(validation["7"]) < float(validation["3"])


def read_tensorboard_tags(folder):
    from tensorboardX.proto import event_pb2
    tags = set()
    for path in folder.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        position = 0
        while position < len(data):  # TFRecord: length (u64), crc (u32), payload, crc (u32)
            (length,) = struct.unpack("<Q", data[position:position + 8])
            event = event_pb2.Event.FromString(data[position + 12:position + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            position += 16 + length
    return tags


def test_tensorboard_scalars_and_audio(trained):
    tags = read_tensorboard_tags(trained["out"] / "logs")
    assert {"training/loss", "training/learning_rate", "training/grad_norm", "training/samples_per_second",
            "validation/loss", "validation/synthesis_0", "validation/original_0", "validation/mel_0",
            "validation/synthesis_1", "validation/mcd_db", "validation/mrstft", "validation/vuv_error",
            "validation/mel_l1"} <= tags  # PESQ and STOI are undefined on 2048-sample crops


def test_resume_continues_exactly(trained, tmp_path):
    code, log, err = run(["-c", trained["config"], "-checkpoint_path", trained["out"] / "waveglow_3",
                          "-output_directory", tmp_path / "resumed"])
    assert code == 0, err
    assert "Resumed from" in log and "at iteration 3 (epoch 0, batch 3)" in log
    resumed, uninterrupted = losses(log), losses(trained["log"])
    assert sorted(resumed) == [4, 5, 6, 7]
    assert {i: uninterrupted[i] for i in resumed} == resumed  # same losses to all 9 printed decimals
    assert dict(VALIDATION_LINE.findall(log))["7"] == dict(VALIDATION_LINE.findall(trained["log"]))["7"]


def test_warm_start_flag_takes_only_the_weights_of_our_own_checkpoint(trained, tmp_path):
    code, log, err = run(["-c", trained["config"], "-checkpoint_path", trained["out"] / "waveglow_7",
                          "-warm_start", "true", "-step_stop", "1", "-output_directory", tmp_path, "-with_tensorboard",
                          "false", "--validation_files", ""])
    assert code == 0, err
    assert "(waveglow-pytorch): weights only, iteration 0" in log and sorted(losses(log)) == [1]
    assert torch.load(tmp_path / "waveglow_1", weights_only=True)["optimizer"]["state"][0]["step"] == 1


def test_resume_at_step_stop_has_nothing_left_to_do(trained, tmp_path):
    code, log, err = run(["-c", trained["config"], "-checkpoint_path", trained["out"] / "waveglow_7",
                          "-output_directory", tmp_path, "-with_tensorboard", "false", "--validation_files", ""])
    assert code == 0, err
    assert "Already at iteration 7, step_stop is 7" in log and not losses(log)
    assert not list(tmp_path.glob("waveglow_*"))


def test_a_finished_run_records_the_next_epoch_and_resumes_to_nothing(corpus, tmp_path):
    config = write_config(tmp_path, corpus, epochs=1, batch_size=5)  # one epoch of two iterations
    assert run(["-c", config])[0] == 0
    final = torch.load(tmp_path / "out" / "waveglow_2", weights_only=True)
    assert (final["epoch"], final["samples_in_epoch"], final["samples_seen"]) == (1, 0, 10)
    code, log, err = run(["-c", config, "-checkpoint_path", tmp_path / "out" / "waveglow_2"])
    assert code == 0 and "at iteration 2 (epoch 1, batch 0)" in log and not losses(log)


def test_flags_override_config_and_parse_booleans(trained, tmp_path):
    config, _ = train.resolve_config(["-c", str(trained["config"]), "-epochs", "3", "-learning_rate", "0.5",
                                      "--batch-size", "4", "-with_tensorboard", "false", "--fp16_run", "yes",
                                      "-sigma", "0.7", "-seed", "7", "-iters_per_checkpoint", "9",
                                      "-output_directory", str(tmp_path), "-checkpoint_path", "x",
                                      "-step_stop", "5", "--training_files", "list.txt", "--workers", "2",
                                      "--dist_timeout", "60", "--amp_backend", "apex", "--device", "cpu",
                                      "--amp_dtype", "bfloat16", "--compile", "true"])
    tc = config["train_config"]
    assert (tc["epochs"], tc["learning_rate"], tc["batch_size"], tc["sigma"], tc["seed"]) == (3, 0.5, 4, 0.7, 7)
    assert tc["with_tensorboard"] is False and tc["fp16_run"] is True and tc["step_stop"] == 5
    assert (tc["iters_per_checkpoint"], tc["output_directory"], tc["checkpoint_path"]) == (9, str(tmp_path), "x")
    assert config["data_config"]["training_files"] == "list.txt" and tc["workers"] == 2
    assert config["dist_config"]["dist_timeout"] == 60 and tc["amp_backend"] == "apex"
    assert tc["amp_dtype"] == "bfloat16" and tc["compile"] is True
    def fp16_run(*flag):
        return train.resolve_config(["-c", str(trained["config"]), *flag])[0]["train_config"]["fp16_run"]
    for text, value in [("true", True), ("False", False), ("1", True), ("0", False), ("yes", True), ("no", False)]:
        assert fp16_run("-fp16_run", text) is value
    assert fp16_run("-fp16_run") is True and fp16_run() is False
    untouched = train.resolve_config(["-c", str(trained["config"])])[0]["train_config"]
    assert untouched["learning_rate"] == 1e-3 and untouched["grad_clip_thresh"] == 0.0  # file, then defaults


@pytest.mark.parametrize("argv, message", [
    (["-fp16_run", "maybe"], "-fp16_run"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["-batch_size", "two"], "-batch_size"),
])
def test_bad_flags_are_rejected_by_name(trained, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["-c", str(trained["config"])] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("section, key, value, message", [
    ("train_config", "learning_rat", 1e-4, "unknown key train_config.learning_rat"),
    ("data_config", "segment_length", "16000", "data_config.segment_length must be an integer"),
    ("train_config", "batch_size", -2, "train_config.batch_size must be positive"),
    ("train_config", "with_tensorboard", "false", "train_config.with_tensorboard must be true or false"),
    ("data_config", "segment_length", 2044, "multiple of waveglow_config.n_group"),
    ("data_config", "segment_length", 512, "shorter than one STFT window"),
    ("train_config", "device", "tpu", "train_config.device"),
    ("train_config", "amp_dtype", "fp8", "train_config.amp_dtype must be auto, float16 or bfloat16"),
    ("train_config", "compile", "yes", "train_config.compile must be true or false"),
])
def test_bad_config_values_are_errors_naming_the_key(corpus, tmp_path, section, key, value, message):
    path = write_config(tmp_path, corpus)
    config = json.loads(path.read_text())
    config.setdefault(section, {})[key] = value
    path.write_text(json.dumps(config))
    code, _, err = run(["-c", path])
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_unknown_section_and_missing_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"train_config": {}, "extra_config": {}}))
    assert "unknown key extra_config" in run(["-c", path])[2]
    assert "not found" in run(["-c", tmp_path / "missing.json"])[2]


def flaky_waveglow(bad_calls):
    """WaveGlow whose forward returns NaN on the given (1-based) calls: a model that blows up."""
    class FlakyWaveGlow(glow.WaveGlow):
        calls = 0

        def forward(self, forward_input):
            z, log_s_list, log_det_W_list = super().forward(forward_input)
            FlakyWaveGlow.calls += 1
            return (z * float("nan") if FlakyWaveGlow.calls in bad_calls else z), log_s_list, log_det_W_list
    return FlakyWaveGlow


def test_a_nonfinite_step_is_skipped_and_leaves_the_weights(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "WaveGlow", flaky_waveglow({3}))
    config = write_config(tmp_path, corpus, iters_per_checkpoint=1, step_stop=4)
    code, log, err = run(["-c", config])
    assert code == 0, err
    assert losses(log)[3] == "nan" and "at iteration 3: step skipped" in log
    before, skipped, after = (torch.load(tmp_path / "out" / f"waveglow_{i}", weights_only=True) for i in (2, 3, 4))
    for name, weight in before["model"].items():
        assert torch.equal(skipped["model"][name], weight), name
    assert before["optimizer"]["state"][0]["step"] == skipped["optimizer"]["state"][0]["step"]
    assert not torch.equal(after["model"]["upsample.weight"], before["model"]["upsample.weight"])


def test_nonfinite_steps_in_a_row_stop_the_run(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "WaveGlow", flaky_waveglow(set(range(3, 100))))
    config = write_config(tmp_path, corpus, iters_per_checkpoint=1, max_nonfinite_steps=3)
    code, log, err = run(["-c", config])
    assert code == 1
    assert "3 non-finite steps in a row" in err and "waveglow_4 in" in err
    assert sorted(losses(log)) == [1, 2, 3, 4, 5]
    # skipped steps 3 and 4 still reach their checkpoints (with step 2's weights); the run stops at 5 unsaved
    assert sorted(p.name for p in (tmp_path / "out").glob("waveglow_*")) == [f"waveglow_{i}" for i in range(1, 5)]
    good, last = (torch.load(tmp_path / "out" / f"waveglow_{i}", weights_only=True)["model"] for i in (2, 4))
    assert all(torch.equal(last[name], weight) for name, weight in good.items())


@pytest.mark.parametrize("bf16_units", [True, False])
def test_fp16_run_on_cpu_trains_by_the_cpus_units_and_upstream_rank_flags(corpus, tmp_path, monkeypatch, bf16_units):
    """fp16_run on a CPU: bfloat16 where the CPU has bfloat16 units, float32 (said in one note) where it has not."""
    import distributed
    monkeypatch.setattr(distributed, "cpu_supports_bf16", lambda: bf16_units)
    config = write_config(tmp_path, corpus, step_stop=2)
    code, log, err = run(["-c", config, "-fp16_run", "true", "-r", "0", "-g", "group_1"])
    assert code == 0, err
    precision_note = log.split("note:")[1].splitlines()[0]
    if bf16_units:
        assert "precision torch.bfloat16" in log and "bfloat16 units" in precision_note
    else:
        assert "precision float32" in log and "running float32" in precision_note
    assert sorted(losses(log)) == [1, 2] and all(float(v) == float(v) for v in losses(log).values())


def test_warm_start_from_an_ascend_checkpoint(corpus, tmp_path):
    torch.manual_seed(99)
    source = glow.WaveGlow(**MODEL).state_dict()
    # The Ascend port's Conv1d layers were Conv2d: every conv weight carries a trailing 1
    ascend = {k: v.unsqueeze(-1) if (k.startswith(("WN.", "convinv.")) and v.dim() == 3) else v
              for k, v in source.items()}
    torch.save({"model": ascend, "iteration": 21000, "learning_rate": 2e-4, "optimizer": {}}, tmp_path / "ascend.pth")
    config = write_config(tmp_path, corpus, step_stop=1, learning_rate=1e-12)
    code, log, err = run(["-c", config, "-checkpoint_path", tmp_path / "ascend.pth"])
    assert code == 0, err
    assert "Warm start from" in log and "(ascend): weights only, iteration 0" in log
    assert sorted(losses(log)) == [1]
    tuned = torch.load(tmp_path / "out" / "waveglow_1", weights_only=True)
    assert tuned["iteration"] == 1
    for name, weight in source.items():  # one step at lr 1e-12 moves nothing visibly
        assert torch.allclose(tuned["model"][name], weight, atol=1e-9), name


def test_sigint_finishes_the_step_saves_and_exits_130(corpus, tmp_path, monkeypatch):
    class InterruptedWaveGlow(glow.WaveGlow):
        calls = 0

        def forward(self, forward_input):
            InterruptedWaveGlow.calls += 1
            if InterruptedWaveGlow.calls == 2:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 2
            return super().forward(forward_input)
    monkeypatch.setattr(train, "WaveGlow", InterruptedWaveGlow)
    code, log, err = run(["-c", write_config(tmp_path, corpus)])
    assert code == 130, err
    assert sorted(losses(log)) == [1, 2]  # step 2 was finished, not abandoned
    assert f"Received SIGINT: checkpoint saved to {tmp_path / 'out' / 'waveglow_2'}" in log
    assert torch.load(tmp_path / "out" / "waveglow_2", weights_only=True)["iteration"] == 2


def test_sigterm_finishes_the_step_saves_and_exits_143(corpus, tmp_path):
    config = write_config(tmp_path, corpus, epochs=1000)
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), "-c", str(config)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines, deadline = [], time.time() + 60
    while time.time() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if line.startswith("2:\tloss:") or not line:
            break
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    log = "".join(lines) + out
    assert process.returncode == 143, err  # 128 + SIGTERM: stopped, not finished
    saved = re.search(r"Received SIGTERM: checkpoint saved to (\S+)", log)
    assert saved, log
    last_iteration = max(losses(log))
    assert saved.group(1) == os.path.join(str(tmp_path / "out"), f"waveglow_{last_iteration}")
    assert load_checkpoint(saved.group(1))["iteration"] == last_iteration

"""The test/*.sh launchers end to end on CPU: a tiny WaveGlow on a small corpus made here, logs redirected
into tmp_path through TEST_OUTPUT_DIR, and the template's summary lines and files checked."""
import json
import math
import os
import shutil
import subprocess

import pytest

from conftest import REPO

NETWORK = "WaveGlow_for_PyTorch"
FINAL_LINES = ("Final Performance images/sec : ", "Final Train Accuracy : ", "E2E Training Duration sec : ")


def run_launcher(script, *params, output_root, extra_env=None, timeout=240):
    env = {**os.environ, "TEST_OUTPUT_DIR": str(output_root), **(extra_env or {})}
    return subprocess.run(["bash", str(REPO / "test" / script), *params], capture_output=True, text=True,
                          env=env, timeout=timeout)


def read_summary(path):
    pairs = [line.split(" = ", 1) for line in path.read_text().splitlines()]
    return {key: value for key, value in pairs}


def final_values(stdout):
    """The three template lines' values, parsed as numbers."""
    lines = stdout.splitlines()
    return [float(next(line for line in lines if line.startswith(prefix))[len(prefix):]) for prefix in FINAL_LINES]


def check_training_summary(output_root, case_name, rank_size, batch_size, stdout, iterations):
    log_dir = output_root / "0"
    summary = read_summary(log_dir / f"{case_name}.log")
    assert list(summary)[:10] == ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS",
                                  "TrainingTime", "TrainAccuracy", "ActualLoss", "E2ETrainingTime"]
    assert summary["Network"] == NETWORK and summary["CaseName"] == case_name
    assert summary["RankSize"] == str(rank_size) and summary["BatchSize"] == str(batch_size)
    assert summary["DeviceType"] == os.uname().machine
    fps, accuracy, seconds = final_values(stdout)
    assert fps > 0 and float(summary["ActualFPS"]) == fps
    assert math.isfinite(accuracy) and float(summary["TrainAccuracy"]) == accuracy == float(summary["ActualLoss"])
    assert 0 <= seconds == int(summary["E2ETrainingTime"])
    # TrainingTime is the milliseconds one global batch takes at that FPS.
    assert float(summary["TrainingTime"]) == pytest.approx(batch_size * rank_size * 1000 / fps, abs=0.01)
    assert math.isfinite(float(summary["ValidationLoss"]))
    losses = (log_dir / f"train_{case_name}_loss.txt").read_text().split()
    assert len(losses) == iterations and float(losses[-1]) == accuracy
    log = (log_dir / "train_0.log").read_text()
    assert f"{iterations}:\tloss:" in log and "Epoch 0 FPS:" in log
    return summary


def corpus_untouched(corpus):
    return sorted(p.name for p in corpus.iterdir()) == ["metadata.csv", "wavs"] and \
        len(list((corpus / "wavs").iterdir())) == 14


def test_performance_1p(launcher_workspace):
    root, corpus, config = launcher_workspace
    output_root, checkpoints = root / "out_1p", root / "ckpt_1p"
    done = run_launcher("train_performance_1p.sh", f"--data_path={corpus}", f"--output_directory={checkpoints}",
                        f"--c={config}", "--batch-size=2", "--device=cpu", "--step_stop=3", "--n_test=2",
                        "--workers=0", "--amp_dtype=bfloat16", "--compile=false", output_root=output_root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "-amp_dtype bfloat16 -compile false" in done.stdout  # passed on to train.py
    check_training_summary(output_root, f"{NETWORK}_bs2_1p_perf", 1, 2, done.stdout, iterations=3)
    # The file lists come from --data_path, into the output root: absolute paths, conventional split.
    train_list = (output_root / "0" / "train_files.txt").read_text().split()
    test_list = (output_root / "0" / "test_files.txt").read_text().split()
    assert [os.path.basename(p) for p in test_list] == ["LJ001-0001.wav", "LJ001-0002.wav"]
    assert len(train_list) == 12 and all(os.path.isabs(p) and os.path.isfile(p) for p in train_list)
    assert corpus_untouched(corpus)
    assert (checkpoints / "waveglow_3").is_file()

    # Fine-tuning from that checkpoint starts a new run at iteration 0 from its weights.
    finetuned = root / "ckpt_ft"
    done = run_launcher("train_finetune_1p.sh", f"--data_path={corpus}", f"--output_directory={finetuned}",
                        f"--checkpoint_path={checkpoints / 'waveglow_3'}", f"--c={config}", "--batch-size=2",
                        "--device=cpu", "--step_stop=1", "--n_test=2", "--workers=0", output_root=output_root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Warm start from" in done.stdout and (finetuned / "waveglow_1").is_file()
    check_training_summary(output_root, f"{NETWORK}_bs2_1p_acc", 1, 2, done.stdout, iterations=1)


def test_full_8p_on_two_cpu_processes_then_eval(launcher_workspace):
    root, corpus, config = launcher_workspace
    output_root, checkpoints = root / "out_8p", root / "ckpt_8p"
    # 12 training clips, global batch 2 x 2: three iterations make the epoch.
    done = run_launcher("train_full_8p.sh", f"--data_path={corpus}", f"--output_directory={checkpoints}",
                        f"--c={config}", "--batch-size=2", "--device=cpu", "--nproc=2", "--epochs=1",
                        "--iters_per_checkpoint=2", "--n_test=2", "--workers=0", output_root=output_root,
                        extra_env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = check_training_summary(output_root, f"{NETWORK}_bs2_2p_acc", 2, 2, done.stdout, iterations=3)
    assert "on cpu x 2 processes" in (output_root / "0" / "train_0.log").read_text()
    assert (checkpoints / "waveglow_2").is_file() and (checkpoints / "waveglow_3").is_file()

    eval_dir = root / "eval"
    done = run_launcher("train_eval_8p.sh", f"--data_path={corpus}", f"--pth_path={checkpoints / 'waveglow_3'}",
                        f"--output_directory={eval_dir}", "--device=cpu", "--n_test=2", output_root=output_root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    evaluation = read_summary(output_root / "0" / f"{NETWORK}_bs24_1p_eval.log")
    assert evaluation["CaseName"] == f"{NETWORK}_bs24_1p_eval" and evaluation["RankSize"] == "1"
    report = json.loads((eval_dir / "eval.json").read_text())
    assert float(evaluation["ValidationNLL"]) == pytest.approx(report["validation_nll"], abs=1e-6)
    assert float(evaluation["CopySynthesisMelL1"]) == pytest.approx(report["copy_synthesis_mel_l1"], abs=1e-6)
    assert float(evaluation["CopySynthesisMelL1"]) > 0
    summary_keys = {"CopySynthesisMCD": "mcd_db", "F0RMSECents": "f0_rmse_cents", "VUVError": "vuv_error",
                    "MRSTFT": "mrstft", "PESQ": "pesq", "STOI": "stoi"}
    for summary_key, score_key in summary_keys.items():  # the scores' means, as eval.json has them
        expected = report["mean"][score_key]
        if expected is None:  # undefined for every clip (an untrained model's noise has no voiced frame)
            assert evaluation[summary_key] == "nan", summary_key
        else:
            assert float(evaluation[summary_key]) == pytest.approx(expected, abs=1e-6), summary_key
    # Same held-out clips, same weights: the eval's NLL is the training run's final validation loss.
    assert float(evaluation["ValidationNLL"]) == pytest.approx(float(summary["ValidationLoss"]), abs=1e-5)
    assert f"Final Validation NLL : {evaluation['ValidationNLL']}" in done.stdout
    assert sorted(p.name for p in eval_dir.glob("*_synthesis.wav")) == ["LJ001-0001_synthesis.wav",
                                                                       "LJ001-0002_synthesis.wav"]
    # The training run's log and summary survive the evaluation beside them.
    assert (output_root / "0" / "train_0.log").is_file() and (output_root / "0" / "eval_0.log").is_file()
    assert (output_root / "0" / f"{NETWORK}_bs2_2p_acc.log").is_file()
    assert corpus_untouched(corpus)


@pytest.mark.parametrize("script, params, missing", [
    ("train_performance_1p.sh", [], "--data_path"),
    ("train_full_8p.sh", ["--epochs=1"], "--data_path"),
    ("train_performance_8p.sh", ["--output_directory=x"], "--data_path"),
    ("train_finetune_1p.sh", ["--data_path=somewhere"], "--checkpoint_path"),
    ("train_eval_8p.sh", ["--data_path=somewhere"], "--pth_path"),
    ("train_eval_8p.sh", ["--pth_path=nowhere/waveglow_1"], "--data_path"),
    ("train_performance_1p.sh", ["--data_path=somewhere", "--data-path=typo"], "--data-path=typo"),
])
def test_missing_or_unknown_parameter_fails_clearly(tmp_path, script, params, missing):
    done = run_launcher(script, *params, output_root=tmp_path / "out")
    assert done.returncode != 0
    assert "[Error]" in done.stderr and missing in done.stderr
    assert not (tmp_path / "out").exists()  # refused before writing anything


@pytest.mark.skipif(shutil.which("npu-smi") is not None, reason="an Ascend host counts its NPUs first")
@pytest.mark.parametrize("gpus, extra_env, expected", [(3, {}, 3), (12, {}, 8), (3, {"RANK_SIZE": "5"}, 5),
                                                       (0, {}, 1)])
def test_8p_process_count_comes_from_the_host(tmp_path, gpus, extra_env, expected):
    # A stand-in nvidia-smi listing `gpus` GPUs (failing when there are none); the run then stops at the
    # missing data folder, after choosing its process count.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    listing = "".join(f"echo 'GPU {i}: NVIDIA Test (UUID: GPU-{i})'\n" for i in range(gpus)) or "exit 9\n"
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n" + listing)
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra_env}
    env.setdefault("RANK_SIZE", "")
    done = run_launcher("train_performance_8p.sh", f"--data_path={tmp_path / 'no_such_corpus'}",
                        output_root=tmp_path / "out", extra_env=env, timeout=60)
    assert f"[INFO] {expected} training process(es)" in done.stdout
    assert done.returncode != 0 and "no_such_corpus" in done.stderr


def test_8p_rejects_a_bad_process_count(tmp_path):
    done = run_launcher("train_full_8p.sh", "--data_path=somewhere", "--nproc=two", output_root=tmp_path / "out")
    assert done.returncode != 0 and "--nproc" in done.stderr

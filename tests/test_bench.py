"""bench.py's timing: variants timed in interleaved rounds, each keeping its median."""
import time

import torch

from bench import interleaved_seconds, snr_db


def test_interleaved_rounds_take_every_variant_in_turn_and_keep_medians():
    calls = []
    durations = {"slow": iter([0.02, 0.3, 0.02]), "fast": iter([0.01, 0.01, 0.2])}

    def run(name):
        def timed_call():
            calls.append(name)
            time.sleep(next(durations[name]))
        return timed_call

    seconds = interleaved_seconds({"slow": run("slow"), "fast": run("fast")}, torch.device("cpu"), rounds=3)
    assert calls == ["slow", "fast"] * 3  # a drift of the machine's speed hits both alike
    # The median ignores the one outlier of each variant (the means would be 0.11 s and 0.07 s).
    assert 0.02 <= seconds["slow"] < 0.1 and 0.01 <= seconds["fast"] < 0.06


def test_snr_of_a_known_error():
    reference = torch.ones(1000)
    assert abs(snr_db(reference, reference * 1.01) - 40.0) < 1e-3  # error power 1e-4 of the signal's


def test_quick_run_reports_capability_and_skips_what_the_cpu_has_no_units_for(tmp_path, monkeypatch, capsys):
    """bench.py --quick on a tiny model, on a CPU faked to have no bfloat16 units: it says what the CPU has,
    skips the bf16 variants with a word, and still times baseline and ours in float32 and checks the audio."""
    import json
    import sys

    import bench
    import distributed
    from conftest import REPO, TINY_WAVEGLOW
    monkeypatch.setattr(distributed, "cpu_supports_bf16", lambda: False)
    config = tmp_path / "tiny.json"
    data_config = json.loads((REPO / "config.json").read_text())["data_config"]
    config.write_text(json.dumps({"data_config": data_config, "waveglow_config": TINY_WAVEGLOW}))
    results = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench.py", "-c", str(config), "--device", "cpu", "--quick",
                                      "--json", str(results)])
    bench.main()
    out = capsys.readouterr().out
    assert f"cpu capability: {torch.backends.cpu.get_cpu_capability()}, native bfloat16: no" in out
    assert "skipped: the bf16 variants" in out and "20-60x slower than float32" in out
    rows = json.loads(results.read_text())["rows"]
    variants = {row["variant"] for row in rows}
    assert {"baseline fp32 b1x2048", "ours fp32 b1x2048", "baseline fp32 0.5s", "ours fp32 0.5s"} <= variants
    assert not any("bf16" in variant for variant in variants)
    assert all(row["rate"] > 0 and row["peak_key"] == "fp32" for row in rows)
    train_rows = [row for row in rows if row["kind"] == "train"]
    assert len(train_rows) == 2 and all(row["page_faults_per_step"] >= 0 for row in train_rows)
    assert out.count("page faults and") == 2
    assert "inference speed-up over the float32 baseline, 0.5 s, ours fp32" in out
    # float32 inference is timed with the frame-conditioning matrices, built once and said so; the path before
    # them has its own row at the first length, and the second length reuses them
    assert out.count("frame-conditioning matrices built in") == 1
    assert {"ours fp32 0.5s, first ~7 s of audio", "ours fp32 1s", "baseline fp32 1s"} <= variants
    assert "ours fp32 1s, first ~7 s of audio" not in variants

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

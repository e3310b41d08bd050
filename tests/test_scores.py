"""evaluate.py's objective scores, each against a truth built here, and the folder-scoring command line."""
import itertools
import json
import math

import numpy as np
import pytest
import soundfile as sf

import evaluate
from conftest import speechlike, write_wav

RATE = 22050
SNRS_DB = (20, 5, -10)  # falling: every score must get worse along it
LOWER_IS_BETTER = ("mcd_db", "f0_rmse_cents", "vuv_error", "mrstft", "mel_l1")


def with_noise(clean, snr_db, seed=5):
    noise = np.random.default_rng(seed).standard_normal(clean.size)
    return clean + noise * np.sqrt(np.mean(clean ** 2) / 10 ** (snr_db / 10))


@pytest.fixture(scope="module")
def stft():
    return evaluate.mel_stft(evaluate.REPO_CONFIG)


@pytest.fixture(scope="module")
def clip():
    return speechlike(1.5, RATE, f0=120.0, seed=0)


@pytest.fixture(scope="module")
def noise_ladder(clip, stft):
    return [evaluate.vocoder_scores(clip, with_noise(clip, snr), RATE, stft) for snr in SNRS_DB]


def test_a_clip_against_itself_scores_perfectly(clip, stft):
    scores = evaluate.vocoder_scores(clip, clip, RATE, stft)
    assert set(scores) == set(evaluate.SCORE_KEYS)
    for key in LOWER_IS_BETTER:
        assert scores[key] == pytest.approx(0.0, abs=1e-9), key
    assert 4.6 < scores["pesq"] <= 4.65  # 4.64 is wide-band PESQ's ceiling
    assert scores["stoi"] == pytest.approx(1.0, abs=1e-6)


def test_a_copy_three_percent_higher_is_51_cents_off(clip):
    higher = speechlike(1.5, RATE, f0=120.0 * 1.03, seed=0)  # the same contour and noise, pitch times 1.03
    scores = evaluate.world_scores(clip, higher, RATE)
    assert scores["f0_rmse_cents"] == pytest.approx(1200 * math.log2(1.03), abs=2.0)  # 51.2 cents
    assert scores["vuv_error"] < 0.02


def test_falling_snr_scores_worse_on_every_score(noise_ladder):
    for better, worse in itertools.pairwise(noise_ladder):
        for key in ("mcd_db", "f0_rmse_cents", "mrstft", "mel_l1"):
            assert worse[key] > better[key], key
        for key in ("pesq", "stoi"):
            assert worse[key] < better[key], key
        assert worse["vuv_error"] >= better["vuv_error"]  # harmonics stay voiced until the noise drowns them
    assert noise_ladder[-1]["vuv_error"] > noise_ladder[0]["vuv_error"]


def test_noise_against_speech(clip, stft):
    noise = 0.3 * np.random.default_rng(1).standard_normal(clip.size)
    scores = evaluate.vocoder_scores(clip, noise, RATE, stft)
    assert scores["vuv_error"] > 0.8  # the reference is voiced throughout, noise almost nowhere
    assert scores["pesq"] < 1.3  # its floor is about 1.04
    assert scores["stoi"] < 0.2
    assert scores["mcd_db"] > 10


def test_mcd_is_the_rms_log_spectral_distance_in_db():
    """An envelope change of a cos(k theta) in ln|H| over the mel axis is SPTK mel-cepstral coefficient k changing
    by a, so the MCD is 10/ln10 sqrt(2) a, the RMS of the 20 log10 |H| difference."""
    n_fft = 1024
    frequency = np.arange(n_fft // 2 + 1) * RATE / n_fft
    mel, floor = 1127.01048 * np.log1p(frequency / 700), 1127.01048 * np.log1p(40 / 700)  # WORLD's axis from 40 Hz
    theta = np.pi * (mel - floor) / (mel[-1] - floor)
    envelope = np.exp(-frequency / 3000)[None].repeat(3, axis=0)  # (frames, bins) power
    reference = evaluate.mel_cepstrum(envelope, RATE)
    for k, a in ((1, 0.3), (4, 0.2), (10, 0.1)):
        changed = evaluate.mel_cepstrum(envelope * np.exp(2 * a * np.cos(k * theta)), RATE)
        assert evaluate.mel_cepstral_distortion(reference, changed) == pytest.approx(
            10 / math.log(10) * math.sqrt(2) * a, rel=0.03), k
    louder = evaluate.mel_cepstrum(envelope * 10.0, RATE)  # only c0 moves: the MCD leaves it out
    assert evaluate.mel_cepstral_distortion(reference, louder) == pytest.approx(0.0, abs=1e-9)


def test_f0_rmse_and_vuv_error_by_definition():
    reference = np.array([100.0, 0.0, 200.0, 0.0, 150.0])
    synthesis = np.array([103.0, 120.0, 0.0, 0.0, 150.0])
    # frames 0 and 4 are voiced in both: 51.2 and 0 cents
    assert evaluate.f0_rmse_cents(reference, synthesis) == pytest.approx(1200 * math.log2(1.03) / math.sqrt(2))
    assert evaluate.vuv_error(reference, synthesis) == pytest.approx(2 / 5)
    assert math.isnan(evaluate.f0_rmse_cents(reference, np.zeros(5)))


def test_mrstft_of_a_half_loud_copy(clip):
    # |S'| = |S| / 2 everywhere: spectral convergence 1/2 and log-magnitude L1 ln 2 at every resolution
    assert evaluate.multi_resolution_stft(clip, clip / 2) == pytest.approx(0.5 + math.log(2), rel=1e-3)


def test_a_missing_package_is_named(monkeypatch):
    def not_installed(name):
        raise ModuleNotFoundError(f"No module named '{name}'", name=name)

    monkeypatch.setattr(evaluate.importlib, "import_module", not_installed)
    with pytest.raises(evaluate.MissingPackageError, match="PESQ score needs the 'pesq' package"):
        evaluate.pesq_wideband(np.zeros(16000), np.zeros(16000), 16000)


# ---- the command line ----

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """references a, b, c, d; syntheses: a as a_synthesis.wav, b as b.wav and shorter, c at 16 kHz, d missing."""
    root = tmp_path_factory.mktemp("scores")
    clips = {name: speechlike(1.0, RATE, f0=100.0 + 20 * i, seed=i) for i, name in enumerate("abcd")}
    for name, audio in clips.items():
        write_wav(root / "reference" / f"{name}.wav", audio, RATE)
    write_wav(root / "synthesis" / "a_synthesis.wav", clips["a"], RATE)
    write_wav(root / "synthesis" / "b.wav", clips["b"][:int(0.8 * RATE)], RATE)
    write_wav(root / "synthesis" / "c_synthesis.wav", evaluate.resample(clips["c"], RATE, 16000), 16000)
    return root


def test_cli_pairs_cuts_resamples_and_writes_json(folders, capsys):
    out = folders / "scores.json"
    assert evaluate.main(["--reference", str(folders / "reference"), "--synthesis", str(folders / "synthesis"),
                          "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 references have no synthesis" in captured.err and "(d)" in captured.err
    report = json.loads(out.read_text())
    assert set(report) == {"mean", "clips"}
    assert set(report["clips"]) == {"a", "b", "c"}
    for scores in [report["mean"], *report["clips"].values()]:
        assert set(scores) == set(evaluate.SCORE_KEYS)
    for name in "ab":  # b is the reference's first 0.8 s: cut to it, the pair is identical
        assert report["clips"][name]["mcd_db"] == pytest.approx(0.0, abs=1e-6)
        assert report["clips"][name]["pesq"] > 4.6
    c = report["clips"]["c"]  # brought back from 16 kHz: what 8 kHz and below carry is intact
    assert c["pesq"] > 4.6 and c["stoi"] > 0.999 and c["mel_l1"] < 0.05 and c["f0_rmse_cents"] < 5
    assert c["vuv_error"] < 0.02
    reference = sf.read(str(folders / "reference" / "c.wav"))[0]
    round_trip = evaluate.resample(evaluate.resample(reference, RATE, 16000), 16000, RATE)
    # the full-band scores see the empty band from 8 kHz to 11 kHz, as they do in memory
    assert c["mcd_db"] == pytest.approx(evaluate.world_scores(reference, round_trip, RATE)["mcd_db"], rel=0.02)
    assert c["mcd_db"] > 10
    assert report["mean"]["mcd_db"] == pytest.approx(np.mean([s["mcd_db"] for s in report["clips"].values()]))
    table = captured.out.splitlines()
    assert table[0].split() == ["score", "mean", "clips"]
    assert [line.split()[0] for line in table[1:8]] == list(evaluate.SCORE_KEYS)


def test_cli_pairs_syntheses_written_next_to_their_references(tmp_path):
    audio = speechlike(1.0, RATE, seed=3)
    write_wav(tmp_path / "x.wav", audio, RATE)
    write_wav(tmp_path / "x_synthesis.wav", with_noise(audio, 20), RATE)
    pairs, unmatched = evaluate.find_pairs(str(tmp_path), str(tmp_path))
    assert pairs == [("x", str(tmp_path / "x.wav"), str(tmp_path / "x_synthesis.wav"))] and unmatched == []


def test_cli_errors_name_what_is_wrong(folders, tmp_path, capsys):
    reference = str(folders / "reference")
    assert evaluate.main(["--reference", str(tmp_path / "nowhere"), "--synthesis", reference]) == 1
    assert "--reference folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert evaluate.main(["--reference", reference, "--synthesis", str(tmp_path / "empty")]) == 1
    assert "a_synthesis.wav or a.wav" in capsys.readouterr().err
    broken = tmp_path / "broken"
    write_wav(broken / "a_synthesis.wav", speechlike(1.0, RATE, f0=100.0, seed=0), RATE)
    (broken / "b.wav").write_bytes(b"not a wav file")
    assert evaluate.main(["--reference", reference, "--synthesis", str(broken), "-o", str(tmp_path / "s.json")]) == 1
    assert str(broken / "b.wav") in capsys.readouterr().err
    assert set(json.loads((tmp_path / "s.json").read_text())["clips"]) == {"a"}  # the readable pair is scored


def test_a_stereo_synthesis_is_mixed_down(tmp_path):
    audio = speechlike(1.0, RATE, seed=4)
    write_wav(tmp_path / "ref" / "s.wav", audio, RATE)
    (tmp_path / "syn").mkdir()
    sf.write(str(tmp_path / "syn" / "s.wav"), np.stack([audio, audio], axis=1), RATE, subtype="PCM_16")
    assert evaluate.main(["--reference", str(tmp_path / "ref"), "--synthesis", str(tmp_path / "syn"),
                          "-o", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["clips"]["s"]["mcd_db"] == pytest.approx(0.0, abs=1e-6)

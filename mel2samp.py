"""Audio in, mel spectrograms out: wav/flac reading, the Tacotron 2 mel, file lists and the training dataset.

The mel is Tacotron 2's TacotronSTFT, so mels made by Tacotron 2 (or FastPitch) drive a vocoder trained here.
A training list may give a mel beside each clip (`clip.wav|clip.npy`, an (n_mel, frames) array, or a .pt
tensor): training then reads that mel instead of computing one, e.g. to fine-tune on an acoustic model's
ground-truth-aligned predictions.
The mel and the dataset each build from a config's data_config in one call, TacotronSTFT.from_config(data_config,
n_mel) and Mel2Samp.from_config(files, data_config, **options); config.load_config reads and checks the file.

    python mel2samp.py -f wav_list.txt -o mels/ -c config.json [-j 8]    # <name>.wav.pt per clip
                                                  # (the mel of data_config, waveglow_config.n_mel_channels bands;
                                                  # any rate and hop, e.g. -c configs/16k_hop200.json)
    python mel2samp.py --make_split LJSpeech-1.1 -o filelists/ [--n_test 10]
"""
import argparse
import concurrent.futures
import logging
import math
import os
import pickle
import sys
import zlib
from collections import Counter

import librosa
import numpy as np
import soundfile as sf
import torch

from config import load_config

MAX_WAV_VALUE = 32768.0
AUDIO_EXTENSIONS = (".wav", ".flac")
MEL_EXTENSIONS = (".npy", ".pt")  # a list line's second field names a mel only with one of these endings
SILENT_LOG_MEL = math.log(1e-5)   # the log mel of silence: TacotronSTFT's clamp floor
logger = logging.getLogger("mel2samp")
_already_warned = set()  # a corpus of stereo or 44.1 kHz files says so once per process, not once per read


class AudioError(Exception):
    """An audio file that cannot be used; the message names the file and the problem."""

    def __init__(self, path, problem=None):
        if problem is None:  # rebuilt from one message: a DataLoader worker's error re-raised in the main process
            lines = [line for line in str(path).splitlines() if line.strip()]
            message = lines[-1].split("AudioError: ", 1)[-1] if lines else str(path)  # the original, not its traceback
            path, problem = message.split(": ", 1) if ": " in message else (message, "unusable")
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


def _soundfile_path(path):
    # soundfile encodes str paths strictly as UTF-8, which fails for names that are not (Python keeps their
    # bytes as surrogates); the bytes themselves open any name the OS can. Windows takes wide-char str paths.
    return os.fsencode(path) if os.name != "nt" else path


def _warn_once(issue, message):
    if issue not in _already_warned:
        _already_warned.add(issue)
        logger.warning(message)


def load_wav_to_torch(path, sampling_rate=None, resample=True):
    """Read a wav/flac file as a 1-D float tensor at int16 scale (16-bit files give their exact sample values).

    With `sampling_rate` given, audio at another rate is resampled (resample=True, with a warning) or refused.
    Returns (audio, sampling_rate of the returned audio). Raises AudioError naming the file and the problem.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise AudioError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        # float32 holds every 16- and 24-bit sample exactly; libsndfile scales integer files to [-1, 1)
        audio, file_rate = sf.read(_soundfile_path(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as error:
        reason = getattr(error, "error_string", None) or error  # libsndfile's reason, without the path again
        raise AudioError(path, f"cannot read it as audio (corrupt or unsupported format): {reason}") from None
    if audio.shape[0] == 0:
        raise AudioError(path, "contains no samples")
    if not np.isfinite(audio).all():
        raise AudioError(path, "contains NaN or infinite samples")
    if audio.shape[1] > 1:
        _warn_once(("channels", audio.shape[1]), f"mixing {audio.shape[1]}-channel audio down to mono "
                                                 f"(first such file: {path})")
    audio = audio.mean(axis=1, dtype=np.float32) if audio.shape[1] > 1 else audio[:, 0]
    if np.abs(audio).max() > 1.0:  # only float files can exceed full scale; the model's targets live in [-1, 1]
        _warn_once(("clip", path), f"{path}: float samples beyond full scale, clipping to [-1, 1]")
        audio = np.clip(audio, -1.0, 1.0)
    if sampling_rate is not None and file_rate != sampling_rate:
        if not resample:
            raise AudioError(path, f"sample rate is {file_rate} Hz but the config expects {sampling_rate} Hz; "
                                   f"resample the corpus (e.g. sox in.wav -r {sampling_rate} out.wav) "
                                   f"or allow resampling")
        import soxr  # only needed for corpora at the wrong rate
        _warn_once(("rate", file_rate), f"resampling {file_rate} Hz audio to {sampling_rate} Hz on every read "
                                        f"(first such file: {path}); resampling the corpus once saves the time")
        audio = soxr.resample(audio, file_rate, sampling_rate).astype(np.float32)
        file_rate = sampling_rate
    return torch.from_numpy(audio * np.float32(MAX_WAV_VALUE)), file_rate


class TacotronSTFT(torch.nn.Module):
    """Tacotron 2's mel: periodic Hann, centred reflect-padded frames, |STFT|, Slaney mel, log(clamp(., 1e-5)).

    The transform runs in float64 because a float32 FFT puts rounding noise of ~1e-7 of a frame's loudest bin
    into every bin; quiet bins next to a loud tone then drift by 1e-3 in log mel, well off the definition.
    """

    def __init__(self, filter_length=1024, hop_length=256, win_length=1024, n_mel_channels=80,
                 sampling_rate=22050, mel_fmin=0.0, mel_fmax=8000.0):
        super().__init__()
        if win_length > filter_length:
            raise ValueError(f"win_length {win_length} is longer than filter_length {filter_length}")
        self.filter_length, self.hop_length, self.win_length = filter_length, hop_length, win_length
        self.n_mel_channels, self.sampling_rate = n_mel_channels, sampling_rate
        mel_basis = librosa.filters.mel(sr=sampling_rate, n_fft=filter_length, n_mels=n_mel_channels,
                                        fmin=mel_fmin, fmax=mel_fmax, dtype=np.float64)
        # not persistent: derived from the arguments, so nothing stale can come back from a state dict
        self.register_buffer("mel_basis", torch.from_numpy(mel_basis), persistent=False)
        self.register_buffer("window", torch.hann_window(win_length, periodic=True, dtype=torch.float64),
                             persistent=False)

    @classmethod
    def from_config(cls, data_config, n_mel_channels=80):
        """The mel of a config's data_config section (n_mel_channels is the model's, from waveglow_config)."""
        return cls(data_config["filter_length"], data_config["hop_length"], data_config["win_length"], n_mel_channels,
                   data_config["sampling_rate"], data_config["mel_fmin"], data_config["mel_fmax"])

    def spectral_normalize(self, magnitudes):
        return torch.log(torch.clamp(magnitudes, min=1e-5))

    @torch.no_grad()
    def mel_spectrogram(self, y):
        """y: (B, T) audio in [-1, 1] on any device -> (B, n_mel, 1 + T // hop), float32 (float64 for float64 y)."""
        if y.dim() != 2:
            raise ValueError(f"mel_spectrogram takes audio of shape (batch, samples), got {tuple(y.shape)}")
        if y.shape[1] <= self.filter_length // 2:
            raise ValueError(f"{y.shape[1]} samples is too short for a reflect-padded STFT: "
                             f"needs more than filter_length/2 = {self.filter_length // 2}")
        out_dtype, out_device = torch.promote_types(y.dtype, torch.float32), y.device
        # MPS has no float64 and NPU float64 FFT support varies; a mel is cheap enough to make on the CPU there
        device = y.device if y.device.type in ("cpu", "cuda") else torch.device("cpu")
        spectrum = torch.stft(y.to(device, torch.float64), self.filter_length, self.hop_length, self.win_length,
                              window=self.window.to(device), center=True, pad_mode="reflect",
                              return_complex=True)
        mel = torch.matmul(self.mel_basis.to(device), spectrum.abs())
        return self.spectral_normalize(mel).to(out_device, out_dtype)


def _audio_files_in(folder):
    """An LJ-Speech folder (ids from metadata.csv), a folder with wavs/, or a plain folder of audio files."""
    wavs = os.path.join(folder, "wavs")
    metadata = os.path.join(folder, "metadata.csv")
    if os.path.isdir(wavs) and os.path.isfile(metadata):
        with open(metadata, encoding="utf-8", errors="surrogateescape") as f:  # see files_to_list
            ids = [line.split("|")[0].strip() for line in f if line.strip()]
        return [os.path.join(wavs, clip_id + ".wav") for clip_id in ids]
    audio_dir = wavs if os.path.isdir(wavs) else folder
    return [os.path.join(audio_dir, name) for name in sorted(os.listdir(audio_dir))
            if name.lower().endswith(AUDIO_EXTENSIONS)]


def _list_line(line):
    """(audio path, mel path or None) of one list line: `path`, Tacotron 2's `path|text` or `path|mel.npy`."""
    fields = [field.strip() for field in line.split("|")]
    mel = fields[1] if len(fields) > 1 and fields[1].lower().endswith(MEL_EXTENSIONS) else None
    return fields[0], mel


def list_entries(filename_or_folder, data_root=None):
    """(audio path, given mel path or None) pairs of a list file or a folder, both absolute (see files_to_list).

    A line's second field is a mel when it ends in .npy or .pt (anything else, a transcript, is ignored);
    relative mel paths resolve like the audio paths.
    """
    source = str(filename_or_folder)
    if os.path.isdir(source):
        entries, base = [(p, None) for p in _audio_files_in(os.path.abspath(source))], None
    elif os.path.basename(source) == "metadata.csv":
        entries, base = [(p, None) for p in _audio_files_in(os.path.dirname(os.path.abspath(source)))], None
    elif os.path.isfile(source):
        # Bytes that are not UTF-8 (a file name in another encoding, a Latin-1 transcript) pass through as
        # surrogates, which the os functions turn back into the same bytes: such a file is found, not a crash.
        with open(source, encoding="utf-8", errors="surrogateescape") as f:
            entries = [_list_line(line) for line in f if line.strip()]
        base = os.path.dirname(os.path.abspath(source))
    else:
        raise FileNotFoundError(f"file list {source} not found: give a list of audio paths, a Tacotron 2 "
                                f"'path|text' list, an 'audio|mel.npy' list or an LJ-Speech folder")
    if not entries:
        raise ValueError(f"{source} lists no audio files")
    base = os.path.abspath(data_root) if data_root else base

    def resolve(path):
        if not os.path.isabs(path):
            candidate = os.path.join(base, path)
            path = path if not os.path.exists(candidate) and os.path.exists(path) else candidate
        return os.path.abspath(path)
    return [(resolve(audio), resolve(mel) if mel else None) for audio, mel in entries]


def files_to_list(filename_or_folder, data_root=None):
    """Audio paths from a list file (`path`, Tacotron 2 `path|text` or `path|mel.npy` lines) or a folder
    (see _audio_files_in).

    Relative paths resolve against `data_root` if given, else the list's own folder; a path found only
    relative to the working directory (upstream's convention) is accepted too. Returns absolute paths.
    """
    return [audio for audio, _ in list_entries(filename_or_folder, data_root)]


def mel_layout_problem(shape, n_mel_channels):
    """What is wrong with a given mel of `shape` (None if it is (n_mel_channels, frames) or (1, n_mel, frames))."""
    shape = tuple(shape)
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        return f"mel of shape {shape}: expected (n_mel_channels={n_mel_channels}, frames)"
    if shape[0] == n_mel_channels:
        return None
    if shape[1] == n_mel_channels:
        return (f"mel of shape {shape} is time-major (frames, bands): save it band-major, "
                f"({n_mel_channels}, frames), e.g. np.save(path, mel.T)")
    return (f"mel has {shape[0]} bands (shape {shape}) but waveglow_config.n_mel_channels is {n_mel_channels}: "
            f"make the mels with {n_mel_channels} bands, as the vocoder takes them")


def _read_mel_file(path):
    """The tensor in a .npy (numpy.save) or .pt (torch.save) file, as saved; never unpickles arbitrary objects."""
    try:
        if path.lower().endswith(".npy"):
            mel = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            mel = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AudioError(path, f"cannot read it as a mel (a .npy array or a torch.save'd tensor): {problem}") from None
    if not isinstance(mel, torch.Tensor) or not mel.is_floating_point():
        kind = f"a {mel.dtype} array" if isinstance(mel, torch.Tensor) else f"a {type(mel).__name__}"
        raise AudioError(path, f"holds {kind}, not a floating-point (n_mel_channels, frames) mel")
    return mel


def load_given_mel(path, n_mel_channels):
    """A mel saved beside its clip (.npy or .pt) as an (n_mel, frames) float32 tensor.
    Raises AudioError naming the file and the problem (for a wrong layout, with how to fix it)."""
    mel = _read_mel_file(path)
    problem = mel_layout_problem(mel.shape, n_mel_channels)
    if problem:
        raise AudioError(path, problem)
    mel = mel.reshape(mel.shape[-2:]).float()
    if not torch.isfinite(mel).all():
        raise AudioError(path, "mel contains NaN or infinite values")
    return mel


def _check_header(path, sampling_rate, min_samples):
    """The problem with a file found from its header alone (cheap), or None."""
    if not os.path.isfile(path):
        return "file not found"
    try:
        info = sf.info(_soundfile_path(path))
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as error:
        return f"cannot read it as audio (corrupt or unsupported format): {getattr(error, 'error_string', None) or error}"
    if info.frames == 0:
        return "contains no samples"
    if info.frames * sampling_rate / info.samplerate < min_samples:
        return f"{info.frames} samples, shorter than one hop ({min_samples})"
    return None


class Mel2Samp(torch.utils.data.Dataset):
    """(mel (n_mel, segment_length // hop + 1), audio (segment_length,) in [-1, 1]) pairs cropped from clips.

    Crops: `deterministic=True` gives each file one fixed crop (validation); otherwise the crop of item i is
    a pure function of (seed, rank, epoch, i), so it is reproducible on resume and independent of the
    DataLoader's worker count. Bad files: skip_bad_files=True drops files whose header is bad at construction
    and replaces items that fail when read (counted in .skipped); strict=True raises instead.

    Given mels (`audio|mel.npy` list lines, or (audio, mel) pairs in a list): the audio crop starts on a
    frame boundary, start = m * hop, and the mel crop is the given mel's frames m .. m + segment_length // hop,
    the frames get_mel of the crop would have (frame i centred at sample i * hop). A given mel must have
    1 + samples // hop frames, give or take one; one that does not is a bad file.
    """

    def __init__(self, training_files, segment_length, filter_length, hop_length, win_length, sampling_rate,
                 mel_fmin, mel_fmax, *, n_mel_channels=80, data_root=None, deterministic=False, seed=1234,
                 rank=0, skip_bad_files=True, strict=False, resample=True):
        if isinstance(training_files, (list, tuple)):  # paths, or (audio, mel) pairs
            root = os.path.abspath(data_root or ".")
            pairs = [(item, None) if isinstance(item, (str, os.PathLike)) else tuple(item) for item in training_files]
            entries = [tuple(os.path.abspath(os.path.join(root, str(p))) if p else None for p in pair)
                       for pair in pairs]
        else:
            entries = list_entries(training_files, data_root)
        self.audio_files = [audio for audio, _ in entries]
        self.mel_files = [mel for _, mel in entries]  # None: computed from the audio
        self.n_mel_channels = n_mel_channels
        self.segment_length, self.hop_length, self.sampling_rate = segment_length, hop_length, sampling_rate
        self.deterministic, self.seed, self.rank, self.epoch = deterministic, seed, rank, 0
        self.skip_bad_files, self.strict, self.resample = skip_bad_files, strict, resample
        self.stft = TacotronSTFT(filter_length, hop_length, win_length, n_mel_channels, sampling_rate,
                                 mel_fmin, mel_fmax)
        self.dropped = 0
        source = training_files if isinstance(training_files, (str, os.PathLike)) else "the list"
        if skip_bad_files or strict:
            self._drop_bad_headers(source)
        self._check_first_given_mel(source)
        # one flag per file in shared memory, so DataLoader workers' read-time failures count in the parent
        self._failed = torch.zeros(len(self.audio_files), dtype=torch.uint8).share_memory_()

    @classmethod
    def from_config(cls, training_files, data_config, **options):
        """The dataset of `training_files` cut and mel'd as a config's data_config says; `options` are the
        keyword arguments of the constructor (n_mel_channels, seed, rank, deterministic, strict, ...)."""
        return cls(training_files, data_config["segment_length"], data_config["filter_length"],
                   data_config["hop_length"], data_config["win_length"], data_config["sampling_rate"],
                   data_config["mel_fmin"], data_config["mel_fmax"], **options)

    def _drop_bad_headers(self, source):
        problems = [(p, _check_header(p, self.sampling_rate, self.hop_length) or
                     (f"its mel {m} not found" if m and not os.path.isfile(m) else None))
                    for p, m in zip(self.audio_files, self.mel_files, strict=True)]
        if not self.resample:  # a corpus at the wrong rate is a setup mistake, not a bad file to skip
            rates = [(p, sf.info(_soundfile_path(p)).samplerate) for p, problem in problems if not problem]
            wrong = [f"{p} ({rate} Hz)" for p, rate in rates if rate != self.sampling_rate]
            if wrong:
                raise AudioError(source, f"{len(wrong)} files are not at {self.sampling_rate} Hz and resampling "
                                         f"is off: {', '.join(wrong[:3])}; resample the corpus or allow it")
        bad = [f"{p}: {problem}" for p, problem in problems if problem]
        if not bad:
            return
        summary = f"{len(bad)} of {len(self.audio_files)} listed files are unusable: " + \
                  "; ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
        if self.strict:
            raise AudioError(source, summary)
        kept = [i for i, (_, problem) in enumerate(problems) if not problem]
        self.audio_files = [self.audio_files[i] for i in kept]
        self.mel_files = [self.mel_files[i] for i in kept]
        self.dropped = len(bad)
        logger.warning(f"{source}: skipping {summary}")
        if not self.audio_files:
            raise AudioError(source, "no usable audio files left: " + summary)

    def _check_first_given_mel(self, source):
        """Mels saved time-major or with another band count are a mistake of the whole list, not of one file:
        the first given mel's layout says so before training starts."""
        first = next((m for m in self.mel_files if m), None)
        if first is None:
            return
        try:
            shape = _read_mel_file(first).shape
        except AudioError:
            return  # unreadable: a bad file like any other, found when it is read
        problem = mel_layout_problem(shape, self.n_mel_channels)
        if problem:
            raise AudioError(first, f"{problem} (the first given mel of {source})")

    @property
    def skipped(self):
        """Files dropped at construction plus files that failed when read, in any DataLoader worker."""
        return self.dropped + int(self._failed.sum())

    def set_epoch(self, epoch):
        self.epoch = epoch

    def get_mel(self, audio):
        """1-D audio at int16 scale -> (n_mel, 1 + T // hop) log mel."""
        return self.stft.mel_spectrogram((audio / MAX_WAV_VALUE).unsqueeze(0)).squeeze(0)

    def _load(self, path):
        audio, _ = load_wav_to_torch(path, self.sampling_rate, self.resample)
        if audio.numel() < self.hop_length:
            raise AudioError(path, f"{audio.numel()} samples, shorter than one hop ({self.hop_length})")
        return audio

    def _load_given_mel(self, path, audio_path, samples):
        """The given mel of a clip of `samples` samples, checked to fit it; one frame short gets its last again."""
        mel = load_given_mel(path, self.n_mel_channels)  # (n_mel, frames)
        expected = 1 + samples // self.hop_length
        if abs(mel.shape[1] - expected) > 1:
            raise AudioError(path, f"{mel.shape[1]} mel frames, but its audio {audio_path} ({samples} samples) "
                                   f"makes {expected} at hop {self.hop_length}: a mel of other audio, or of "
                                   f"another hop_length or sampling_rate")
        if mel.shape[1] < expected:
            mel = torch.cat([mel, mel[:, -1:]], dim=1)
        return mel

    def _crop_start(self, index, path, positions):
        """One of `positions` crop positions, 0 .. positions - 1."""
        if self.deterministic:  # keyed by file name, so dropping or reordering files leaves other crops alone
            key = [self.seed, zlib.crc32(os.path.basename(path).encode())]
        else:
            key = [self.seed, self.rank, self.epoch, index]
        return int(np.random.default_rng(key).integers(0, positions))

    def _read_item(self, index):
        """(file number, audio, given mel or None) of item `index`: a later file where one is bad and skipped."""
        n, last_error = len(self.audio_files), None
        for attempt in range(n):
            i = (index + attempt) % n
            if self._failed[i]:
                continue
            try:
                audio = self._load(self.audio_files[i])
                mel = self._load_given_mel(self.mel_files[i], self.audio_files[i], audio.numel()) \
                    if self.mel_files[i] else None
                return i, audio, mel
            except AudioError as error:
                if self.strict or not self.skip_bad_files:
                    raise
                self._failed[i], last_error = 1, error
                logger.warning(f"skipping {error} (item {index} takes another file)")
        raise AudioError(self.audio_files[index], f"no listed file could be loaded (last: {last_error})")

    def _crop_with_given_mel(self, index, path, audio, mel):
        """The audio crop, starting on a frame boundary, and the given mel's frames get_mel of it would have."""
        hop, frames = self.hop_length, 1 + self.segment_length // self.hop_length
        if audio.numel() >= self.segment_length:
            first_frame = self._crop_start(index, path, (audio.numel() - self.segment_length) // hop + 1)
            audio = audio[first_frame * hop:first_frame * hop + self.segment_length]
            mel = mel[:, first_frame:first_frame + frames]
        else:  # zero-padded audio: silent frames after the clip's own
            audio = torch.nn.functional.pad(audio, (0, self.segment_length - audio.numel()))
            mel = mel[:, :frames]
            mel = torch.nn.functional.pad(mel, (0, frames - mel.shape[1]), value=SILENT_LOG_MEL)
        return mel.contiguous(), audio / MAX_WAV_VALUE

    def __getitem__(self, index):
        i, audio, mel = self._read_item(index)
        if mel is not None:
            return self._crop_with_given_mel(index, self.audio_files[i], audio, mel)
        if audio.numel() >= self.segment_length:
            start = self._crop_start(index, self.audio_files[i], audio.numel() - self.segment_length + 1)
            audio = audio[start:start + self.segment_length]
        else:
            audio = torch.nn.functional.pad(audio, (0, self.segment_length - audio.numel()))
        return self.get_mel(audio), audio / MAX_WAV_VALUE

    def __len__(self):
        return len(self.audio_files)


def make_split(data_path, out_dir, n_test=10):
    """The conventional split: first `n_test` sorted audio files are the test set, the rest train.

    `data_path` is an LJ-Speech folder (wavs/) or a folder of audio files. Writes train_files.txt and
    test_files.txt (absolute paths) into `out_dir`, never into the data folder. Returns both paths.
    """
    data_path = os.path.abspath(data_path)
    audio_dir = os.path.join(data_path, "wavs") if os.path.isdir(os.path.join(data_path, "wavs")) else data_path
    if not os.path.isdir(audio_dir):
        raise FileNotFoundError(f"data folder {data_path} not found")
    files = sorted(os.path.join(audio_dir, name) for name in os.listdir(audio_dir)
                   if name.lower().endswith(AUDIO_EXTENSIONS))
    if len(files) <= n_test:
        raise ValueError(f"{audio_dir} holds {len(files)} audio files; the split needs more than n_test={n_test}")
    out_dir = os.path.abspath(out_dir)
    if os.path.commonpath([os.path.realpath(out_dir), os.path.realpath(data_path)]) == os.path.realpath(data_path):
        raise ValueError(f"file lists go beside the data, not into it: choose an output folder outside {data_path}")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, subset in (("train_files.txt", files[n_test:]), ("test_files.txt", files[:n_test])):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write("\n".join(subset) + "\n")
        os.replace(path + ".tmp", path)
        written.append(path)
    return tuple(written)


# ---- the mel CLI: whole files to <name>.wav.pt, in parallel ----
_worker_stft, _worker_options = None, None


def _init_worker(stft, resample):
    global _worker_stft, _worker_options
    torch.set_num_threads(1)  # the parallelism is across files
    _worker_stft, _worker_options = stft, (stft.sampling_rate, resample)


def _mel_file(path, output_dir):
    """Write the mel of one whole file atomically; returns (path, None) or (path, problem)."""
    tmp_path = None
    try:
        audio, _ = load_wav_to_torch(path, *_worker_options)
        if audio.numel() <= _worker_stft.filter_length // 2:
            raise AudioError(path, f"{audio.numel()} samples, too short for a mel "
                                   f"(needs more than {_worker_stft.filter_length // 2})")
        mel = _worker_stft.mel_spectrogram((audio / MAX_WAV_VALUE).unsqueeze(0)).squeeze(0).contiguous()
        name = os.path.basename(path) + ".pt"
        tmp_path = os.path.join(output_dir, f".{name}.{os.getpid()}.tmp")  # hidden until complete
        torch.save(mel, tmp_path)
        os.replace(tmp_path, os.path.join(output_dir, name))
        return path, None
    except Exception as error:  # reported per file; the others still get made
        if tmp_path and os.path.exists(tmp_path):
            os.remove(tmp_path)
        return path, str(error) if isinstance(error, AudioError) else f"{path}: {error!r}"


def _write_mels(args):
    from tqdm import tqdm
    config = load_config(args.config)
    # built once here (the filterbank takes librosa a second) and handed to every worker
    stft = TacotronSTFT.from_config(config["data_config"], config["waveglow_config"]["n_mel_channels"])
    data = config["data_config"]
    top = data["mel_fmax"] if data["mel_fmax"] is not None else data["sampling_rate"] / 2
    print(f"mels of {args.config}: {stft.n_mel_channels} bands over {data['mel_fmin']:g}-{top:g} Hz of "
          f"{data['sampling_rate']} Hz audio, hop {data['hop_length']}, window {data['win_length']} "
          f"(FFT {data['filter_length']})")
    files = files_to_list(args.filelist_path, args.data_root)
    clashes = sorted(n for n, count in Counter(os.path.basename(p) for p in files).items() if count > 1)
    if clashes:
        sys.exit(f"error: several listed files share a name ({', '.join(clashes[:3])}); "
                 f"outputs are named <file name>.pt, so rename them or make mels one folder at a time")
    os.makedirs(args.output_dir, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, min(args.workers or cores, len(files)))
    failures = []
    with tqdm(total=len(files), unit="file") as progress:
        if workers == 1:
            _init_worker(stft, not args.no_resample)
            for _, problem in (_mel_file(p, args.output_dir) for p in files):
                failures += [problem] if problem else []
                progress.update()
        else:
            with concurrent.futures.ProcessPoolExecutor(workers, initializer=_init_worker,
                                                        initargs=(stft, not args.no_resample)) as pool:
                futures = [pool.submit(_mel_file, p, args.output_dir) for p in files]
                for future in concurrent.futures.as_completed(futures):
                    _, problem = future.result()
                    failures += [problem] if problem else []
                    progress.update()
    print(f"wrote {len(files) - len(failures)} mels to {args.output_dir}")
    if failures:
        print(f"{len(failures)} files failed and were skipped:", file=sys.stderr)
        for problem in failures:
            print("  " + problem, file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Mel spectrograms of whole audio files, or the train/test split")
    parser.add_argument("-f", "--filelist_path", help="audio list (path or path|text lines) or LJ-Speech folder")
    parser.add_argument("-o", "--output_dir", required=True, help="where the .wav.pt files or the lists go")
    parser.add_argument("-c", "--config", help="config.json whose data_config defines the mel")
    parser.add_argument("-j", "--workers", type=int, default=0, help="parallel processes (default: all cores)")
    parser.add_argument("--data_root", default=None, help="folder that relative paths in the list start from")
    parser.add_argument("--no_resample", action="store_true", help="refuse files at another sample rate")
    parser.add_argument("--make_split", metavar="DATA_PATH", help="write train_files.txt and test_files.txt")
    parser.add_argument("--n_test", type=int, default=10, help="files in the test list (first in sorted order)")
    args = parser.parse_args(argv)
    try:
        if args.make_split:
            train, test = make_split(args.make_split, args.output_dir, args.n_test)
            print(f"wrote {train} and {test}")
        elif args.filelist_path and args.config:
            _write_mels(args)
        else:
            parser.error("give -f LIST -c CONFIG -o OUT_DIR to make mels, or --make_split DATA_PATH -o OUT_DIR")
    except (FileNotFoundError, ValueError, AudioError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()

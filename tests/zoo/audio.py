"""Audio for the corpus: speech from espeak-ng when the machine has it, else a formant-synthesised
stand-in; musical tones with known pitch; resampling and mel features, all in numpy."""

from __future__ import annotations

import functools
import math
import shutil
import subprocess
import tempfile
import wave
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ESPEAK_RATE = 22050

# espeak-ng voices (language + variant) that sound clearly different from one another.
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+f4", "en+m3", "en-gb-scotland", "en-029", "en-us+f2", "en+m7")


def espeak_binary() -> str | None:
    return shutil.which("espeak-ng")


@dataclass(frozen=True)
class Utterance:
    text: str
    voice: str
    speed: int  # words per minute
    pitch: int  # espeak 0..99
    wave: np.ndarray  # float32 in [-1, 1] at ``rate``
    rate: int
    source: str  # "espeak-ng" or "synthetic"


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        rate = w.getframerate()
        width = w.getsampwidth()
        raw = w.readframes(w.getnframes())
        channels = w.getnchannels()
    if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit audio, expected 16-bit")
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return x, rate


@functools.lru_cache(maxsize=512)
def _espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    exe = espeak_binary()
    assert exe is not None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), text],
                       check=True, capture_output=True, timeout=60)
        x, rate = _read_wav(out)
    if rate != ESPEAK_RATE:
        x = resample(x, rate, ESPEAK_RATE)
    return x


def _synthetic_speech(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """A speech-like stand-in when espeak-ng is missing: a glottal pulse train with a drifting pitch
    contour through three moving formant resonators, one "syllable" per vowel group of the text."""
    seed = zlib.crc32(f"{text}|{voice}|{speed}|{pitch}".encode())
    rng = np.random.default_rng(seed)
    rate = ESPEAK_RATE
    syllables = max(1, sum(1 for i, c in enumerate(text.lower()) if c in "aeiouy" and
                           (i == 0 or text.lower()[i - 1] not in "aeiouy")))
    syl_len = 60.0 / max(speed, 60) * 0.55
    n = int(rate * (syllables * syl_len + 0.2))
    t = np.arange(n) / rate
    base = 90.0 + 1.6 * pitch + (60.0 if "+f" in voice else 0.0)
    f0 = base * (1.0 + 0.12 * np.sin(2 * np.pi * 0.8 * t + rng.uniform(0, 6)) - 0.1 * t / t[-1])
    phase = np.cumsum(2 * np.pi * f0 / rate)
    src = np.zeros(n)
    for k in range(1, 30):
        src += np.sin(k * phase) / k
    env = np.zeros(n)
    for s in range(syllables):
        a, b = int(rate * (0.1 + s * syl_len)), int(rate * (0.1 + (s + 0.8) * syl_len))
        env[a:b] = np.hanning(b - a)
    formants = rng.choice([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480],
                           [640, 1190, 2390]], size=syllables)
    spec = np.fft.rfft(src * env)
    freqs = np.fft.rfftfreq(n, 1 / rate)
    fmean = formants.mean(axis=0)
    gain = sum(1.0 / (1.0 + ((freqs - f) / (60 + 0.05 * f)) ** 2) for f in fmean)
    out = np.fft.irfft(spec * gain, n)
    out += 0.003 * rng.standard_normal(n)
    return (0.5 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def speak(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> Utterance:
    if espeak_binary():
        return Utterance(text, voice, speed, pitch, _espeak(text, voice, speed, pitch), ESPEAK_RATE, "espeak-ng")
    return Utterance(text, voice, speed, pitch, _synthetic_speech(text, voice, speed, pitch), ESPEAK_RATE,
                     "synthetic")


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling through the spectrum (the clip treated as one period, edges tapered)."""
    if rate_in == rate_out:
        return x.astype(np.float32)
    n_out = int(round(len(x) * rate_out / rate_in))
    # Zero-pad to a length whose FFT is fast and which maps to a whole number of output samples (the
    # leading pad too, so the output starts exactly on an input sample).
    g = math.gcd(rate_in, rate_out)
    step = rate_in // g
    pad = step * math.ceil(0.05 * rate_in / step)
    blocks = 1 << max(0, math.ceil(math.log2((len(x) + 2 * pad) / step)))
    xp = np.zeros(step * blocks)
    xp[pad : pad + len(x)] = x
    spec = np.fft.rfft(xp)
    m = (rate_out // g) * blocks
    keep = min(len(spec), m // 2 + 1)
    out_spec = np.zeros(m // 2 + 1, dtype=complex)
    out_spec[:keep] = spec[:keep]
    y = np.fft.irfft(out_spec, m) * (m / len(xp))
    start = pad * rate_out // rate_in
    return y[start : start + n_out].astype(np.float32)


def place(x: np.ndarray, length: int, end_at: int | None = None, rng: np.random.Generator | None = None,
          noise: float = 0.0) -> np.ndarray:
    """``x`` placed in a clip of ``length`` samples: ending at ``end_at`` (or centred), cut to fit, with
    optional background noise at ``noise`` RMS."""
    out = np.zeros(length, dtype=np.float32)
    if end_at is None:
        end_at = min(length, (length + len(x)) // 2)
    start = end_at - len(x)
    a, b = max(0, start), min(length, end_at)
    if b > a:
        out[a:b] = x[a - start : b - start]
    if noise and rng is not None:
        out += (noise * rng.standard_normal(length)).astype(np.float32)
    return out


def harmonic_tone(f0: float, seconds: float, rate: int, rng: np.random.Generator, harmonics: int = 8,
                  vibrato_cents: float = 0.0, decay: float = 0.0, noise: float = 0.0) -> np.ndarray:
    """A periodic tone at ``f0`` with random harmonic amplitudes (its pitch is known exactly), optional
    vibrato, exponential decay (a plucked or struck string) and white noise."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f = f0 * 2.0 ** (vibrato_cents / 1200.0 * np.sin(2 * np.pi * rng.uniform(4, 6) * t))
    phase = 2 * np.pi * np.cumsum(f) / rate
    amps = rng.uniform(0.1, 1.0, harmonics) / np.arange(1, harmonics + 1) ** rng.uniform(0.5, 1.5)
    x = np.zeros(n)
    for k, a in enumerate(amps, start=1):
        if k * f0 < rate / 2 - 200:
            x += a * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    if decay:
        x *= np.exp(-decay * t)
    x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.3, 0.9)
    if noise:
        x += noise * rng.standard_normal(n)
    return x.astype(np.float32)


def midi_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12.0)


# ----------------------------------------------------------------------------------------- features
def hz_to_mel(f: np.ndarray, htk: bool) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    # Slaney: linear below 1 kHz, logarithmic above.
    lin = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, lin)


def mel_to_hz(m: np.ndarray, htk: bool) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    lin = m * (200.0 / 3)
    log = 1000.0 * np.exp((math.log(6.4) / 27.0) * (m - 15.0))
    return np.where(m >= 15.0, log, lin)


@functools.lru_cache(maxsize=16)
def mel_filters(rate: int, n_fft: int, n_mels: int, htk: bool = False) -> np.ndarray:
    """Triangular mel filterbank [n_mels, n_fft // 2 + 1], each filter area-normalised (Slaney norm)."""
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0), htk), hz_to_mel(np.array(rate / 2), htk), n_mels + 2),
                      htk)
    fb = np.zeros((n_mels, len(freqs)))
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        up = (freqs - lo) / (mid - lo)
        down = (hi - freqs) / (hi - mid)
        fb[i] = np.maximum(0.0, np.minimum(up, down)) * (2.0 / (hi - lo))
    return fb.astype(np.float32)


def power_spectrogram(x: np.ndarray, n_fft: int, hop: int, win_length: int | None = None, window: str = "hann",
                      center: bool = True) -> np.ndarray:
    """|STFT|^2 as [frames, n_fft // 2 + 1]; periodic window of ``win_length`` centred in ``n_fft``."""
    win_length = win_length or n_fft
    k = np.arange(win_length)
    if window == "hann":
        w = 0.5 - 0.5 * np.cos(2 * np.pi * k / win_length)
    elif window == "hamming":
        w = 0.54 - 0.46 * np.cos(2 * np.pi * k / win_length)
    else:
        raise ValueError(window)
    win = np.zeros(n_fft)
    off = (n_fft - win_length) // 2
    win[off : off + win_length] = w
    if center:
        x = np.pad(x, (n_fft // 2, n_fft // 2))
    frames = 1 + (len(x) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    spec = np.fft.rfft(x[idx] * win, axis=1)
    return (spec.real**2 + spec.imag**2).astype(np.float32)


def mel_power(x: np.ndarray, rate: int, n_fft: int, hop: int, n_mels: int, win_length: int | None = None,
              window: str = "hann", center: bool = True, htk: bool = False) -> np.ndarray:
    """Mel power spectrogram [frames, n_mels]."""
    return power_spectrogram(x, n_fft, hop, win_length, window, center) @ mel_filters(rate, n_fft, n_mels, htk).T


def normalize_dbfs(x: np.ndarray, target_dbfs: float = -30.0) -> np.ndarray:
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-12)
    return (x * (10 ** (target_dbfs / 20) / rms)).astype(np.float32)


def trim_silence(x: np.ndarray, rate: int, threshold_db: float = -40.0, frame_ms: int = 30) -> np.ndarray:
    """Drop frames more than ``threshold_db`` below the loudest frame (a crude voice-activity cut)."""
    n = int(rate * frame_ms / 1000)
    frames = len(x) // n
    if frames == 0:
        return x
    e = 10 * np.log10(np.mean(x[: frames * n].reshape(frames, n) ** 2, axis=1) + 1e-12)
    keep = e > e.max() + threshold_db
    return x[: frames * n].reshape(frames, n)[keep].reshape(-1)

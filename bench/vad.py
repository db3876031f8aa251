"""silero-vad on real audio: speech from Debian's espeak-ng, silence and noise, streamed chunk by chunk.

Streaming follows silero-vad's own ``OnnxWrapper``: 512-sample chunks at 16 kHz (256 at 8 kHz), each
prefixed with the last 64 (32) samples of the previous one, the recurrent ``state`` carried from call to
call, ``sr`` fed as an int64 scalar where the model takes it. The ``16k_sequence`` variant takes all
windows in one run (its LSTM carries ``h``/``c`` inside). Used by ``tests/test_zoo_tasks.py`` and
``bench/zoo_table.py``; needs ``espeak-ng`` on PATH (``apt-get install espeak-ng``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bench.tasks import TaskCheck

#: What the calibration (verification) inputs say and what the task check says: different texts and voices.
CALIBRATION_SPEECH = ("Data free compression keeps every output close to the original.", "en")
TEST_SPEECH = ("Please call Stella. Ask her to bring these things with her from the store.", "en-us+f3")
#: Calls the sequence variant's calibration windows are cut into (the state carried between them).
SEQUENCE_STEPS = 2
ESPEAK_RATE = 22050


def espeak_available() -> bool:
    """Whether Debian's ``espeak-ng`` is on PATH."""
    return shutil.which("espeak-ng") is not None


def speak(text: str, rate: int, voice: str = "en") -> np.ndarray:
    """``text`` spoken by espeak-ng, as float32 mono in [-1, 1] at ``rate`` Hz."""
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory(prefix="espeak-") as scratch:
        wav = Path(scratch) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True, capture_output=True)
        with wave.open(str(wav)) as reader:
            native = reader.getframerate()
            samples = np.frombuffer(reader.readframes(reader.getnframes()), dtype=np.int16)
    divisor = np.gcd(rate, native)
    return resample_poly(samples / 32768.0, rate // divisor, native // divisor).astype(np.float32)


def vad_signal(
    rate: int, speech: tuple[str, str] = TEST_SPEECH, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Silence, speech, white noise, silence: the audio and a mask of its speech samples."""
    rng = np.random.default_rng(seed)
    voiced = speak(speech[0], rate, speech[1])
    parts = [np.zeros(rate // 2), voiced, 0.02 * rng.standard_normal(rate), np.zeros(rate // 4)]
    mask = np.concatenate([np.full(len(part), index == 1) for index, part in enumerate(parts)])
    return np.concatenate(parts).astype(np.float32), mask


def sample_rates(model: Path) -> tuple[int, ...]:
    """The rates a variant serves: both where it takes ``sr`` and is not a 16k-only export."""
    names = {vi.name for vi in onnx.load(str(model), load_external_data=False).graph.input}
    return (16000, 8000) if "sr" in names and "16k" not in model.name else (16000,)


def vad_windows(audio: np.ndarray, rate: int) -> np.ndarray:
    """[n, context + chunk] windows: each chunk with the previous chunk's tail (zeros at the start)."""
    chunk, context = (512, 64) if rate == 16000 else (256, 32)
    padded = np.pad(audio, (context, (-len(audio)) % chunk))
    starts = range(0, len(padded) - context - chunk + 1, chunk)
    return np.stack([padded[s : s + context + chunk] for s in starts]).astype(np.float32)


def stream(model: Path, audio: np.ndarray, rate: int) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """Speech probability per chunk, and the feed of every call."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = {vi.name for vi in session.get_inputs()}
    windows = vad_windows(audio, rate)
    if "h" in names:  # silero_vad_16k_sequence: one run over the whole window sequence
        zeros = np.zeros((1, 1, 128), np.float32)
        feed = {"input": windows, "h": zeros, "c": zeros}
        return np.asarray(session.run(None, feed)[0]).reshape(-1), [feed]
    state = np.zeros((2, 1, 128), np.float32)
    probabilities, feeds = [], []
    for window in windows:
        feed = {"input": window[None], "state": state}
        if "sr" in names:
            feed["sr"] = np.array(rate, dtype=np.int64)
        probability, state = session.run(None, feed)
        probabilities.append(float(np.asarray(probability).reshape(-1)[0]))
        feeds.append(feed)
    return np.asarray(probabilities), feeds


def real_inputs(
    model: Path, target: Path, speech: tuple[str, str] = CALIBRATION_SPEECH, rate: int = 16000
) -> Path:
    """Write real inputs for ``model`` (``--inputs``) to ``target``, an ``.npz``, and return it.

    ``speech`` (text, espeak-ng voice), then a quarter second of silence, as a stream in the step
    semantics of ``verify.input_spec.InputSpec``: ``input`` holds every chunk in order ``[steps, 1, 576]``
    (one call each), ``state`` the zero state the stream starts from, ``sr`` the rate where the model
    takes it — so the verification carries the state through the real stream, each model its own. The
    sequence variant (its LSTM runs over the windows inside one call and returns ``hn``/``cn``) gets the
    windows in ``SEQUENCE_STEPS`` calls of equal length, ``h``/``c`` zero.
    """
    audio = np.concatenate([speak(speech[0], rate, speech[1]), np.zeros(rate // 4, np.float32)])
    windows = vad_windows(audio, rate)
    names = {vi.name for vi in onnx.load(str(model), load_external_data=False).graph.input}
    if "h" in names:
        per_call = len(windows) // SEQUENCE_STEPS
        zeros = np.zeros((1, 1, 128), np.float32)
        arrays = {"input": windows[: per_call * SEQUENCE_STEPS].reshape(SEQUENCE_STEPS, per_call, -1),
                  "h": zeros, "c": zeros}  # fmt: skip
    else:
        arrays = {"input": windows[:, None, :], "state": np.zeros((2, 1, 128), np.float32)}
        if "sr" in names:
            arrays["sr"] = np.array(rate, dtype=np.int64)
    np.savez(target, **arrays)
    return target


def vad_check(original: Path, candidate: Path, tolerance: float = 0.02) -> TaskCheck:
    """Speech probabilities of the candidate within ``tolerance`` of the original's, at every rate."""
    figures: dict[str, dict[str, float]] = {}
    for rate in sample_rates(original):
        audio, mask = vad_signal(rate)
        (before, _), (after, _) = stream(original, audio, rate), stream(candidate, audio, rate)
        speech = vad_windows(mask.astype(np.float32), rate).mean(axis=1) > 0.5
        figures[str(rate)] = {
            "chunks": len(before), "max_abs_diff": float(np.abs(after - before).max()),
            "max_abs_diff_speech": float(np.abs(after - before)[speech].max()),
            "max_abs_diff_silence_noise": float(np.abs(after - before)[~speech].max()),
            "mean_prob_speech": float(before[speech].mean()),
            "mean_prob_silence_noise": float(before[~speech].mean()),
        }  # fmt: skip
    worst = max(f["max_abs_diff"] for f in figures.values())
    rates = ", ".join(f"{int(r) // 1000} kHz" for r in figures)
    summary = f"speech probabilities within {worst:.3f} ({rates}; espeak-ng speech, silence, noise)"
    return TaskCheck(passed=worst <= tolerance, summary=summary, figures=figures)

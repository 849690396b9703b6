"""The torch Kaldi fbank against values computed by hand from Kaldi's formulas, and the resampler."""

import math
import warnings

import numpy as np
import pytest
import torch

from mera.data.media import AudioClip
from mera.errors import DataError
from mera.model.encoders.fbank import (
    FLOAT_EPS,
    audio_waveform,
    fit_length,
    kaldi_fbank,
    mel_banks,
    num_frames,
    resample,
)

SR = 16000


def _mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _hand_fbank_frame(x: np.ndarray, start: int, window: str = "povey", bins: int = 128) -> np.ndarray:
    """One frame of Kaldi fbank, step by step in float64, with a direct DFT and a loop over filters."""
    frame = np.asarray(x[start:start + 400], dtype=np.float64).copy()  # 25 ms at 16 kHz
    frame -= frame.mean()  # remove DC offset
    pre = np.empty_like(frame)  # pre-emphasis, first sample against itself
    pre[0] = frame[0] - 0.97 * frame[0]
    for i in range(1, 400):
        pre[i] = frame[i] - 0.97 * frame[i - 1]
    n = np.arange(400)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / 399)
    w = hann ** 0.85 if window == "povey" else hann
    padded = np.zeros(512)  # next power of two
    padded[:400] = pre * w
    k = np.arange(257)[:, None]
    re = (padded[None, :] * np.cos(2 * np.pi * k * np.arange(512)[None, :] / 512)).sum(1)
    im = (padded[None, :] * np.sin(2 * np.pi * k * np.arange(512)[None, :] / 512)).sum(1)
    power = re ** 2 + im ** 2
    lo, hi = _mel(20.0), _mel(8000.0)
    delta = (hi - lo) / (bins + 1)
    out = np.empty(bins)
    for m in range(bins):
        left, centre, right = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
        e = 0.0
        for b in range(256):  # the Nyquist bin (256) has weight 0
            mb = _mel(b * 31.25)
            if left < mb < right:
                wgt = (mb - left) / (centre - left) if mb <= centre else (right - mb) / (right - centre)
                e += wgt * power[b]
        out[m] = math.log(max(e, FLOAT_EPS))
    return out


def _sine(freq, seconds=1.0, amp=0.5, phase=0.3, dc=0.0):
    t = np.arange(int(SR * seconds)) / SR
    return (amp * np.sin(2 * np.pi * freq * t + phase) + dc) * 2 ** 15


@pytest.mark.parametrize("n", [400, 559, 560, 1000, 16000, 160000])
def test_frame_count_and_shape(n):
    fb = kaldi_fbank(torch.zeros(n))
    assert fb.shape == (1 + (n - 400) // 160, 128) == (num_frames(n), 128)


def test_too_short_gives_no_frames():
    assert kaldi_fbank(torch.ones(399)).shape == (0, 128)
    assert num_frames(399) == 0
    assert kaldi_fbank(torch.zeros(3, 16000)).shape == (3, 98, 128)  # batched


def test_sine_frame_matches_hand_computation_float64():
    x = _sine(1000.0, dc=0.01)  # a DC offset too: removed per frame
    fb = kaldi_fbank(torch.from_numpy(x))  # float64 in, float64 math
    assert fb.dtype == torch.float64
    for frame in (0, 3, 50):
        ref = _hand_fbank_frame(x, frame * 160)
        np.testing.assert_allclose(fb[frame].numpy(), ref, rtol=0, atol=1e-6)


def test_float32_matches_hand_computation_on_broadband_audio():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(8000) * 0.1 + 0.3 * np.sin(np.arange(8000) * 0.2)) * 2 ** 15
    fb = kaldi_fbank(torch.from_numpy(x.astype(np.float32)))
    assert fb.dtype == torch.float32
    ref = _hand_fbank_frame(x.astype(np.float32), 7 * 160)
    np.testing.assert_allclose(fb[7].numpy(), ref, rtol=0, atol=2e-3)


def test_hanning_window_matches_hand_computation():
    x = _sine(2500.0)
    fb = kaldi_fbank(torch.from_numpy(x), window="hanning")
    np.testing.assert_allclose(fb[2].numpy(), _hand_fbank_frame(x, 320, window="hanning"), atol=1e-6)
    assert not np.allclose(fb[2].numpy(), kaldi_fbank(torch.from_numpy(x))[2].numpy(), atol=1e-3)


@pytest.mark.parametrize("freq", [440.0, 1000.0, 3000.0, 6000.0])
def test_sine_energy_peaks_in_the_nearest_mel_filter(freq):
    fb = kaldi_fbank(torch.from_numpy(_sine(freq)).float())
    lo, hi = _mel(20.0), _mel(8000.0)
    centres = lo + (np.arange(128) + 1) * (hi - lo) / 129
    expected = int(np.argmin(np.abs(centres - _mel(freq))))
    assert int(fb[10].argmax()) == expected
    assert fb[10].max() - fb[10].median() > 5.0  # a clear peak


def test_silence_hits_the_float_epsilon_floor():
    fb = kaldi_fbank(torch.zeros(4000))
    assert torch.all(fb == torch.tensor(FLOAT_EPS).log())
    assert abs(float(fb[0, 0]) - math.log(1.1920928955078125e-07)) < 1e-6


def test_mel_banks_shape_and_partition_of_unity():
    banks = mel_banks(128, 512, 16000, 20.0, 0.0, torch.float64).numpy()
    assert banks.shape == (128, 257)
    assert np.all(banks[:, 256] == 0) and np.all(banks[:, 0] == 0)  # Nyquist bin, and 0 Hz < 20 Hz
    lo, hi = _mel(20.0), _mel(8000.0)
    delta = (hi - lo) / 129
    mels = _mel(np.arange(256) * 31.25)
    inner = (mels > lo + delta) & (mels < hi - delta)  # between the first and last centre
    np.testing.assert_allclose(banks[:, :256][:, inner].sum(0), 1.0, atol=1e-12)
    assert banks.max() <= 1.0


def test_matches_transformers_numpy_kaldi_implementation():
    """An independent implementation: transformers' ASTFeatureExtractor numpy path (hanning window)."""
    from transformers import ASTFeatureExtractor

    rng = np.random.default_rng(1)
    w = (rng.standard_normal(12000) * 0.2).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ASTFeatureExtractor(max_length=73)._extract_fbank_features(w, 73)
    mine = kaldi_fbank(torch.from_numpy(w).double(), window="hanning").numpy()
    assert mine.shape == ref.shape == (73, 128)
    np.testing.assert_allclose(mine, ref, atol=1e-5)


# ------------------------------------------------------------------------------ resampling / inputs


def test_resample_upsampling_is_close_to_the_true_signal():
    x = np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)
    y = resample(torch.from_numpy(x), 8000, 16000).numpy()
    assert y.shape == (16000,)
    truth = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(y[400:-400] - truth[400:-400]).max() < 1e-2


def test_resample_downsampling_keeps_passband_and_removes_aliases():
    t = np.arange(48000) / 48000
    y = resample(torch.from_numpy(np.sin(2 * np.pi * 1000 * t)), 48000, 16000).numpy()
    assert y.shape == (16000,)
    truth = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert np.abs(y[200:-200] - truth[200:-200]).max() < 1e-2
    alias = resample(torch.from_numpy(np.sin(2 * np.pi * 12000 * t)), 48000, 16000).numpy()
    assert np.sqrt(np.mean(alias[200:-200] ** 2)) < 1e-2  # a 12 kHz tone is above the new Nyquist
    assert resample(torch.zeros(44101), 44100, 16000).shape == (math.ceil(44101 * 160 / 441),)


def test_audio_waveform_inputs():
    clip = AudioClip(np.zeros(8000, np.float32), 8000)
    assert audio_waveform(clip, 16000).shape == (16000,)
    with pytest.raises(DataError, match="8000 Hz"):
        audio_waveform(clip, 16000, allow_resample=False)
    with pytest.raises(DataError, match="mono"):
        audio_waveform((np.zeros((100, 2), np.float32), 16000), 16000)
    with pytest.raises(DataError, match="NaN"):
        audio_waveform(np.array([0.0, np.nan], np.float32), 16000)
    assert audio_waveform(np.ones(5, np.float32), 16000).shape == (5,)  # bare waveform: at the target rate


def test_fit_length():
    x = torch.arange(1.0, 4.0)
    assert fit_length(x, 7).tolist() == [1, 2, 3, 0, 0, 0, 0]
    assert fit_length(x, 7, "repeat").tolist() == [1, 2, 3, 1, 2, 3, 1]
    assert fit_length(x, 2).tolist() == [1, 2]

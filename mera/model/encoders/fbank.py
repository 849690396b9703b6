"""Kaldi-compatible log-mel filterbank features and audio input helpers, in plain torch.

``torchaudio`` cannot be installed beside torch 2.13, so :func:`kaldi_fbank` re-implements
``torchaudio.compliance.kaldi.fbank`` (itself Kaldi's ``compute-fbank-feats``) for the settings
that BEATs and AST use, step by step per frame:

1. frames of ``frame_length`` ms every ``frame_shift`` ms, ``snip_edges``: only whole frames,
   so ``1 + (N - L) // S`` of them (none when ``N < L``);
2. optional dither (Gaussian noise of std ``dither``; 0 at inference);
3. DC offset removal (the frame's mean is subtracted);
4. pre-emphasis ``x[n] - 0.97 x[n-1]``, with ``x[-1] := x[0]`` (Kaldi replicates the first sample);
5. a window: ``povey`` = ``(0.5 - 0.5 cos(2 pi n / (L - 1))) ** 0.85`` (Kaldi's default, BEATs) or
   ``hanning`` = the same without the power (AST);
6. zero padding to the next power of two (400 samples -> 512), power spectrum ``|rfft|^2``;
7. triangular mel filters, equally spaced on Kaldi's mel scale ``1127 ln(1 + f / 700)`` between
   ``low_freq`` (20 Hz) and ``high_freq`` (<= 0 means Nyquist + high_freq), evaluated at the FFT
   bin frequencies ``k * sr / n_fft`` for ``k < n_fft / 2`` (the Nyquist bin gets weight 0);
8. ``log(max(energy, eps))`` with ``eps = torch.finfo(torch.float32).eps``.

Computation runs in the waveform's dtype (float32 as in torchaudio; float64 gives a reference).

:func:`resample` is a band-limited (Hann-windowed sinc) resampler, the method and defaults of
``torchaudio.functional.resample`` (lowpass width 6, rolloff 0.99). :func:`audio_waveform`
turns what :func:`mera.data.media.read_audio` returns into a mono tensor at a given rate.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from mera.errors import DataError

FLOAT_EPS = float(torch.finfo(torch.float32).eps)  # Kaldi / torchaudio log floor: 1.1920929e-07


def mel_scale(freq):
    """Kaldi's mel scale: ``1127 ln(1 + f / 700)`` (works on floats, numpy arrays and tensors)."""
    if isinstance(freq, torch.Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    if isinstance(freq, np.ndarray):
        return 1127.0 * np.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


def num_frames(num_samples: int, frame_length: int = 400, frame_shift: int = 160) -> int:
    """Frames Kaldi makes with ``snip_edges=True``: ``1 + (N - L) // S``, 0 when ``N < L``."""
    if num_samples < frame_length:
        return 0
    return 1 + (num_samples - frame_length) // frame_shift


def _padded_length(frame_length: int, round_to_power_of_two: bool) -> int:
    return 1 << (frame_length - 1).bit_length() if round_to_power_of_two else frame_length


@lru_cache(maxsize=16)
def _mel_banks_cached(num_bins: int, n_fft: int, sample_rate: float, low_freq: float, high_freq: float) -> torch.Tensor:
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad mel range: low_freq {low_freq}, high_freq {high_freq}, Nyquist {nyquist}")
    num_fft_bins = n_fft // 2
    bin_width = sample_rate / n_fft
    mel_low, mel_high = mel_scale(float(low_freq)), mel_scale(float(high_freq))
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64)[:, None]
    left, centre, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
    mel = mel_scale(bin_width * torch.arange(num_fft_bins, dtype=torch.float64))[None, :]
    up = (mel - left) / (centre - left)
    down = (right - mel) / (right - centre)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # [num_bins, n_fft / 2]
    return F.pad(banks, (0, 1))  # the Nyquist bin: weight 0, as Kaldi


def mel_banks(num_bins: int = 128, n_fft: int = 512, sample_rate: float = 16000.0, low_freq: float = 20.0,
              high_freq: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kaldi's triangular mel filters, ``[num_bins, n_fft // 2 + 1]`` (last column zero)."""
    return _mel_banks_cached(int(num_bins), int(n_fft), float(sample_rate), float(low_freq),
                             float(high_freq)).to(dtype)


def frame_window(kind: str, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kaldi's analysis windows: ``povey``, ``hanning``, ``hamming`` or ``rectangular``."""
    n = torch.arange(length, dtype=torch.float64)
    a = 2.0 * math.pi / (length - 1)
    if kind == "povey":
        w = (0.5 - 0.5 * torch.cos(a * n)).pow(0.85)
    elif kind == "hanning":
        w = 0.5 - 0.5 * torch.cos(a * n)
    elif kind == "hamming":
        w = 0.54 - 0.46 * torch.cos(a * n)
    elif kind == "rectangular":
        w = torch.ones(length, dtype=torch.float64)
    else:
        raise ValueError(f"unknown window type {kind!r}; known: povey, hanning, hamming, rectangular")
    return w.to(dtype)


def kaldi_fbank(
    waveform: torch.Tensor,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    window: str = "povey",
    preemphasis: float = 0.97,
    remove_dc_offset: bool = True,
    dither: float = 0.0,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    round_to_power_of_two: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Log-mel filterbank of ``waveform`` ``[..., N]`` -> ``[..., frames, num_mel_bins]``.

    Matches ``torchaudio.compliance.kaldi.fbank(waveform, num_mel_bins=..., sample_frequency=...,
    frame_length=..., frame_shift=..., window_type=..., dither=...)`` with its other defaults
    (``snip_edges``, ``use_energy=False``, ``use_log_fbank``, ``use_power``, no VTLN). Like
    Kaldi, it works on the waveform's own scale: BEATs multiplies by 2**15 first, AST does not.
    Half-precision input is computed in float32.
    """
    x = torch.as_tensor(waveform)
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if x.ndim == 0:
        raise ValueError("kaldi_fbank: expected a waveform [..., N], got a scalar")
    length = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    n_fft = _padded_length(length, round_to_power_of_two)
    if x.shape[-1] < length:
        return x.new_zeros(*x.shape[:-1], 0, num_mel_bins)
    frames = x.unfold(-1, length, shift)  # [..., m, L]; snip_edges: whole frames only
    if dither != 0.0:
        noise = torch.randn(frames.shape, generator=generator, dtype=frames.dtype).to(frames.device)
        frames = frames + dither * noise
    if remove_dc_offset:
        frames = frames - frames.mean(-1, keepdim=True)
    if preemphasis != 0.0:
        prev = torch.cat([frames[..., :1], frames[..., :-1]], -1)
        frames = frames - preemphasis * prev
    frames = frames * frame_window(window, length, frames.dtype).to(frames.device)
    if n_fft > length:
        frames = F.pad(frames, (0, n_fft - length))
    power = torch.fft.rfft(frames, dim=-1).abs().pow(2.0)  # [..., m, n_fft/2 + 1]
    banks = mel_banks(num_mel_bins, n_fft, sample_rate, low_freq, high_freq, power.dtype).to(power.device)
    energies = power @ banks.T
    return torch.clamp(energies, min=FLOAT_EPS).log()


# ------------------------------------------------------------------------------ resampling


@lru_cache(maxsize=8)
def _sinc_kernel(orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> tuple[torch.Tensor, int]:
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx
    t = (t * base).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    return kernel * window * (base / orig), width  # [new, 1, 2 * width + orig]


MAX_RESAMPLE_RATIO_TERM = 2000  # orig / gcd and new / gcd above this: the polyphase kernel gets too big


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int, lowpass_filter_width: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling of ``[..., N]`` from ``orig_rate`` to ``new_rate`` Hz.

    Hann-windowed sinc interpolation, polyphase (one strided conv1d), as
    ``torchaudio.functional.resample`` with its defaults; ``ceil(N * new / orig)`` samples out.
    """
    orig_rate, new_rate = int(orig_rate), int(new_rate)
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"resample: sample rates must be positive, got {orig_rate} -> {new_rate}")
    x = torch.as_tensor(waveform)
    if orig_rate == new_rate:
        return x
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    if max(orig, new) > MAX_RESAMPLE_RATIO_TERM:
        raise ValueError(f"resample: {orig_rate} -> {new_rate} Hz reduces to {orig}:{new}, too fine a ratio")
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    kernel, width = _sinc_kernel(orig, new, lowpass_filter_width, float(rolloff))
    shape = x.shape
    flat = x.to(dtype).reshape(-1, shape[-1])
    padded = F.pad(flat, (width, width + orig))
    out = F.conv1d(padded[:, None], kernel.to(dtype=dtype, device=x.device), stride=orig)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    target = math.ceil(new * shape[-1] / orig)
    return out[:, :target].reshape(*shape[:-1], -1)


# ------------------------------------------------------------------------------ decoded audio -> waveform


def audio_waveform(media, target_rate: int, allow_resample: bool = True, who: str = "audio encoder") -> torch.Tensor:
    """An :class:`~mera.data.media.AudioClip` (or a ``(waveform, rate)`` pair, or a bare mono
    waveform, taken to be at ``target_rate``) -> float32 ``[n]`` at ``target_rate``.

    A clip at another rate is resampled with :func:`resample` when ``allow_resample``, else
    refused with a :class:`DataError`.
    """
    if isinstance(media, tuple) and len(media) == 2:
        wav, rate = media
    else:
        wav, rate = media, target_rate
    try:
        rate = int(rate)
    except (TypeError, ValueError):
        raise DataError(f"{who}: bad sample rate {rate!r}") from None
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu().numpy()
    wav = np.asarray(wav)
    if wav.dtype.kind not in "fiu":
        raise DataError(f"{who}: expected a numeric waveform, got dtype {wav.dtype}")
    if wav.ndim != 1 or wav.size == 0:
        raise DataError(f"{who}: expected a non-empty mono waveform [n], got shape {wav.shape} "
                        "(average the channels to mono first)")
    if rate <= 0:
        raise DataError(f"{who}: bad sample rate {rate}")
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    if not torch.isfinite(x).all():
        raise DataError(f"{who}: the waveform holds NaN or infinite samples")
    if rate != target_rate:
        if not allow_resample:
            raise DataError(f"{who}: the audio is at {rate} Hz but the encoder needs {target_rate} Hz "
                            "(resampling is turned off: resample=False)")
        try:
            x = resample(x, rate, target_rate)
        except ValueError as e:
            raise DataError(f"{who}: cannot resample {rate} Hz -> {target_rate} Hz ({e}); "
                            f"convert the file to {target_rate} Hz first") from None
    return x


def fit_length(x: torch.Tensor, length: int, pad: str = "zeros", who: str = "audio encoder") -> torch.Tensor:
    """Crop ``[n]`` to its first ``length`` samples, or extend it: ``zeros`` (silence after the
    clip) or ``repeat`` (the clip tiled)."""
    n = x.shape[-1]
    if n >= length:
        return x[..., :length]
    if pad == "zeros":
        return F.pad(x, (0, length - n))
    if pad == "repeat":
        reps = -(-length // n)
        return x.repeat(*([1] * (x.ndim - 1)), reps)[..., :length]
    raise DataError(f"{who}: unknown pad policy {pad!r}; use 'zeros' or 'repeat'")

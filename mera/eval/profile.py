"""Cost measurements for the efficiency table (the paper's Table 3): peak memory and wall
time of training, peak memory and latency per generated token at inference.

Peak memory: on a GPU, ``torch.cuda.max_memory_allocated`` over the block (exact, what the
paper reports); on a CPU, the process's peak resident set size over the block: Linux's own
high-water mark (``VmHWM`` of ``/proc/self/status``, reset at the block's start by writing 5 to
``/proc/self/clear_refs``: exact, and nothing runs meanwhile), else the resident set sampled
every few milliseconds by a background thread (``/proc/self/statm``; it can miss a short
peak), else the process's lifetime ``ru_maxrss``. CPU figures
therefore include the Python process and its libraries, not just the model: compare them
between methods of the same run, not with the paper's GPU figures.
"""

from __future__ import annotations

import os
import resource
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _hwm_bytes() -> int | None:
    """The kernel's high-water mark of this process's resident set (``VmHWM``), None without it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0: "5" to clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_HWM_LOCK = threading.Lock()
_HWM_OPEN: list = []  # the PeakMemory blocks open on the high-water mark (nested ones reset it too)


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_mib`` (and ``pm.kind``: "cuda" or "rss")."""

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.005):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval = interval
        self.peak = 0
        self.kind = "cuda" if self.device.type == "cuda" else "rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm = False  # on the kernel's high-water mark (see _enter_hwm)

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self.peak:
                self.peak = rss
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not self._enter_hwm() and _rss_bytes() is not None:
            self.peak = _rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._hwm:
            with _HWM_LOCK:
                self.peak = max(self.peak, _hwm_bytes() or 0)
                _HWM_OPEN.remove(self)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            rss = _rss_bytes()
            self.peak = max(self.peak, rss or 0)
        else:  # no /proc: the lifetime peak of the process (ru_maxrss is KiB on Linux)
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False

    def _enter_hwm(self) -> bool:
        """Start the block on the kernel's high-water mark. Resetting it ends the count of the
        blocks already open, so their peak so far is kept in their ``peak`` first. False: no
        resettable mark here (then the caller samples)."""
        self._hwm = False
        with _HWM_LOCK:
            before = _hwm_bytes()
            if before is None or not _reset_hwm():
                return False
            for outer in _HWM_OPEN:
                outer.peak = max(outer.peak, before)
            self.peak = _rss_bytes() or 0
            self._hwm = True
            _HWM_OPEN.append(self)
        return True

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


@torch.no_grad()
def profile_inference(model, tokenizer, samples, provider, new_tokens: int = 16, warmup: int = 1) -> dict:
    """Latency per generated token at batch size 1, and peak memory, over ``samples``.

    Each sample is answered greedily with exactly ``new_tokens`` new tokens (eos ignored, so
    every method generates the same number); ``ms_per_token`` = total generation time /
    total new tokens (prefill included, as a user waiting for an answer sees it).
    """
    from mera.data.pipeline import ItemDataset
    from mera.model.collate import MultimodalCollator

    if not samples:
        raise ValueError("profile_inference needs at least one sample")
    model.eval()
    collate = MultimodalCollator(tokenizer, model, train=False)
    items = ItemDataset(samples, provider, with_answer=False)
    batches = [collate([items[i]]) for i in range(len(samples))]
    device = next(model.llm.parameters()).device

    def run(batch):
        embeds = model.embed(batch)
        mask = batch["attention_mask"].to(embeds.device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                 pad_token_id=pad)
        return out.shape[1]

    for b in batches[:warmup]:
        run(b)
    tokens = 0
    with PeakMemory(device) as pm:
        t0 = time.perf_counter()
        for b in batches:
            tokens += run(b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    llm_params = sum(p.numel() for p in model.llm.parameters())  # adapters kept at test time count here
    return {"ms_per_token": 1000.0 * seconds / max(1, tokens), "tokens": tokens, "samples": len(samples),
            "peak_mib": round(pm.peak_mib, 1), "memory_kind": pm.kind, "llm_params_m": llm_params / 1e6}


class Cost:
    """Context manager: wall seconds and peak memory (MiB) of a block, in ``.info`` (the peak is
    this process's; ``processes`` records how many trained together)."""

    def __init__(self, processes: int = 1):
        self.processes = processes

    def __enter__(self):
        self.pm = PeakMemory("cuda" if torch.cuda.is_available() else "cpu").__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.pm.__exit__(*exc)
        self.info = {"seconds": round(time.perf_counter() - self.t0, 2), "peak_mib": round(self.pm.peak_mib, 1),
                     "memory_kind": self.pm.kind, "processes": self.processes}
        return False

"""``mera toy show``: a few toy samples per modality, as text and as one PNG sheet.

The samples are the first test samples of each set (the world's generation is prefix-stable,
so they are exactly the first samples of the sets that :func:`~mera.data.toy_world.write_world`
writes for the same config).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np

from mera import MODALITIES
from mera.data.toy_world import ToyWorldConfig, generate
from mera.io import atomic_path


def _title(text: str, width: int = 34) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def show(out_dir: str | os.PathLike, world_cfg: ToyWorldConfig | None = None,
         n_per_modality: int = 3) -> tuple[str, str]:
    """Render ``n_per_modality`` caption samples (and as many QA samples) of every modality.

    Returns ``(text, png_path)``: the text to print (prompt, answer and references of each
    sample) and the path of the PNG sheet ``out_dir/toy_world.png`` (image; the video's frames;
    the audio's waveform and spectrogram; the point cloud in 3D coloured by its rgb).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = world_cfg or ToyWorldConfig()
    n = max(1, int(n_per_modality))
    caps = {m: generate(m, "caption", "test", n, cfg.seed, cfg) for m in MODALITIES}
    qas = {m: generate(m, "qa", "test", n, cfg.seed, cfg) for m in MODALITIES}

    lines = [f"toy world (seed {cfg.seed}): first {n} test samples per modality and task"]
    for m in MODALITIES:
        lines.append(f"\n== {m} ==")
        for s in caps[m] + qas[m]:
            lines.append(f"[{s.id}] {s.prompt.replace(chr(10), ' ')}  ->  {s.answer}")
            if s.task == "caption":
                lines.extend(f"      ref: {r}" for r in s.references)
    text = "\n".join(lines)

    fig = plt.figure(figsize=(3.6 * n, 13.5), dpi=100)
    outer = fig.add_gridspec(4, n, hspace=0.5, wspace=0.2, left=0.04, right=0.98, top=0.92, bottom=0.03,
                             height_ratios=(0.9, 0.6, 1.0, 1.1))
    fig.suptitle(f"mera toy world (seed {cfg.seed}): first test captions", fontsize=12, y=0.99)
    for row, m in enumerate(MODALITIES):
        for col, s in enumerate(caps[m]):
            cell = outer[row, col]
            title = f"{m}: {_title(s.answer)}"
            if m == "image":
                ax = fig.add_subplot(cell)
                ax.imshow(s.media, interpolation="nearest")
                ax.set_title(title, fontsize=9)
                ax.axis("off")
            elif m == "video":
                frames = s.media
                sub = cell.subgridspec(1, len(frames), wspace=0.05)
                for k, fr in enumerate(frames):
                    ax = fig.add_subplot(sub[0, k])
                    ax.imshow(fr, interpolation="nearest")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    ax.set_xlabel(f"t={k}", fontsize=7)
                    if k == 0:
                        ax.set_title(title, fontsize=9, loc="left")
            elif m == "audio":
                wav, rate = s.media
                sub = cell.subgridspec(2, 1, hspace=0.1)
                ax = fig.add_subplot(sub[0, 0])
                t = np.arange(len(wav)) / rate
                ax.plot(t, wav, linewidth=0.4, color="tab:blue")
                ax.set_xlim(0, t[-1])
                ax.set_ylim(-1, 1)
                ax.set_xticks([])
                ax.set_title(title, fontsize=9)
                ax2 = fig.add_subplot(sub[1, 0])
                ax2.specgram(wav, NFFT=256, Fs=rate, noverlap=192, cmap="magma")
                ax2.set_xlabel("s", fontsize=7)
                ax2.set_ylabel("Hz", fontsize=7)
                ax2.tick_params(labelsize=6)
            else:
                ax = fig.add_subplot(cell, projection="3d")
                p = s.media
                ax.scatter(p[:, 0], p[:, 1], p[:, 2], c=np.clip(p[:, 3:], 0, 1), s=6, depthshade=False)
                ax.set_xlim(-1, 1)
                ax.set_ylim(-1, 1)
                ax.set_zlim(-1, 1)
                ax.set_box_aspect((1, 1, 1))
                ax.tick_params(labelsize=5)
                ax.set_title(title, fontsize=9)
    png = Path(out_dir) / "toy_world.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return text, str(png)

"""report.html: the report as one self-contained page (written next to report.md).

One file that opens offline: inline CSS, no script, no external resource; every picture is a
``data:`` URI. It holds

- the tables of report.md (the same Markdown, rendered by markdown-it-py: the same numbers as
  metrics.json), with each seed's own tables folded away when the run has several seeds;
- the figures of ``figures/`` (Backward / Forward RG per stage; the RG heatmap of each run beside
  its per-stage table), on a light card so that they read in the dark theme too;
- the training loss per phase, drawn from ``<run>/metrics.jsonl`` (:func:`read_training_log`);
- a gallery (:mod:`mera.eval.gallery`): a few fixed test items per modality, their media, the
  reference answer and every method's prediction at every stage.

Light and dark themes follow the reader's system (``prefers-color-scheme``). A section whose
source is missing or unreadable says so in one line; the rest of the page is still written.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Sequence

from mera.errors import DataError
from mera.eval.gallery import Gallery, GalleryItem, Prediction, thumbnail
from mera.eval.metrics import RunMetrics, seeds_of

TRAINING_LOG = "metrics.jsonl"
SHOW_HEIGHT, SHOW_WIDTH = 96, 320  # a thumbnail smaller than this is enlarged by a whole factor
UP = "\u2191"


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def run_dir_of(sources: Sequence[str]) -> Path | None:
    """The run directory the report's scores come from: the folder of the one scores file when it
    holds the run's config.yaml; None for several files or a scores file on its own."""
    if len(sources) != 1:
        return None
    folder = Path(sources[0]).parent
    return folder if (folder / "config.yaml").is_file() else None


# ----------------------------------------------------------------------------- markdown


def _markdown_html(text: str) -> str:
    """Markdown (the report's subset: headings, paragraphs, tables, code spans, lists) -> HTML with
    raw HTML in the text escaped; every table wrapped for horizontal scrolling."""
    from markdown_it import MarkdownIt

    out = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    out = out.replace("<table>", '<div class="table-wrap"><table>').replace("</table>", "</table></div>")
    out = out.replace(f" {UP}</td>", f' <span class="up" title="above the previous stage">{UP}</span></td>')
    # the verdicts on the paper's orderings (mera.eval.seeds), coloured
    out = out.replace("<td>holds</td>", '<td class="ok">holds</td>')
    # and on the paper's claims (mera.eval.claims)
    out = out.replace("<td>does not hold</td>", '<td class="bad">does not hold</td>')
    return out.replace("<td>reversed</td>", '<td class="bad">reversed</td>')


def _split_progression(markdown: str) -> tuple[str, str, list[str], str]:
    """report.md -> (what precedes the per-stage progression, the progression's introduction, one
    chunk per run's table, the closing note)."""
    head, sep, prog = markdown.partition("\n## Per-stage progression\n")
    if not sep:
        return markdown, "", [], ""
    chunks = re.split(r"(?m)^(?=### )", prog)
    intro, runs = chunks[0], chunks[1:]
    note = ""
    if runs:
        last, cut, tail = runs[-1].partition(f"\n{UP} marks positive")
        if cut:
            runs[-1], note = last, UP + " marks positive" + tail
    return head, intro, runs, note


def _demote(markdown: str) -> str:
    """Every heading one level down (a seed's report inside the page's "Per seed" section)."""
    return re.sub(r"(?m)^(#{1,5}) ", r"#\1 ", markdown)


# ----------------------------------------------------------------------------- training log

TRAIN_FIELDS = {"method": str, "phase": str, "step": int, "loss": (int, float)}


def read_training_log(path: Path) -> tuple[list[dict], int, str]:
    """``metrics.jsonl`` -> (its "train" records, the number of "eval" records, a note).

    One JSON object per line: ``{"type": "train", "seed", "order" (null for an expert), "method"
    ("expert" for an expert), "stage", "modality", "phase", "step", "total_steps", "loss", "lr",
    "grad_norm"}`` or ``{"type": "eval", ...}`` (scores: in the tables already). Other types are
    skipped. A malformed line is a DataError naming the file and the line, except an unfinished last
    line (no newline: a run still writing), which is skipped and noted."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the training log ({type(e).__name__}: {e})") from None
    lines = text.split("\n")
    train, n_eval, note = [], 0, ""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # no newline after it: still being written
                note = f"The last line ({n}) is unfinished and was skipped."
                continue
            raise DataError(f"{path}: line {n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {n}: expected a JSON object, got {type(obj).__name__}")
        kind = obj.get("type")
        if kind == "eval":
            n_eval += 1
        elif kind == "train":
            for key, typ in TRAIN_FIELDS.items():
                if not isinstance(obj.get(key), typ) or isinstance(obj.get(key), bool):
                    raise DataError(f"{path}: line {n}: a train record needs {key!r} "
                                    f"({'a number' if key == 'loss' else 'an integer' if key == 'step' else 'a string'}), "
                                    f"got {obj.get(key)!r}")
            train.append(obj)
    return train, n_eval, note


def _panel_key(rec: dict) -> tuple:
    if rec["method"] == "expert":
        return ("expert", str(rec.get("modality")))
    return ("stage", str(rec.get("order")), rec.get("stage"), str(rec.get("modality")))


def _panel_title(key: tuple, several_orders: bool) -> str:
    if key[0] == "expert":
        return f"expert {key[1]}"
    _, order, stage, modality = key
    return (f"{order}: " if several_orders else "") + f"stage {stage} ({modality})"


def loss_panels(records: list[dict]) -> dict[str, dict[str, dict[tuple, list[tuple[int, float]]]]]:
    """The curves of the training log: ``{phase: {panel title: {(method, seed): [(step, loss), ...]}}}``.

    Phases in order of first appearance; in each, a panel per expert (as met), then per (order,
    stage) (orders as met, stages in order); steps sorted, a step logged twice (a resumed phase)
    keeps its last loss."""
    several_orders = len({r.get("order") for r in records if r["method"] != "expert"}) > 1
    phases: dict[str, dict[tuple, dict[tuple, dict[int, float]]]] = {}
    for r in records:
        panel = phases.setdefault(r["phase"], {}).setdefault(_panel_key(r), {})
        panel.setdefault((r["method"], r.get("seed")), {})[r["step"]] = float(r["loss"])
    out = {}
    for phase, panels in phases.items():
        first = list(panels)
        orders = [k[1] for k in first if k[0] == "stage"]
        keys = sorted(panels, key=lambda k: (k[0] != "expert", orders.index(k[1]) if k[0] == "stage" else 0,
                                             k[2] if k[0] == "stage" and isinstance(k[2], int) else 0, first.index(k)))
        out[phase] = {_panel_title(k, several_orders): {line: sorted(steps.items()) for line, steps in panels[k].items()}
                      for k in keys}
    return out


def loss_figures(records: list[dict]) -> list[tuple[str, bytes]]:
    """(phase, PNG) per phase of :func:`loss_panels`: a panel per expert and per (order, stage), the
    loss against the step, a line per method (and seed: same colour), x up to the phase's total
    steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    methods: list[str] = []
    for r in records:
        if r["method"] != "expert" and r["method"] not in methods:
            methods.append(r["method"])
    colours = {m: f"C{k % 10}" for k, m in enumerate(methods)}
    colours["expert"] = "0.35"
    styles = {m: ("-", "--", ":")[(k // 10) % 3] for k, m in enumerate(methods)}
    n_seeds = len({r.get("seed") for r in records})
    several_orders = len({r.get("order") for r in records if r["method"] != "expert"}) > 1
    totals: dict[tuple[str, str], int] = {}  # (phase, panel title) -> the largest total_steps logged
    for r in records:
        t = r.get("total_steps")
        key = (r["phase"], _panel_title(_panel_key(r), several_orders))
        totals[key] = max(totals.get(key, 0), t if isinstance(t, int) and not isinstance(t, bool) else 0)
    out = []
    for phase, panels in loss_panels(records).items():
        ncols = min(4, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(3.1 * ncols, 2.3 * nrows + 0.8), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        shown = []
        for ax, (title, lines) in zip(axes.flat, panels.items()):
            last = 1
            for (method, _seed), points in lines.items():
                xs, ys = [x for x, _ in points], [y for _, y in points]
                last = max(last, xs[-1])
                ax.plot(xs, ys, color=colours[method], linestyle=styles.get(method, "-"), linewidth=1.3,
                        alpha=0.9 if n_seeds < 2 else 0.65, marker="." if len(xs) < 12 else None)
                if method not in shown:
                    shown.append(method)
            ax.set_xlim(0, max(last, totals.get((phase, title), 0)))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("step", fontsize=7, labelpad=1)
            ax.grid(True, alpha=0.3)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel("loss", fontsize=8)
        names = [m for m in (["expert"] + methods) if m in shown]
        handles = [Line2D([], [], color=colours[m], linestyle=styles.get(m, "-"), label=m) for m in names]
        fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        out.append((phase, buf.getvalue()))
    return out


# ----------------------------------------------------------------------------- sections


def _img(data: bytes, alt: str, mime: str = "image/png", cls: str = "plot") -> str:
    return f'<figure class="{cls}"><img src="{data_uri(data, mime)}" alt="{esc(alt)}"></figure>'


def _figures_section(figures: dict[str, bytes]) -> str:
    parts = ['<section id="figures"><h2>Figures</h2><div class="fig-row">']
    for name, alt in (("backward_rg.png", "Backward relative gain per stage"),
                      ("forward_rg.png", "Forward relative gain per stage")):
        if name in figures:
            parts.append(_img(figures[name], alt))
    parts.append("</div><p class=\"note\">The same pictures as <code>figures/</code>.</p></section>")
    return "".join(parts)


def _progression_section(intro: str, chunks: list[str], note: str, figures: dict[str, bytes]) -> str:
    heatmaps = [(n, d) for n, d in figures.items() if n.startswith("accuracy_")]
    parts = ['<section id="progression">', _markdown_html("## Per-stage progression\n" + intro)]
    paired = len(heatmaps) == len(chunks)  # render_figures draws one heatmap per run, in the tables' order
    for k, chunk in enumerate(chunks):
        heading, _, body = chunk.partition("\n")
        parts.append('<div class="run">' + _markdown_html(heading) + '<div class="run-body"><div class="run-table">'
                     + _markdown_html(body) + "</div>")
        if paired:
            parts.append(_img(heatmaps[k][1], f"RG heatmap: {heading.lstrip('# ')}"))
        parts.append("</div></div>")
    if not paired:
        parts.append('<div class="fig-row">' + "".join(_img(d, n) for n, d in heatmaps) + "</div>")
    parts.append(_markdown_html(note) + "</section>")
    return "".join(parts)


def _seeds_section(runs: Sequence[RunMetrics], per_seed: dict) -> str:
    from mera.eval.metrics import last_stage_bw

    parts = ['<section id="per-seed"><h2>Per seed</h2><p class="note">Each seed\'s own report (the tables above '
             "are their means). Click a seed to open it.</p>"]
    for s in seeds_of(runs):
        mine = [r for r in runs if r.seed == s]
        head = last_stage_bw(mine)
        md = per_seed[s]
        md = md[md.index("\n## ") + 1:]  # without the title and the sources
        best = max(head, key=head.get)
        parts.append(f'<details class="seed" id="seed-{esc(s)}"><summary>Seed {esc(s)} <span class="muted">'
                     f"({len(mine)} runs; highest last-stage BW: {esc(best)}, {head[best]:.2f})</span></summary>"
                     + _markdown_html(_demote(md)) + "</details>")
    parts.append("</section>")
    return "".join(parts)


def _training_section(run_dir: Path | None, sources: Sequence[str]) -> str:
    head = '<section id="training"><h2>Training loss</h2>'
    if run_dir is None:
        return head + f'<p class="missing">{esc(_no_run_dir(sources, "training loss curves"))}</p></section>'
    path = run_dir / TRAINING_LOG
    if not path.is_file():
        return head + (f'<p class="missing">No training loss curves: {esc(path)} does not exist (a run writes it '
                       "while it trains; runs made before it existed have none).</p></section>")
    try:
        records, n_eval, note = read_training_log(path)
    except DataError as e:
        return head + f'<p class="missing">No training loss curves: {esc(e)}</p></section>'
    if not records:
        return head + (f'<p class="missing">No training loss curves: {esc(path)} holds no train records '
                       f"({n_eval} eval records).</p></section>")
    parts = [head, f'<p class="note">From <code>{esc(path.name)}</code>: {len(records)} training steps logged, '
             "one picture per phase, a panel per expert and per stage, a line per method (methods that share a "
             "training step draw the same curve: the last one drawn covers the others). " + esc(note) + "</p>"]
    seeds = sorted({str(r.get("seed")) for r in records})
    for phase, png in loss_figures(records):
        parts.append(f"<h3>Phase {esc(phase)}</h3>" + _img(png, f"training loss, phase {phase}", cls="plot wide"))
    if len(seeds) > 1:
        parts.append(f'<p class="note">Seeds {esc(", ".join(seeds))}: one line each, in the method\'s colour.</p>')
    return "".join(parts) + "</section>"


def _no_run_dir(sources: Sequence[str], what: str) -> str:
    if len(sources) != 1:
        return (f"No {what}: the report reads {len(sources)} scores files; {what} come from one run directory "
                "(give mera report one run's scores.csv).")
    return (f"No {what}: {sources[0]} is not in a run directory (no config.yaml beside it), so there is no "
            f"run to take {what} from.")


def _mark(p: Prediction) -> str:
    if p.judgement is None:
        return ""
    if p.judgement >= 1.0:
        return ' <span class="mark ok" title="judged right">\u2713</span>'
    if p.judgement <= 0.0:
        return ' <span class="mark bad" title="judged wrong">\u2717</span>'
    return f' <span class="mark part" title="judged partly right">{p.judgement:.2f}</span>'


def _text(p: Prediction) -> str:
    return esc(p.text) if p.text.strip() else '<span class="muted">(empty)</span>'


def _pred_cls(p: Prediction) -> str:
    if p.judgement is None:
        return ""
    return ' class="ok"' if p.judgement >= 1.0 else ' class="bad"' if p.judgement <= 0.0 else ' class="part"'


def _item_html(item: GalleryItem, g: Gallery) -> str:
    try:
        th = thumbnail(item.modality, item.media)
        # a small picture (a toy's 32 px) is shown enlarged, its pixels kept sharp
        scale = max(1, min(SHOW_HEIGHT // th.height, SHOW_WIDTH // th.width))
        pixel = ' class="pixel"' if scale > 1 else ""
        media = (f'<img{pixel} src="{data_uri(th.data, th.mime)}" width="{th.width * scale}" '
                 f'height="{th.height * scale}" alt="{esc(item.modality)} {esc(item.id)}">')
    except DataError as e:
        media = f'<p class="missing">media unreadable: {esc(e)}</p>'
    refs = item.references
    ref_html = esc(refs[0]) + ("" if len(refs) < 2 else
                               f' <details class="refs"><summary>{len(refs) - 1} more</summary><ul>'
                               + "".join(f"<li>{esc(r)}</li>" for r in refs[1:]) + "</ul></details>")
    expert = ("<span class=\"muted\">none recorded</span>" if item.expert is None
              else f"<span{_pred_cls(item.expert)}>{_text(item.expert)}</span>{_mark(item.expert)}")
    first = min((r.first_stage for r in item.rows), default=1)
    stages = range(first, g.n_stages + 1)
    several_orders = len({r.order for r in item.rows}) > 1
    rows = []
    for r in item.rows:
        cells = []
        for i in stages:
            p = r.cells.get(i)
            if i < r.first_stage:
                cells.append('<td class="unseen" title="modality not seen yet">\u2013</td>')
            elif p is None:
                cells.append('<td class="unseen" title="no prediction recorded">n/a</td>')
            else:
                cells.append(f"<td{_pred_cls(p)}>{_text(p)}{_mark(p)}</td>")
        label = esc(r.method) + (f' <span class="muted">{esc(r.order)}</span>' if several_orders else "")
        rows.append(f'<tr><th scope="row">{label}</th>{"".join(cells)}</tr>')
    head = "".join(f"<th>{esc(g.stage_labels[i - 1])}</th>" for i in stages)
    return (f'<article class="item" id="item-{esc(item.id)}"><div class="item-head"><div class="media">{media}</div>'
            f'<div class="item-text"><div class="item-id"><code>{esc(item.id)}</code> '
            f'<span class="tag">{esc(item.task)}</span></div>'
            f'<div><span class="label">{"Question" if item.task == "qa" else "Prompt"}</span> {esc(item.prompt)}</div>'
            f'<div><span class="label">Reference</span> {ref_html}</div>'
            f'<div><span class="label">Expert</span> {expert}</div></div></div>'
            f'<div class="table-wrap"><table class="preds"><thead><tr><th>method</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div></article>')


def _gallery_section(gallery: Gallery | None, sources: Sequence[str]) -> str:
    head = '<section id="gallery"><h2>Gallery</h2>'
    if gallery is None:
        return head + f'<p class="missing">{esc(_no_run_dir(sources, "gallery"))}</p></section>'
    if gallery.missing:
        text = gallery.missing[0].upper() + gallery.missing[1:]
        return head + f'<p class="missing">{esc(text)}</p></section>'
    if not gallery.items:
        return head + '<p class="missing">No gallery: the run has no evaluation items.</p></section>'
    mods: list[str] = []
    for it in gallery.items:
        if it.modality not in mods:
            mods.append(it.modality)
    parts = [head, f'<p class="note">{esc(gallery.note)} For QA the judge\'s verdict follows each answer '
             '(<span class="mark ok">\u2713</span> right, <span class="mark bad">\u2717</span> wrong); '
             "\u2013: the chain has not met the modality yet.</p>",
             '<nav class="sub">' + " ".join(f'<a href="#gallery-{esc(m)}">{esc(m)}</a>' for m in mods) + "</nav>"]
    for m in mods:
        wide = max((len(it.rows) for it in gallery.items), default=0) > 4  # many rows: one item per line
        parts.append(f'<h3 id="gallery-{esc(m)}">{esc(m)}</h3><div class="items{" wide" if wide else ""}">')
        parts += [_item_html(it, gallery) for it in gallery.items if it.modality == m]
        parts.append("</div>")
    return "".join(parts) + "</section>"


# ----------------------------------------------------------------------------- page

CSS = """
:root{color-scheme:light dark;--bg:#ffffff;--fg:#1c1e21;--muted:#5c636e;--border:#d3d8de;--card:#f5f7f9;
--head:#e9edf1;--accent:#1d5fd1;--ok:#137333;--okbg:#e6f4ea;--bad:#b3261e;--badbg:#fce8e6;--up:#137333}
@media (prefers-color-scheme:dark){:root{--bg:#14161a;--fg:#e4e6ea;--muted:#9aa3ae;--border:#363c45;--card:#1d2026;
--head:#262a31;--accent:#8ab4f8;--ok:#81c995;--okbg:#1e3326;--bad:#f28b82;--badbg:#3c2220;--up:#81c995}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header{position:sticky;top:0;z-index:2;background:var(--bg);border-bottom:1px solid var(--border);padding:.5rem 1.5rem}
header h1{margin:0;font-size:1.25rem}
nav a{color:var(--accent);text-decoration:none;margin-right:1rem;font-size:.9rem}
nav a:hover{text-decoration:underline}
main{max-width:1400px;margin:0 auto;padding:0 1.5rem 3rem}
section{margin-top:1.5rem}
h2{border-bottom:1px solid var(--border);padding-bottom:.2rem;margin-top:2rem}
h3{margin-bottom:.4rem}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.88em;background:var(--card);
padding:.05rem .3rem;border-radius:4px}
p{max-width:75rem}
.note,.muted{color:var(--muted)}
.note{font-size:.9rem}
.missing{color:var(--muted);font-style:italic;border-left:3px solid var(--border);padding-left:.6rem}
.table-wrap{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.4rem 0;font-variant-numeric:tabular-nums;font-size:.9rem}
th,td{border:1px solid var(--border);padding:.25rem .6rem;text-align:left;vertical-align:top}
thead th{background:var(--head)}
tbody tr:nth-child(even){background:var(--card)}
.up{color:var(--up);font-weight:bold}
figure{margin:0}
.plot{background:#fff;border:1px solid var(--border);border-radius:8px;padding:6px;display:inline-block;max-width:100%}
.plot img{display:block;max-width:100%;height:auto}
.fig-row{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
.fig-row .plot{flex:1 1 440px;max-width:680px}
.plot.wide{margin:.6rem 0}
.run{margin:1rem 0 1.6rem}
.run h3{margin-top:0}
.run-body{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
.run-body .plot{max-width:520px;flex:0 1 520px}
.run-table{flex:0 1 auto;min-width:0}
details.seed{border:1px solid var(--border);border-radius:8px;padding:.3rem .8rem;margin:.5rem 0;background:var(--card)}
details.seed summary{cursor:pointer;font-weight:600}
details.seed[open] summary{margin-bottom:.4rem}
nav.sub{margin:.3rem 0}
.items{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,600px),1fr));gap:1rem}
.items.wide{grid-template-columns:1fr}
.item{border:1px solid var(--border);border-radius:8px;background:var(--card);padding:.7rem;min-width:0}
.item-head{display:flex;gap:.8rem;align-items:flex-start;margin-bottom:.4rem}
.media{flex:0 0 auto;max-width:50%}
.media img{display:block;max-width:100%;height:auto;border-radius:4px;background:#fff}
img.pixel{image-rendering:pixelated}
.item-text{font-size:.9rem;min-width:0}
.label{display:inline-block;min-width:5.5rem;color:var(--muted);font-size:.8rem;text-transform:uppercase;letter-spacing:.03em}
.tag{font-size:.75rem;border:1px solid var(--border);border-radius:10px;padding:0 .4rem;color:var(--muted)}
details.refs{display:inline}
details.refs summary{display:inline;cursor:pointer;color:var(--accent);font-size:.8rem}
details.refs ul{margin:.2rem 0 .2rem 1rem;padding:0}
table.preds{font-size:.82rem;width:100%;background:var(--bg)}
table.preds th[scope=row]{white-space:nowrap;font-weight:600}
table.preds td.unseen{color:var(--muted);text-align:center}
td.ok{background:var(--okbg)}td.bad{background:var(--badbg)}
.mark{font-weight:bold}.mark.ok,span.ok .mark{color:var(--ok)}.mark.bad{color:var(--bad)}.mark.part{color:var(--muted)}
footer{color:var(--muted);font-size:.8rem;border-top:1px solid var(--border);padding:.8rem 1.5rem}
"""


def render_html(markdown: str, runs: Sequence[RunMetrics], figures: dict[str, bytes], sources: Sequence[str],
                gallery: Gallery | None = None, per_seed: dict | None = None) -> str:
    """The page: report.md's tables, ``figures`` (render_figures' PNGs), each seed's tables, the
    training loss (``<run>/metrics.jsonl``) and ``gallery`` (None: not a run directory's scores).

    ``per_seed``: seed -> the Markdown report of that seed's runs alone (mera.eval.report writes
    it), needed when ``runs`` hold two seeds or more."""
    run_dir = run_dir_of(sources)
    head, intro, chunks, note = _split_progression(markdown)
    if head.startswith("# "):
        head = head.partition("\n")[2]  # the page's header holds the title
    several = len(seeds_of(runs)) > 1
    title = "Continual-learning report" + (f": {run_dir.name}" if run_dir is not None else "")
    sections = [("results", "Results"), ("figures", "Figures"), ("progression", "Per-stage progression")]
    if several:
        sections.append(("per-seed", "Per seed"))
    sections += [("training", "Training loss"), ("gallery", "Gallery")]
    body = [
        f'<section id="results">{_markdown_html(head)}</section>',
        _figures_section(figures),
        _progression_section(intro, chunks, note, figures),
    ]
    if several:
        body.append(_seeds_section(runs, per_seed or {}))
    body += [_training_section(run_dir, sources), _gallery_section(gallery, sources)]
    nav = "".join(f'<a href="#{k}">{v}</a>' for k, v in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            '<meta name="color-scheme" content="light dark">\n'
            '<meta name="generator" content="mera report">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<header><h1>{esc(title)}</h1><nav>{nav}</nav></header>\n<main>\n"
            + "\n".join(body)
            + "\n</main>\n<footer>Written by mera next to report.md and metrics.json: one file, no external "
            "resource; the pictures are embedded.</footer>\n</body>\n</html>\n")

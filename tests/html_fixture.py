"""A run directory as ``mera run`` leaves it, written by hand (nothing trains), for the tests of
report.html: config.yaml, scores.csv, the experts' and stages' predictions.jsonl, a small toy
world for the data (all four modalities, real media files) and, on request, metrics.jsonl. Also
a parser of the page (html.parser) used by the content and browser tests."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import yaml

MODS = ["image", "video", "audio", "point"]
METHODS = [{"name": "Fine-Tuning", "strategies": ["finetune"]},
           {"name": "MERA (10%)", "strategies": ["merge", "realign"], "replay_ratio": 0.1}]
N_TEST = 4  # items per test set (the gallery shows 3)


def expert_text(m: str, sid: str) -> str:
    return f"expert on {sid}"


def stage_text(method: str, i: int, sid: str) -> str:
    return f"{method} at stage {i} on {sid}"


def judged(method: str, i: int, sid: str) -> float:
    """The judge's verdict on a QA answer: right on even items, except Fine-Tuning after stage 2."""
    k = int(sid.rsplit("_", 1)[1])
    return 1.0 if k % 2 == 0 and not (method == "Fine-Tuning" and i > 2) else 0.0


def score(method: str, i: int, m: str, task: str, seed: int) -> float:
    """A stage's score: the expert's, minus a forgetting that grows with the stages since ``m`` came."""
    base = 80.0 if task == "caption" else 0.6
    since = i - (MODS.index(m) + 1)
    drop = (0.07 if method == "Fine-Tuning" else 0.015) * since + 0.003 * seed + 0.001 * len(m)
    return round(base * (1 - drop), 4)


def fake_run(root: Path, seeds: list[int] | None = None, training_log: bool = True) -> Path:
    """The run directory ``root/run`` (its data in ``root/world``)."""
    from mera.config import load_config
    from mera.data.toy_world import ToyWorldConfig, write_world
    from mera.eval.metrics import format_rows
    from mera.runner.run_config import RunConfig
    from mera.runner.rundir import RunDir

    world = write_world(root / "world", ToyWorldConfig(n_train_caption=1, n_train_qa=1, n_test_caption=N_TEST,
                                                       n_test_qa=N_TEST, n_val_caption=1, n_val_qa=1))
    run = root / "run"
    run.mkdir(parents=True)
    cfg = {
        "name": "html-fixture",
        "model": {"llm": str(root / "no-llm"), "branches": {m: {"encoder": {"family": f"toy_{m}"}} for m in MODS}},
        "data": {"sets": {m: {f"{t}_{s}": world[m][t][s] for t in ("caption", "qa") for s in ("train", "test")}
                          for m in MODS}},
        "orders": {"sequential": MODS},
        "methods": METHODS,
        **({"seeds": seeds} if seeds else {}),
    }
    (root / "given.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_config(root / "given.yaml", [], RunConfig)
    (run / "config.yaml").write_text(yaml.safe_dump(loaded.model_dump(mode="json"), sort_keys=False))
    ids = {m: {t: [f"{m}_{t}_test_{k:05d}" for k in range(N_TEST)] for t in ("caption", "qa")} for m in MODS}

    def preds(mods, text, verdict) -> str:
        lines = []
        for m in mods:
            for t in ("caption", "qa"):
                for sid in ids[m][t]:
                    p = {"modality": m, "id": sid, "task": t, "prediction": text(sid)}
                    if t == "qa":
                        p["judgement"] = verdict(sid)
                    lines.append(json.dumps(p) + "\n")
        return "".join(lines)

    rows = []
    for seed in (seeds or [loaded.seed]):
        rd = RunDir(run, loaded).for_seed(seed)
        for m in MODS:
            d = rd.expert_dir(m)
            d.mkdir(parents=True)
            (d / "predictions.jsonl").write_text(preds([m], lambda sid, m=m: expert_text(m, sid), lambda sid: 1.0))
            rows += [{"method": "expert", "order": "sequential", "seed": seed, "stage": "", "modality": m, "dataset": f"{m}-{t}",
                      "task": t, "score": score("expert", 1, m, t, 0)} for t in ("caption", "qa")]
        for meth in METHODS:
            name = meth["name"]
            for i, m_new in enumerate(MODS, 1):
                seen = MODS[:i]
                if i > 1:
                    d = rd.stage_dir("sequential", name, i, m_new)
                    d.mkdir(parents=True)
                    (d / "predictions.jsonl").write_text(preds(seen, lambda sid, i=i, n=name: stage_text(n, i, sid),
                                                               lambda sid, i=i, n=name: judged(n, i, sid)))
                for m in seen:
                    for t in ("caption", "qa"):
                        value = score("expert", 1, m, t, 0) if i == 1 else score(name, i, m, t, seed)
                        rows.append({"method": name, "order": "sequential", "seed": seed, "stage": i, "modality": m,
                                     "dataset": f"{m}-{t}", "task": t, "score": value})
    (run / "scores.csv").write_text(format_rows(rows))
    if training_log:
        write_training_log(run / "metrics.jsonl", seeds or [loaded.seed])
    return run


def write_training_log(path: Path, seeds: list[int]) -> list[dict]:
    """metrics.jsonl in the format the run writes: experts (align, instruct), each method's stages 2..4
    (align, instruct; realign for MERA), and an eval record per stage."""
    lines = []
    for seed in seeds:
        for m in MODS:
            for phase, total in (("align", 6), ("instruct", 8)):
                lines += [{"type": "train", "seed": seed, "order": None, "method": "expert", "stage": 1, "modality": m,
                           "phase": phase, "step": s, "total_steps": total, "loss": round(3.0 / s, 4), "lr": 1e-3,
                           "grad_norm": 1.0} for s in range(1, total + 1)]
        for meth in METHODS:
            phases = [("align", 6), ("instruct", 8)] + ([("realign", 4)] if meth["name"].startswith("MERA") else [])
            for i, m in enumerate(MODS[1:], 2):
                for phase, total in phases:
                    lines += [{"type": "train", "seed": seed, "order": "sequential", "method": meth["name"], "stage": i,
                               "modality": m, "phase": phase, "step": s, "total_steps": total,
                               "loss": round(2.0 / s + 0.1 * i, 4), "lr": 2e-4, "grad_norm": 0.5}
                              for s in range(1, total + 1)]
                lines.append({"type": "eval", "seed": seed, "order": "sequential", "method": meth["name"], "stage": i,
                              "modality": m, "eval_modality": "image", "task": "caption", "score": 70.0})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines


# ----------------------------------------------------------------------------- the page, parsed


class Page(HTMLParser):
    """report.html as data: its tables (rows of cell texts, with the ids of the sections, details and
    gallery items around them and the last heading before them), images, links and headings."""

    CONTAINERS = ("section", "details", "article")

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: list[dict] = []
        self.images: list[dict] = []
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value) of every src / href
        self.tags: set[str] = set()
        self.headings: list[tuple[str, str]] = []
        self._stack: list[tuple[str, str | None]] = []
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None
        self._last_heading = ""
        self.feed(text)

    def context(self) -> list[str]:
        return [i for _, i in self._stack if i]

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        for k in ("src", "href"):
            if k in a:
                self.urls.append((tag, k, a[k] or ""))
        if tag in self.CONTAINERS:
            self._stack.append((tag, a.get("id")))
        elif tag == "table":
            self.tables.append({"rows": [], "context": self.context(), "heading": self._last_heading,
                                "class": a.get("class", "")})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag in ("h1", "h2", "h3", "h4", "h5"):
            self._heading = []
        elif tag == "img":
            self.images.append({**a, "context": self.context()})

    def handle_endtag(self, tag):
        if tag in self.CONTAINERS and self._stack:
            self._stack.pop()
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append(re.sub(r"\s+", " ", "".join(self._cell)).strip())
            self._cell = None
        elif tag in ("h1", "h2", "h3", "h4", "h5") and self._heading is not None:
            self._last_heading = re.sub(r"\s+", " ", "".join(self._heading)).strip()
            self.headings.append((tag, self._last_heading))
            self._heading = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._heading is not None:
            self._heading.append(data)

    def tables_in(self, container_id: str) -> list[dict]:
        return [t for t in self.tables if container_id in t["context"]]


def decode_data_uri(uri: str) -> tuple[str, bytes]:
    head, _, payload = uri.partition(",")
    assert head.startswith("data:") and head.endswith(";base64"), head[:40]
    return head[5:-7], base64.b64decode(payload, validate=True)


def pm(mean: float | None, std: float | None) -> str:
    """A table cell "mean ± std" as the report writes it (std n/a when undefined)."""
    return f"{mean:.2f} \u00b1 " + ("n/a" if std is None else f"{std:.2f}")


def expected_progression(entry: dict) -> list[list[str]]:
    """The rows of a per-stage table, from a metrics.json summary entry (markers removed)."""
    mods = list(entry["rg"])
    rows = []
    for i in range(len(entry["bw_rg"])):
        rows.append([str(i + 1), mods[i]] + ["\u2013" if entry["rg"][m][i] is None else f"{entry['rg'][m][i]:.2f}"
                                             for m in mods]
                    + [f"{entry['bw_rg'][i]:.2f}", f"{entry['fw_rg'][i]:.2f}"])
    return rows


def unmarked(rows: list[list[str]]) -> list[list[str]]:
    return [[c.replace("\u2191", "").strip() for c in r] for r in rows]

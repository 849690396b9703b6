"""The items of report.html's gallery, collected from a run directory.

For every modality of the run: the first ``PER_TASK`` items of its caption set and of its QA set
(the evaluation split of the run, ``eval.split``: test unless the run chose val), in file order,
so the same items every time; for each, its expert's prediction and every (order, method)
chain's prediction at every stage that evaluated the modality, read from the stage folders'
``predictions.jsonl`` (stage 1 of a chain is the expert of the order's first modality: its
predictions are the expert's). With several seeds the predictions are the first seed's.

:func:`collect_gallery` uses data sets already loaded (the run loop's); :func:`gallery_of_run`
loads only the evaluation sets of a finished run (``mera report``), never generating data: a toy
world that is not on this machine is a reason for no gallery, stated in the page.
"""

from __future__ import annotations

import json
from pathlib import Path

from mera import PLACEHOLDERS
from mera.errors import DataError, MeraError
from mera.eval.gallery import Gallery, GalleryItem, GalleryRow, Prediction
from mera.runner.rundir import RunDir

PER_TASK = 3  # items per task (caption, QA) and modality


def read_predictions(path: Path) -> dict[tuple[str, str], Prediction]:
    """``predictions.jsonl`` -> {(modality, id): Prediction}; a malformed line is a DataError naming
    the file and the line."""
    out: dict[tuple[str, str], Prediction] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read predictions ({type(e).__name__}: {e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: not JSON ({e.msg})") from None
        if not (isinstance(obj, dict) and isinstance(obj.get("modality"), str) and isinstance(obj.get("id"), str)
                and isinstance(obj.get("prediction"), str)):
            raise DataError(f"{path}: line {n}: expected an object with string fields modality, id and prediction")
        j = obj.get("judgement")
        if j is not None and (isinstance(j, bool) or not isinstance(j, (int, float))):
            raise DataError(f"{path}: line {n}: 'judgement' must be a number, got {j!r}")
        out[(obj["modality"], obj["id"])] = Prediction(obj["prediction"], None if j is None else float(j))
    return out


def collect_gallery(run_dir: str | Path, cfg, sets: dict, per_task: int = PER_TASK) -> Gallery:
    """The gallery of the run in ``run_dir`` (config ``cfg``: a RunConfig), its items taken from
    ``sets`` (modality -> :class:`~mera.data.pipeline.ModalitySets`). Raises a MeraError on an
    unreadable predictions file."""
    rd = RunDir(run_dir, cfg)  # the first seed's tree
    split = cfg.eval.split
    cache: dict[Path, dict] = {}

    def predictions(folder: Path) -> dict:
        if folder not in cache:
            f = folder / "predictions.jsonl"
            cache[folder] = read_predictions(f) if f.is_file() else {}
        return cache[folder]

    items = []
    stages = list(rd.stages(seeds=[rd.seed]))  # the first seed's, in plan order
    modalities = [m for m in rd.experts() if m in sets]
    for m in modalities:
        captions, qa = sets[m].evaluation(split)
        for s in captions[:per_task] + qa[:per_task]:
            item = GalleryItem(m, s.task, s.id, s.prompt.replace(PLACEHOLDERS[m], "").strip(), list(s.references),
                               s.media, expert=predictions(rd.expert_dir(m)).get((m, s.id)))
            rows: dict[tuple[str, str], GalleryRow] = {}  # (order, method) -> its row, in plan order
            for st in stages:
                order = cfg.orders[st.order]
                if m not in order:
                    continue
                row = rows.get((st.order, st.method.name))
                if row is None:
                    row = rows[(st.order, st.method.name)] = GalleryRow(st.method.name, st.order, order.index(m) + 1)
                    item.rows.append(row)
                if m in st.seen:  # the stages that evaluated m
                    p = predictions(st.predictions_folder).get((m, s.id))
                    if p is not None:
                        row.cells[st.index] = p
            items.append(item)
    n_stages = max(len(o) for o in cfg.orders.values())
    if len(cfg.orders) == 1:  # the column headings: the modality each position of the order adds
        only = next(iter(cfg.orders.values()))
        labels = [f"stage {k} (+{m})" for k, m in enumerate(only, 1)]
    else:
        labels = [f"stage {i}" for i in range(1, n_stages + 1)]
    notes = [f"The first {per_task} items of each task's {'validation' if split == 'val' else 'test'} set, "
             "in file order."]
    if cfg.seeds and len(cfg.run_seeds) > 1:
        notes.append(f"Predictions of seed {rd.seed} (the run has seeds {', '.join(map(str, cfg.run_seeds))}; "
                     f"each seed's are in seed_<s>/).")
    return Gallery(items, n_stages, labels, " ".join(notes))


def gallery_or_reason(run_dir: str | Path, cfg, sets: dict, per_task: int = PER_TASK) -> Gallery:
    """:func:`collect_gallery`, or a gallery that says in one line why there is none."""
    try:
        return collect_gallery(run_dir, cfg, sets, per_task)
    except MeraError as e:
        return Gallery(missing=f"no gallery: {e}")


def gallery_of_run(run_dir: str | Path, cfg, config_dir: str | Path, per_task: int = PER_TASK) -> Gallery:
    """The gallery of a finished run (``mera report``): its evaluation sets are loaded on their own
    (not its models), the toy world's only if it is already on this machine."""
    from mera.continual.assets import Assets, data_paths
    from mera.data.pipeline import load_sets

    split = cfg.eval.split
    try:
        a = Assets(cfg, Path(config_dir))
        paths = data_paths(a, {m: p.model_dump() for m, p in cfg.data.sets.items()}, write_toy=False)
        wanted = (f"caption_{split}", f"qa_{split}")
        sets = load_sets({m: {k: v for k, v in p.items() if k in wanted} for m, p in paths.items()}, cfg.data.max_test)
    except MeraError as e:
        return Gallery(missing=f"no gallery: the run's {split} sets cannot be read here ({e})")
    return gallery_or_reason(run_dir, cfg, sets, per_task)

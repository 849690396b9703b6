"""The run directory: the single source of truth of a run (every step can be resumed from it).

    <out>/config.yaml                     the resolved config
    <out>/experts/<modality>/             expert checkpoint + scores.csv + DONE
    <out>/<order>/<method>/stage_<i>_<modality>/   stage checkpoint + scores.csv + DONE
    <out>/.steps/...                      step checkpoints of unfinished phases
    <out>/scores.csv                      every finished stage's rows, in plan order
    <out>/report.md, metrics.json, efficiency.json, figures/

:class:`RunDir` knows these paths, the plan (experts, then order x method x stage), which
units are done, and reads and writes score rows (in the one format of
:mod:`mera.eval.metrics`). It trains nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from mera.config import dump_config
from mera.continual import checkpoint as ckpt
from mera.errors import ConfigError, MeraError
from mera.eval.metrics import format_rows, read_rows
from mera.io import write_text


def slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    return s or "method"


def flat_diff(a, b, prefix="") -> list[str]:
    """Keys whose values differ between two nested dicts (dotted paths)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += flat_diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


@dataclass(frozen=True)
class Unit:
    """A unit of work: an expert (``order``/``method`` None) or one (order, method) chain."""

    kind: str  # "expert" | "chain"
    modality: str | None = None
    order: str | None = None
    method: int | None = None  # index into cfg.methods

    def name(self, cfg) -> str:
        return f"expert {self.modality}" if self.kind == "expert" else f"{self.order} / {cfg.methods[self.method].name}"


class RunDir:
    def __init__(self, out: str | Path, cfg):
        self.out = Path(out)
        self.cfg = cfg

    # ------------------------------------------------------------------ paths
    def expert_dir(self, modality: str) -> Path:
        return self.out / "experts" / modality

    def stage_dir(self, order: str, method, i: int, modality: str) -> Path:
        """``method``: a MethodConfig or its name."""
        name = method if isinstance(method, str) else method.name
        return self.out / order / slug(name) / f"stage_{i}_{modality}"

    def steps_dir(self, folder: Path) -> Path:
        """Where a stage's step checkpoints live until it is DONE (outside the stage folder, which
        an unfinished stage clears)."""
        return self.out / ".steps" / folder.relative_to(self.out)

    @property
    def features_dir(self) -> Path:
        return self.out / ".features"

    # ------------------------------------------------------------------ plan
    def experts(self) -> list[str]:
        out = []
        for order in self.cfg.orders.values():
            out += [m for m in order if m not in out]
        return out

    def units(self) -> list[Unit]:
        return ([Unit("expert", modality=m) for m in self.experts()]
                + [Unit("chain", order=o, method=k) for o in self.cfg.orders for k in range(len(self.cfg.methods))])

    def plan(self) -> dict:
        """What the run would train: the experts and every (order, method, stage)."""
        stages = []
        for oname, order in self.cfg.orders.items():
            for meth in self.cfg.methods:
                for i, m in enumerate(order, 1):
                    stages.append({"order": oname, "method": meth.name, "stage": i, "modality": m,
                                   "dir": str(self.stage_dir(oname, meth, i, m).relative_to(self.out)),
                                   "what": "= expert of " + m if i == 1 else "+".join(meth.names)})
        return {"experts": self.experts(), "stages": stages}

    def unit_done(self, unit: Unit) -> bool:
        if unit.kind == "expert":
            return ckpt.is_done(self.expert_dir(unit.modality))
        order = self.cfg.orders[unit.order]
        return ckpt.is_done(self.stage_dir(unit.order, self.cfg.methods[unit.method], len(order), order[-1]))

    # ------------------------------------------------------------------ set-up
    def prepare(self, resume: bool, write: bool = True) -> None:
        """Refuse an existing run without --resume, or a resume with another config; write config.yaml."""
        text = dump_config(self.cfg)
        cfg_file = self.out / "config.yaml"
        if cfg_file.exists():
            if not resume:
                raise MeraError(f"{self.out}: a run directory is already there; pass --resume to continue it "
                                "or choose another --out")
            diff = flat_diff(self._saved_config(cfg_file), yaml.safe_load(text))
            if diff:
                raise ConfigError(f"{cfg_file}: the resumed config differs from the run's in: {', '.join(diff)}")
        elif write:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(cfg_file, text)

    def _saved_config(self, cfg_file: Path) -> dict:
        """The run's config.yaml, resolved by the current schema (a run written by an earlier release
        compares equal when it means the same)."""
        from mera.config import validate

        try:
            data = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cfg_file}: the run's saved config is unreadable ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{cfg_file}: the run's saved config is not a mapping")
        try:
            return yaml.safe_load(dump_config(validate(data, type(self.cfg), str(cfg_file))))
        except ConfigError:
            return data

    @staticmethod
    def clean(folder: Path) -> None:
        """Remove an unfinished stage folder (no DONE): it is redone from scratch."""
        if folder.exists():
            shutil.rmtree(folder)

    # ------------------------------------------------------------------ scores
    @staticmethod
    def write_rows(path: Path, rows: list[dict]) -> None:
        write_text(path, format_rows(rows))

    @staticmethod
    def read_rows(path: Path) -> list[dict]:
        return read_rows(path)

    def assemble_scores(self) -> Path:
        """Rebuild ``scores.csv`` from the finished stages, in plan order (so resume gives the same file)."""
        rows = []
        for oname, order in self.cfg.orders.items():
            for m in order:
                f = self.expert_dir(m)
                if ckpt.is_done(f):
                    rows += [{**r, "order": oname} for r in read_rows(f / "scores.csv")]
        for oname, order in self.cfg.orders.items():
            for meth in self.cfg.methods:
                for i, m in enumerate(order, 1):
                    f = self.stage_dir(oname, meth, i, m)
                    if ckpt.is_done(f):
                        rows += read_rows(f / "scores.csv")
        path = self.out / "scores.csv"
        self.write_rows(path, rows)
        return path

    # ------------------------------------------------------------------ costs
    def efficiency(self) -> dict:
        """Per method: training time and peak memory (stages 2..m, averaged over orders: stage 1 is
        the shared expert) and the inference profile of its final model (first order)."""
        out = {}
        first = next(iter(self.cfg.orders))
        for meth in self.cfg.methods:
            secs, peaks, ok = [], [], True
            for oname, order in self.cfg.orders.items():
                total = 0.0
                for i, m in enumerate(order[1:], 2):
                    f = self.stage_dir(oname, meth, i, m)
                    if not ckpt.is_done(f):
                        ok = False
                        continue
                    c = ckpt.read_manifest(f).get("cost") or {}
                    total += c.get("seconds", 0.0)
                    if "peak_mib" in c:
                        peaks.append(c["peak_mib"])
                secs.append(total)
            if not ok:
                continue
            entry = {"train_seconds": sum(secs) / len(secs), "train_peak_mib": max(peaks) if peaks else None}
            order = self.cfg.orders[first]
            prof_file = self.stage_dir(first, meth, len(order), order[-1]) / "profile.json"
            if prof_file.is_file():
                prof = json.loads(prof_file.read_text())
                entry.update({"infer_ms_per_token": prof["ms_per_token"], "infer_peak_mib": prof["peak_mib"],
                              "llm_params_m": prof["llm_params_m"], "memory_kind": prof["memory_kind"]})
            out[meth.name] = entry
        return out

"""What a run loads once and every stage shares: tokenizer, encoders, data sets, feature
provider and judge (:class:`Assets`), and the few functions that assemble a model from them.

``load_assets(cfg, config_dir, ...)`` resolves the config's paths (``zoo:`` parts of the toy
zoo, built on first use; other paths relative to the config's folder), loads what is asked
for and fails with one readable error on a bad path or file, before anything is written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mera import dist
from mera.config import validate
from mera.errors import CheckpointError, ConfigError, MeraError


def seed_for(base: int, *parts) -> int:
    """A 32-bit seed from ``base`` and what it is for (stable across processes and runs)."""
    import json

    h = hashlib.sha256(json.dumps([base, *map(str, parts)]).encode()).hexdigest()
    return int(h[:8], 16)


@dataclass
class Assets:
    cfg: object  # RunConfig
    config_dir: Path
    llm_path: str = ""
    tok_path: str = ""
    tokenizer: object = None
    encoders: dict = field(default_factory=dict)
    sets: dict = field(default_factory=dict)  # modality -> ModalitySets
    set_names: dict = field(default_factory=dict)  # modality -> (caption set name, QA set name)
    provider: object = None  # FeatureProvider
    judge: object = None
    device: object = None
    zoo_paths: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ paths
    def resolve(self, path: str) -> str:
        if path.startswith("zoo:"):
            key, paths = path[4:], self.zoo_paths
            if key in paths and isinstance(paths[key], (str, Path)):
                return str(paths[key])
            if key.startswith("encoders/") and key.split("/", 1)[1] in paths.get("encoders", {}):
                return str(paths["encoders"][key.split("/", 1)[1]])
            raise ConfigError(f"unknown zoo path {path!r}; known: zoo:llm, zoo:tokenizer, zoo:encoders/<modality>")
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else self.config_dir / p)

    # ------------------------------------------------------------------ models
    def base_model(self):
        """The base LLM (frozen) wrapped as a MultimodalLM with no branch."""
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM

        from mera.model.mllm import MultimodalLM

        dtype = getattr(torch, self.cfg.model.dtype)
        try:
            llm = AutoModelForCausalLM.from_pretrained(self.llm_path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, SafetensorError) as e:
            raise CheckpointError(f"{self.llm_path}: cannot load the language model ({e})") from None
        llm.requires_grad_(False)
        if self.cfg.model.folds == "branches":
            from mera.train import branches

            branches.enable(llm)
        return MultimodalLM(llm.to(self.device), self.tokenizer)

    def new_connector(self, model, modality: str):
        """A freshly initialised connector of ``modality`` (seeded by the run seed and the modality)."""
        from mera.model.connectors import build_connector

        torch.manual_seed(seed_for(self.cfg.seed, "connector", modality))
        b = self.cfg.model.branches[modality]
        hidden = model.llm.get_input_embeddings().weight.shape[1]
        conn = build_connector(b.connector, self.encoders[modality].output_dim, hidden)
        return conn.to(self.device)  # fp32 (its output is cast to the LLM dtype at the splice)

    def add_branch(self, model, modality: str, state: dict | None = None) -> None:
        conn = self.new_connector(model, modality)
        if state is not None:
            conn.load_state_dict(state)
        model.add_branch(modality, self.encoders[modality], conn)

    def pretrained_connector_state(self, model, modality: str, path: str) -> dict:
        """The connector weights of ``path`` (safetensors, connector parameter names), checked
        against a freshly built connector of the configured type."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        file = self.resolve(path)
        try:
            state = load_file(file)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read the pretrained connector ({e})") from None
        want = self.new_connector(model, modality).state_dict()
        missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        bad = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
        if missing or extra or bad:
            raise CheckpointError(
                f"{file}: does not fit the {self.cfg.model.branches[modality].connector.type} connector of "
                f"{modality!r}: " + "; ".join(x for x in (f"missing {missing[:4]}" if missing else "",
                                                          f"unexpected {extra[:4]}" if extra else "",
                                                          f"wrong shape {bad[:4]}" if bad else "") if x))
        return state


def connector_states(model) -> dict:
    return {m: {k: v.detach().clone() for k, v in b.connector.state_dict().items()} for m, b in model.branches.items()}


def _uses_zoo(cfg) -> bool:
    refs = [cfg.model.llm, cfg.model.tokenizer or ""] + [b.encoder.path or "" for b in cfg.model.branches.values()]
    return any(r.startswith("zoo:") for r in refs)


def load_assets(cfg, config_dir: str | Path, *, cache_dir: str | Path | None = None, data: bool = True,
                judge: bool = True, progress: bool = False, threads: int | None = None) -> Assets:
    """Resolve paths, build the toy zoo if needed, load the tokenizer and the encoders, and (unless
    ``data`` / ``judge`` is False, e.g. only to load stages) the data sets and the judge.
    ``cache_dir``: where a disk feature cache lives (``<run>/.features``); ``threads``: torch's CPU
    threads (None: the config's ``threads``; 0: leave them as they are)."""
    from transformers import AutoTokenizer

    from mera.data.pipeline import FeatureProvider
    from mera.model.encoders.base import load_encoder

    threads = cfg.threads if threads is None else threads
    if threads:
        torch.set_num_threads(threads)
    a = Assets(cfg, Path(config_dir), device=dist.device())
    if _uses_zoo(cfg):
        from mera.zoo.build import build_zoo, run_zoo_config, zoo_paths

        zcfg = run_zoo_config(cfg.zoo, cfg.data.toy)
        build_zoo(zcfg, force=False, progress=progress)
        a.zoo_paths = zoo_paths(zcfg)
    a.llm_path = a.resolve(cfg.model.llm)
    a.tok_path = a.resolve(cfg.model.tokenizer) if cfg.model.tokenizer else a.llm_path
    for key, p in (("model.llm", a.llm_path), ("model.tokenizer", a.tok_path)):
        if not Path(p).is_dir():
            raise ConfigError(f"{key}: {p} is not a folder (a local model folder is expected; mera never downloads)")
    set_paths = {m: p.model_dump() for m, p in cfg.data.sets.items()}
    a.set_names = {m: (p.caption_name or f"{m}-caption", p.qa_name or f"{m}-qa") for m, p in cfg.data.sets.items()}
    if data:
        _load_data(a, set_paths)
    try:
        a.tokenizer = AutoTokenizer.from_pretrained(a.tok_path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{a.tok_path}: cannot load the tokenizer ({e})") from None
    for m, b in cfg.model.branches.items():
        path = a.resolve(b.encoder.path) if b.encoder.path else None
        try:
            a.encoders[m] = load_encoder(b.encoder.family, path, **b.encoder.options).to(a.device)
        except MeraError as e:
            raise type(e)(f"model.branches.{m}.encoder: {e}") from None
    a.provider = FeatureProvider(a.encoders, cache=cfg.train.cache_features, progress=progress,
                                 cache_dir=Path(cache_dir) if cache_dir is not None else None,
                                 cache_dtype=cfg.train.feature_cache_dtype)
    if judge:
        from mera.eval.judges import get_judge

        a.judge = get_judge(cfg.eval.judge, **cfg.eval.judge_options)
    return a


def _load_data(a: Assets, set_paths: dict) -> None:
    """The sets of every branch (the toy world's written first when the config uses it): train,
    test and, where given, validation. A run evaluating on the validation sets (``eval.split:
    val``) needs them for every branch and never reads the test sets (left empty)."""
    from mera.data.pipeline import load_sets

    a.sets = load_sets(data_paths(a, set_paths), a.cfg.data.max_test)


def data_paths(a: Assets, set_paths: dict, write_toy: bool = True) -> dict[str, dict[str, str]]:
    """The absolute paths of every branch's sets (``set_paths``: the config's ``data.sets``, dumped),
    the toy world's filled in for the branches it provides (written first unless ``write_toy`` is
    False: then where it would be, e.g. for a report that must not generate data); sets the toy
    branches' names in ``a.set_names``."""
    cfg = a.cfg
    on_val = cfg.eval.split == "val"
    if on_val:  # before anything is written or read
        for m in cfg.model.branches:
            p = set_paths.get(m)
            if p is not None and not (p.get("caption_val") and p.get("qa_val")):
                missing = " and ".join(k for k in ("caption_val", "qa_val") if not p.get(k))
                raise ConfigError(f"data.sets.{m}: eval.split is 'val' but modality {m!r} has no validation "
                                  f"sets ({missing} missing); give them or evaluate on the test sets "
                                  "(eval.split=test)")
    if cfg.data.toy is not None:
        from mera.data.toy_world import ToyWorldConfig, world_paths, write_world
        from mera.paths import zoo_home

        wcfg = validate(cfg.data.toy, ToyWorldConfig, "config section 'data.toy'")
        h = hashlib.sha256(wcfg.model_dump_json().encode()).hexdigest()[:12]
        folder = zoo_home(cfg.zoo) / "toy-data" / h
        paths = write_world(folder, wcfg) if write_toy else world_paths(folder)
        for m in cfg.model.branches:
            if m not in set_paths:
                p = paths[m]
                set_paths[m] = {f"{t}_{s}": p[t][s] for t in ("caption", "qa") for s in ("train", "test", "val")}
                a.set_names[m] = (f"toy-{m}-caption", f"toy-{m}-qa")
    skip = ("caption_test", "qa_test") if on_val else ()  # never read: the run evaluates on val
    for p in set_paths.values():
        p.pop("caption_name", None)
        p.pop("qa_name", None)
        for k in list(p):
            if p[k] is None or k in skip:
                del p[k]
            else:
                p[k] = a.resolve(p[k])
    return {m: set_paths[m] for m in cfg.model.branches}

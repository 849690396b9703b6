"""What a third-party plug-in can count on (issue 22): its registered name is its name (and enters
the step's content key), its LLM policy is a declared type that the config loader checks against
the rest of the method, a broken plug-in package names itself, and a strategy with its own LLM
modules is loaded, exported and planned through its own hooks."""

import subprocess
import sys
from importlib.metadata import EntryPoint
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_plan import paper_models  # noqa: F401  (a fixture)

from mera.config import load_config, registry
from mera.continual import checkpoint as ckpt
from mera.continual import methods
from mera.continual.checkpoint import ChainView
from mera.continual.methods import MethodConfig, build_method
from mera.continual.sharing import step_key
from mera.continual.strategies import LLMPolicy, OwnModuleCounts, StageContext, Strategy, layout_owner, llm_policy
from mera.errors import CheckpointError, ConfigError
from mera.runner.run_config import RunConfig

TOY = {"model": {"branches": {"image": {"encoder": {"family": "toy_image"}},
                              "point": {"encoder": {"family": "toy_point"}}}},
       "data": {"toy": {}}, "orders": {"s": ["image", "point"]}}


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as it is, restored after the test (plug-ins registered here do not leak)."""
    # every kind's built-ins imported and registered before the copy: a module first imported during
    # the test would register into the copy only, and stay missing from the registry afterwards
    for kind in registry.KINDS:
        registry.names(kind)
    monkeypatch.setattr(registry, "_ENTRIES", {k: dict(v) for k, v in registry._ENTRIES.items()})
    monkeypatch.setattr(registry, "_ALIASES", {k: dict(v) for k, v in registry._ALIASES.items()})
    monkeypatch.setattr(registry, "_CHECKS", {k: list(v) for k, v in registry._CHECKS.items()})
    monkeypatch.setattr(registry, "_LOADED", set(registry._LOADED))
    monkeypatch.setattr(registry, "_EPS_DONE", set(registry._EPS_DONE))
    return registry


def _method(*items):
    return MethodConfig(name="m", strategies=list(items))


# ------------------------------------------------------------------------------ names and keys


def _ctx():
    model = SimpleNamespace(branches={"image": SimpleNamespace(connector=torch.nn.Linear(2, 2))})
    return StageContext(model=model, order="s", method="m", stage=2, modality="point", seen=["image", "point"], seed=3,
                        train=None, data=None, replay=None, batch=None, history=ChainView(None))


def test_two_unnamed_strategies_get_their_registered_names_and_distinct_step_keys(fresh_registry, tmp_path):
    class First(Strategy):
        pass

    class Second(Strategy):
        pass

    fresh_registry.register("strategy", "third_first")(First)
    fresh_registry.register("strategy", "third_second")(Second)
    assert (First.name, Second.name) == ("third_first", "third_second")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**TOY, "methods": [{"name": "FT", "strategies": ["finetune"]}]}))
    assets = SimpleNamespace(cfg=load_config(tmp_path / "c.yaml", [], RunConfig))
    ctx = _ctx()
    (a,), _ = build_method(_method("third_first"))
    (b,), _ = build_method(_method("third_second"))
    assert (a.name, b.name) == ("third_first", "third_second")
    key_a, key_b = step_key(assets, ctx, [a]), step_key(assets, ctx, [b])
    assert key_a and key_b and key_a != key_b
    b.name = a.name  # what told them apart: with one name (the old default "strategy") the keys were equal
    assert step_key(assets, ctx, [b]) == key_a


def test_a_factorys_product_carries_the_registered_name_and_policy(fresh_registry):
    class Made(Strategy):
        pass

    @fresh_registry.register("strategy", "third_factory", llm=LLMPolicy.FROZEN)
    def make():
        return Made()

    (s,), _ = build_method(_method("third_factory"))
    assert type(s) is Made and s.name == "third_factory" and s.llm_policy is LLMPolicy.FROZEN
    assert Made.name == "strategy"  # the factory's class itself was not registered


# ------------------------------------------------------------------------------ the LLM policy


def test_policies_are_declared_by_keyword_class_attribute_or_legacy_string(fresh_registry):
    policy = {n: llm_policy(fresh_registry.lookup("strategy", n)) for n in ("ewc", "pathweave", "realign", "replay")}
    assert policy == {"ewc": LLMPolicy.CONTINUED_ADAPTER, "pathweave": LLMPolicy.OWN_MODULES, "realign": None,
                      "replay": None}
    assert policy["pathweave"] == "own"  # the first release's keyword strings still compare equal

    class ByAttribute(Strategy):
        llm_policy = LLMPolicy.FROZEN

    fresh_registry.register("strategy", "third_attr")(ByAttribute)
    fresh_registry.register("strategy", "third_own", llm="own")(type("Own", (Strategy,), {}))
    fresh_registry.register("strategy", "third_cont", llm="continued")(type("Cont", (Strategy,), {}))
    got = {n: llm_policy(fresh_registry.lookup("strategy", n)) for n in ("third_attr", "third_own", "third_cont")}
    assert got == {"third_attr": LLMPolicy.FROZEN, "third_own": LLMPolicy.OWN_MODULES,
                   "third_cont": LLMPolicy.CONTINUED_ADAPTER}
    assert fresh_registry.lookup("strategy", "third_own").obj.llm_policy is LLMPolicy.OWN_MODULES


def test_an_unknown_policy_is_a_registration_error_naming_the_plugin(fresh_registry):
    with pytest.raises(ConfigError, match=r"strategy plug-in 'third_sideways': llm='sideways' is not an LLM policy"):
        fresh_registry.register("strategy", "third_sideways", llm="sideways")(type("S", (Strategy,), {}))
    assert "third_sideways" not in fresh_registry.names("strategy")

    class Twice(Strategy):
        llm_policy = LLMPolicy.FROZEN

    with pytest.raises(ConfigError, match="declare it once"):
        fresh_registry.register("strategy", "third_twice", llm=LLMPolicy.OWN_MODULES)(Twice)


@pytest.fixture
def third_party(fresh_registry):
    """A strategy that keeps the LLM frozen, one with its own modules (by class attribute), one that
    declares a fresh adapter, and one that declares nothing."""

    class FreezeLLM(Strategy):
        pass

    class OwnModules(Strategy):
        llm_policy = LLMPolicy.OWN_MODULES

    fresh_registry.register("strategy", "freeze_llm", llm=LLMPolicy.FROZEN)(FreezeLLM)
    fresh_registry.register("strategy", "own_mods")(OwnModules)
    fresh_registry.register("strategy", "fresh_lora", llm=LLMPolicy.FRESH_ADAPTER)(type("Fresh", (Strategy,), {}))
    fresh_registry.register("strategy", "quiet")(type("Quiet", (Strategy,), {}))
    return fresh_registry


@pytest.mark.parametrize("items, words", [
    (["freeze_llm", "cma"], ["method 'm'", "freeze_llm keeps the LLM frozen (LLMPolicy.FROZEN)",
                             "cma", "would never run", "drop cma"]),
    (["own_mods", {"name": "ema", "beta": 0.3}], ["own_mods trains its own LLM modules (LLMPolicy.OWN_MODULES)",
                                                  "ema", "drop ema"]),
    (["freeze_llm", "ewc"], ["freeze_llm (LLMPolicy.FROZEN) and ewc (LLMPolicy.CONTINUED_ADAPTER) both decide",
                             "keep one"]),
    (["fresh_lora", "pathweave"], ["fresh_lora (LLMPolicy.FRESH_ADAPTER) and pathweave", "keep one"]),
    (["ewc", "ema"], ["ewc keeps its LLM change whole", "ema", "drop one"]),
])
def test_combinations_whose_parts_cannot_all_act_are_refused(third_party, items, words):
    with pytest.raises(ValueError) as e:
        _method(*items)
    text = str(e.value)
    for w in words:
        assert w in text


@pytest.mark.parametrize("items", [["freeze_llm", "finetune"], ["freeze_llm", "realign", "replay"],
                                   ["own_mods", "realign"], ["fresh_lora", "cma", "quiet"], ["quiet", "ema", "replay"]])
def test_combinations_whose_parts_all_act_pass(third_party, items):
    assert len(_method(*items).strategies) == len(items)


def _write(tmp_path, methods_):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({**TOY, "methods": methods_}))
    return cfg


@pytest.mark.parametrize("command, items, words", [
    (["plan"], ["pathweave", {"name": "ema", "beta": 0.2}], ["pathweave trains its own LLM modules", "drop ema"]),
    (["run", "--dry-run"], ["ewc", "pathweave"], ["ewc (LLMPolicy.CONTINUED_ADAPTER) and pathweave"]),
])
def test_the_cli_refuses_a_bad_combination_in_one_error_line(tmp_path, command, items, words):
    cfg = _write(tmp_path, [{"name": "Bad", "strategies": items}])
    r = subprocess.run([sys.executable, "-m", "mera", command[0], str(cfg), *command[1:]], capture_output=True,
                       text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(cfg) in lines[0], r.stderr
    assert "method 'Bad'" in lines[0] and all(w in lines[0] for w in words)


# ------------------------------------------------------------------------------ registry errors


def _entry_points(monkeypatch, *pairs):
    eps = [EntryPoint(name=n, value=v, group="mera.plugins") for n, v in pairs]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: [e for e in eps if e.group == group])


def _fresh_load(monkeypatch):
    monkeypatch.setattr(registry, "_LOADED", set())


def test_an_unknown_name_is_still_reported_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown strategy 'finetun' \(did you mean 'finetune'"):
        methods.resolve("finetun")
    with pytest.raises(registry.UnknownPlugin):
        registry.lookup("strategy", "finetune")  # a merge rule: unknown as a strategy
    assert issubclass(registry.UnknownPlugin, ConfigError)


def test_a_broken_entry_point_names_itself_and_is_tried_again(fresh_registry, monkeypatch):
    _fresh_load(monkeypatch)
    _entry_points(monkeypatch, ("broken_one", "mera_no_such_plugin_module"))
    for _ in range(2):  # not remembered as loaded: every lookup raises again
        with pytest.raises(ConfigError) as e:
            methods.resolve("finetune")
        text = str(e.value)
        assert "'broken_one'" in text and "(mera_no_such_plugin_module)" in text
        assert "No module named 'mera_no_such_plugin_module'" in text and "unknown" not in text


def test_a_failing_registration_names_the_entry_point_and_the_plugin(fresh_registry, monkeypatch, tmp_path):
    (tmp_path / "plug_bad_policy.py").write_text(
        "from mera.config.registry import register\nfrom mera.continual.strategies import Strategy\n\n"
        "@register('strategy', 'sideways_strategy', llm='sideways')\nclass Sideways(Strategy):\n    pass\n")
    (tmp_path / "plug_fn.py").write_text("def register_all():\n    raise RuntimeError('boom in register_all')\n")
    (tmp_path / "plug_ok.py").write_text(
        "from mera.config.registry import register\nfrom mera.continual.strategies import Strategy\n\n"
        "@register('strategy', 'ok_strategy')\nclass Fine(Strategy):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("plug_bad_policy", "plug_fn", "plug_ok"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    _fresh_load(monkeypatch)
    _entry_points(monkeypatch, ("ok_ep", "plug_ok"), ("bad_policy_ep", "plug_bad_policy"))
    for _ in range(2):
        with pytest.raises(ConfigError) as e:
            registry.lookup("strategy", "ok_strategy")
        text = str(e.value)
        assert "'bad_policy_ep' (plug_bad_policy)" in text
        assert "strategy plug-in 'sideways_strategy': llm='sideways' is not an LLM policy" in text
    _fresh_load(monkeypatch)
    _entry_points(monkeypatch, ("ok_ep", "plug_ok"), ("fn_ep", "plug_fn:register_all"))
    with pytest.raises(ConfigError, match=r"'fn_ep' \(plug_fn:register_all\) failed to load: RuntimeError: boom"):
        registry.lookup("strategy", "ok_strategy")
    _fresh_load(monkeypatch)
    _entry_points(monkeypatch, ("ok_ep", "plug_ok"))
    assert registry.lookup("strategy", "ok_strategy").obj.name == "ok_strategy"


# ------------------------------------------------------------------------------ own LLM modules


@pytest.fixture
def own_strategy(fresh_registry):
    calls = []

    class Adapters(Strategy):
        llm_policy = LLMPolicy.OWN_MODULES
        export_refusal = "its LLM holds the Adapters test modules"

        @classmethod
        def install(cls, llm, layout, tensors, route=None):
            calls.append((llm, dict(layout), sorted(tensors), route))

        def plan_counts(self, shapes, stage):
            return OwnModuleCounts("Adapters", 7 * stage, 11, 2, note=f"Adapters: stage {stage}")

    class Foldable(Adapters):
        @classmethod
        def export_check(cls, layout):
            return None

    fresh_registry.register("strategy", "adapters")(Adapters)
    fresh_registry.register("strategy", "foldable")(Foldable)
    return SimpleNamespace(cls=Adapters, calls=calls)


def _stage(folder, kind, tensors=None):
    ckpt.save_stage(folder, parent=None, folds=[], connectors={}, tensors=tensors,
                    info={"kind": "stage", "stage": 2, "llm_modules": {"kind": kind, "size": 3}})
    ckpt.mark_done(folder)
    return folder


def test_a_stage_is_loaded_through_the_strategy_its_layout_names(own_strategy, tmp_path):
    from mera.continual.stages import load_stage
    from mera.continual.strategies.pathweave import PathWeave

    assert layout_owner({"kind": "pathweave"}, "x") is PathWeave  # stages written before this change
    folder = _stage(tmp_path / "stage", "adapters", {"adapters.w": torch.ones(2)})
    llm = torch.nn.Linear(2, 2)
    model = SimpleNamespace(llm=llm, batch_modalities="the route")
    assets = SimpleNamespace(base_model=lambda: model, cfg=SimpleNamespace(model=SimpleNamespace(branches={})))
    assert load_stage(assets, folder) is model
    assert own_strategy.calls == [(llm, {"kind": "adapters", "size": 3}, ["adapters.w"], "the route")]
    with pytest.raises(CheckpointError, match=r"manifest.json: .*'gone_strategy', which is not installed"):
        load_stage(assets, _stage(tmp_path / "gone", "gone_strategy"))


def test_export_asks_the_strategy_whether_its_stage_can_be_exported(own_strategy, tmp_path):
    from mera.interop.export import export_stage

    with pytest.raises(CheckpointError, match=r"a adapters stage: its LLM holds the Adapters test modules, so it "
                                              "cannot be exported"):
        export_stage(_stage(tmp_path / "run/s/m/stage_2", "adapters"), tmp_path / "out")
    # a strategy whose check passes gets as far as looking for the stage's run (none here)
    with pytest.raises(CheckpointError, match="no run directory"):
        export_stage(_stage(tmp_path / "run/s/f/stage_2", "foldable"), tmp_path / "out")


def test_the_plan_counts_a_strategys_own_modules_by_its_hook(own_strategy, paper_models):
    from test_plan import REPO, paper_plan  # noqa: F811

    from mera.runner.plan import plan
    from mera.train.plan import Preset

    raw = yaml.safe_load((REPO / "configs/paper/mera_sequential.yaml").read_text())
    raw["methods"] = [{"name": "Mine", "strategies": ["adapters"]}, {"name": "PW", "strategies": ["pathweave"]}]
    path = paper_models / "own.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, [f"paths.models={paper_models}", "paths.data=/nonexistent"], RunConfig)
    p = plan(cfg, REPO / "configs/paper", Preset("single", "single", 1))
    base = paper_plan(paper_models)

    def instruct(plan_, label, method):
        return next(ph for ph in plan_["phases"] if ph["label"] == label and ph["phase"] == "instruct"
                    and method in ph["methods"])

    mine = instruct(p, "sequential s3 audio", "Mine")
    assert mine["trainable"]["Adapters"] == 21 and mine["frozen"]["Adapters"] == 11 and "LoRA" not in mine["trainable"]
    assert mine["lora_copies"] == 2 and "Adapters: stage 3" in mine["notes"]
    # PathWeave by hand (Llama-3-8B, rank 128, the mlp in-adapter r -> 2r -> r with biases, noisy gates):
    # at stage i its adapter t = i - 1 trains with its gate, noise and t in-adapters; the earlier ones are frozen
    r, shapes = 128, {(4096, 4096): 64, (4096, 1024): 64, (4096, 14336): 64, (14336, 4096): 32}
    inner = 2 * r * r + 2 * r + 2 * r * r + r
    for i in (2, 3, 4):
        t = i - 1
        tr = sum(n * (r * (a + b) + 2 * a * (t + 1) + t * inner) for (a, b), n in shapes.items())
        fr = sum(n * (t * r * (a + b) + sum(2 * a * (k + 1) + k * inner for k in range(1, t))) for (a, b), n in shapes.items())
        m = cfg.orders["sequential"][i - 1]
        pw = instruct(p, f"sequential s{i} {m}", "PW")
        assert pw["trainable"] == {"connectors": base["models"]["branches"][m]["connector_params"], "PathWeave": tr}
        assert pw["frozen"]["PathWeave"] == fr and pw["lora_copies"] == i
        assert f"PathWeave: adapter {t} and its path train; activations counted as {i} LoRAs" in pw["notes"]


# ------------------------------------------------------------------------------ a frozen LLM in training


def test_a_frozen_llm_strategy_trains_no_llm_parameter_and_leaves_nothing_to_merge(third_party, monkeypatch):
    from mera.continual import training
    from mera.continual.training import _train_step
    from mera.train.loop import PhaseResult

    attached, lora = [], torch.nn.Parameter(torch.zeros(3))
    monkeypatch.setattr(training, "attach_lora", lambda llm, settings, seed: attached.append(llm) or llm)
    monkeypatch.setattr(training, "lora_parameters", lambda llm: {"lora": lora})
    monkeypatch.setattr(training, "extract_lora", lambda llm: {})
    monkeypatch.setattr(training, "detach_lora", lambda llm: llm)
    trained = []
    conn = [torch.nn.Parameter(torch.zeros(2))]
    llm = torch.nn.Linear(2, 2)
    model = SimpleNamespace(llm=llm, connector_parameters=lambda m: conn, branches={})
    pc = SimpleNamespace(lr_connector=1e-3, lr_lora=2e-3)
    assets = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(instruct=pc, lora=None)),
                             add_branch=lambda model, m: None, sets={"point": SimpleNamespace(caption_train=[])})

    def train(groups, samples, phase, extra_loss=None):
        trained.append((phase, groups))
        return PhaseResult()

    ctx = _ctx()
    ctx.model, ctx.train, ctx.data = model, train, lambda m: []
    (freeze,), _ = build_method(_method("freeze_llm"))
    result = _train_step(assets, ctx, [freeze])
    assert result.own and result.trained is None and result.pre_folds == [] and not attached
    phase, groups = trained[-1]
    assert phase == "instruct" and [len(g["params"]) for g in groups] == [1, 0]  # the connector; no LLM parameter
    (quiet,), _ = build_method(_method("quiet"))  # decides nothing: the default, a fresh LoRA, trained and merged
    result = _train_step(assets, ctx, [quiet])
    assert not result.own and result.trained is not None and attached == [llm]
    assert [g["params"] for g in trained[-1][1]] == [conn, [lora]]


@pytest.mark.parametrize("kind", ["encoder", "judge"])
def test_a_broken_entry_point_is_not_an_unknown_encoder_or_judge(fresh_registry, monkeypatch, kind):
    """The encoder and judge lookups reword only an unknown name; a plug-in package that fails to
    load names itself there too."""
    from mera.eval.judges import _entry
    from mera.model.encoders.base import _entry as encoder_entry

    _fresh_load(monkeypatch)
    _entry_points(monkeypatch, ("broken_one", "mera_no_such_plugin_module"))
    with pytest.raises(ConfigError) as e:
        encoder_entry("toy_image") if kind == "encoder" else _entry("exact_match")
    text = str(e.value)
    assert "'broken_one'" in text and "No module named 'mera_no_such_plugin_module'" in text and "unknown" not in text

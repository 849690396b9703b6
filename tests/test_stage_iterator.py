"""The plan's one stage iterator (mera.runner.rundir: RunDir.stages, RunDir.chain, final_stage,
the expert rule): what it yields, in which order, and that no other module walks orders x
methods x stages on its own."""

import ast
import re
from pathlib import Path

import pytest
from micro import micro_config

import mera
from mera.config import load_config
from mera.errors import ConfigError
from mera.runner.run_config import RunConfig
from mera.runner.rundir import RunDir, StageRef, Unit, expert_modality, start_expert

METHODS = [{"name": "Fine-Tuning", "strategies": ["finetune"]},
           {"name": "MERA (10%)", "strategies": ["merge", "realign"], "replay_ratio": 0.1},
           {"name": "Replay (10%)", "strategies": ["replay"], "replay_ratio": 0.1}]
ORDERS = {"sequential": ["image", "point"], "reverse": ["point", "image"], "alone": ["point"]}


def _cfg(tmp_path, *overrides):
    path = micro_config(Path("/nonexistent-assets"), tmp_path, methods=METHODS)
    return load_config(path, [f"orders={ORDERS}".replace("'", '"'), *overrides], RunConfig)


@pytest.fixture
def rd(tmp_path):
    return RunDir(tmp_path / "out", _cfg(tmp_path, "seeds=[3,1]"))


def test_every_stage_once_in_plan_order(rd):
    cfg = rd.cfg
    got = list(rd.stages())
    assert all(isinstance(st, StageRef) for st in got)
    assert len(got) == len(cfg.run_seeds) * len(cfg.methods) * sum(len(o) for o in cfg.orders.values()) == 30
    want = [(s, o, meth.name, i) for s in cfg.run_seeds for o, order in cfg.orders.items() for meth in cfg.methods
            for i in range(1, len(order) + 1)]
    assert [(st.seed, st.order, st.method.name, st.index) for st in got] == want
    assert {st.seed for st in got[:15]} == {3} and {st.seed for st in got[15:]} == {1}  # config order, not sorted
    for st in got:
        order = cfg.orders[st.order]
        assert st.modality == order[st.index - 1] and st.seen == tuple(order[:st.index])
        assert st.folder == rd.for_seed(st.seed).stage_dir(st.order, st.method, st.index, st.modality)
        assert st.folder.is_relative_to(rd.out / f"seed_{st.seed}")
        assert st.method in cfg.methods


def test_the_expert_is_stage_one_and_the_final_stage_the_last(rd):
    for st in rd.stages():
        order = rd.cfg.orders[st.order]
        assert st.is_expert == (st.index == 1)
        assert st.is_final == (st.index == len(order))
        if st.is_expert:
            assert st.modality == expert_modality(order) == order[0]
            assert st.expert_folder == rd.for_seed(st.seed).expert_dir(order[0]) == st.predictions_folder
        else:
            assert st.expert_folder is None and st.predictions_folder == st.folder
    alone = rd.chain("alone", "Fine-Tuning")  # one stage: the expert's copy is the final model
    assert len(alone) == 1 and alone[0].is_expert and alone[0].is_final
    for oname, order in rd.cfg.orders.items():
        for meth in rd.cfg.methods:
            final = rd.final_stage(oname, meth)
            assert final == rd.chain(oname, meth.name)[-1]
            assert (final.index, final.modality) == (len(order), order[-1]) and final.seed == rd.seed
    assert start_expert(rd.cfg, Unit("chain", order="reverse", methods=(0,), seed=1)) == \
        Unit("expert", modality="point", seed=1)


def test_filters_keep_plan_order_and_refuse_unknown_names(rd):
    meth = rd.cfg.methods[2]
    got = list(rd.stages(seeds=[1], orders=["reverse", "sequential"], methods=[meth.name, rd.cfg.methods[0]]))
    assert [(st.seed, st.order, st.method.name, st.index) for st in got] == [
        (1, o, m, i) for o in ("sequential", "reverse") for m in ("Fine-Tuning", meth.name) for i in (1, 2)]
    assert list(rd.stages(seeds=[1])) == list(rd.for_seed(1).stages(seeds=[1]))
    assert [st for st in rd.stages() if st.seed == 3] == list(rd.stages(seeds=[3]))
    for kwargs, needle in [({"orders": ["backwards"]}, "no order 'backwards'"), ({"seeds": [7]}, "no seed 7"),
                           ({"methods": ["MERA"]}, "no method 'MERA'")]:
        with pytest.raises(ConfigError, match=needle):
            list(rd.stages(**kwargs))
    with pytest.raises(ConfigError, match="no order 'backwards'"):
        rd.chain("backwards", meth)


def test_a_single_seed_run_lives_at_the_top(tmp_path):
    rd = RunDir(tmp_path / "out", _cfg(tmp_path))
    got = list(rd.stages())
    assert len(got) == len(rd.cfg.methods) * 5 and {st.seed for st in got} == {rd.cfg.run_seeds[0]}
    assert got[0].folder == tmp_path / "out" / "sequential" / "fine-tuning" / "stage_1_image"


def test_the_plan_dict_is_the_iterator(rd):
    stages = rd.plan()["stages"]
    assert [(s["seed"], s["order"], s["method"], s["stage"], s["modality"]) for s in stages] == \
        [(st.seed, st.order, st.method.name, st.index, st.modality) for st in rd.stages()]
    assert [s["what"].startswith("= expert of") for s in stages] == [st.is_expert for st in rd.stages()]


# ---------------------------------------------------------------------- no other walk
_RUNNER, _INTEROP = Path(mera.__file__).parent / "runner", Path(mera.__file__).parent / "interop"


def _enumerate_loops(path: Path) -> list[tuple[int, str | None, str]]:
    """(line, enclosing function, what is enumerated) of every loop or comprehension over ``enumerate(...)``."""
    out = []

    def visit(node, func):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name
        if isinstance(node, (ast.For, ast.comprehension)):
            it = node.iter
            if isinstance(it, ast.Call) and getattr(it.func, "id", None) == "enumerate" and it.args:
                out.append((it.lineno, func, ast.unparse(it.args[0])))
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(ast.parse(path.read_text(encoding="utf-8")), None)
    return out


def _order_walks(path: Path) -> list[tuple[int, str | None, str]]:
    return [x for x in _enumerate_loops(path) if "order" in x[2]]


def test_no_module_walks_the_stages_of_an_order_itself():
    files = sorted(_RUNNER.glob("*.py")) + sorted(_INTEROP.glob("*.py"))
    assert len(files) > 10 and _RUNNER / "rundir.py" in files
    for p in files:
        if p.name != "rundir.py":
            assert not re.search(r"for \w+, \w+ in enumerate\(\s*order", p.read_text(encoding="utf-8")), p
            assert _order_walks(p) == [], p
    # in rundir.py an order's modalities are enumerated once: in RunDir.chain, which makes the StageRefs
    walks = [(func, what) for _, func, what in _enumerate_loops(_RUNNER / "rundir.py") if "methods" not in what]
    assert walks == [("chain", "modalities")], walks


def test_the_source_scan_finds_a_walk(tmp_path):
    p = tmp_path / "walk.py"
    p.write_text("def f(cfg):\n    for name, order in cfg.orders.items():\n"
                 "        x = [m for i, m in enumerate(order[1:], 2)]\n        for i, m in enumerate(order, 1):\n"
                 "            pass\n")
    assert _order_walks(p) == [(3, "f", "order[1:]"), (4, "f", "order")]

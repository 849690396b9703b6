"""Property-based: configs and scores files generated from valid ones by random mutations (values of
any type in any field, keys removed or added; cells replaced, bytes inserted, lines duplicated)
either pass (`mera run --dry-run`, `mera report`) or fail with exactly one `error:` line and exit
code 2; never a traceback, never another exit code."""

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_input import cli

BASE = {
    "name": "prop",
    "seed": 0,
    "model": {"llm": "/nowhere/llm", "tokenizer": "/nowhere/tok",
              "branches": {"image": {"encoder": {"family": "toy_image", "path": "/nowhere/image"},
                                     "connector": {"type": "mlp"}},
                           "point": {"encoder": {"family": "toy_point", "path": "/nowhere/point"},
                                     "connector": {"type": "qformer", "num_queries": 4}}}},
    "data": {"toy": {"n_train_caption": 8}},
    "orders": {"seq": ["image", "point"]},
    "methods": [{"name": "FT", "strategies": ["finetune"]},
                {"name": "MERA", "strategies": ["cma", {"name": "realign", "ratio": 0.1}]},
                {"name": "EWC", "strategies": [{"name": "ewc", "lam": 100}]}],
    "train": {"align": {"epochs": 1, "batch_size": 8, "lr_connector": 1e-3},
              "instruct": {"epochs": 1, "batch_size": 8, "lr_lora": 1e-3}, "lora": {"r": 2, "alpha": 4}},
    "eval": {"batch_size": 8, "max_new_tokens": 8, "judge": "exact_match"},
    "seeds": [0, 1],
    "share": True,
}

SCORES = """method,order,seed,stage,modality,dataset,task,score
expert,seq,0,,image,toy-image-caption,caption,50
expert,seq,0,,image,toy-image-qa,qa,0.5
expert,seq,0,,point,toy-point-caption,caption,40
expert,seq,0,,point,toy-point-qa,qa,0.4
FT,seq,0,1,image,toy-image-caption,caption,50
FT,seq,0,1,image,toy-image-qa,qa,0.5
FT,seq,0,2,image,toy-image-caption,caption,30
FT,seq,0,2,image,toy-image-qa,qa,0.25
FT,seq,0,2,point,toy-point-caption,caption,40
FT,seq,0,2,point,toy-point-qa,qa,0.4
"""

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=4)), max_size=3),
                   st.dictionaries(st.text(max_size=6), st.integers(-3, 3), max_size=2),
                   st.sampled_from(["image", "point", "../x", "", "1e999", "-1", "cma", "realign", "0"]))


def _paths(obj, prefix=()):
    """Every key path of a nested dict / list (leaves and sections)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append(prefix + (i,))
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated_configs(draw):
    import copy

    cfg = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(cfg)
        path = draw(st.sampled_from(paths))
        parent = cfg
        for p in path[:-1]:
            parent = parent[p]
        action = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if action == "set":
            parent[path[-1]] = draw(VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
    return cfg


def _one_line_or_ok(r, what):
    assert "Traceback" not in r.err + r.out, (what, r.err)
    assert r.rc in (0, 2), (what, r.rc, r.err)
    if r.rc == 2:
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, r.err)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_configs())
def test_mutated_configs_dry_run_or_fail_in_one_line(cfg):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        r = cli("run", path, "--out", Path(tmp) / "out", "--dry-run")
        _one_line_or_ok(r, cfg)
        assert not (Path(tmp) / "out").exists()  # a dry run writes nothing


@st.composite
def mutated_scores(draw):
    lines = SCORES.splitlines()
    data = "\n".join(lines).encode()
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["cell", "bytes", "dup", "drop"]))
        lines = data.decode("utf-8", "replace").splitlines()
        i = draw(st.integers(0, len(lines) - 1)) if lines else 0
        if kind == "cell" and lines:
            cells = lines[i].split(",")
            j = draw(st.integers(0, len(cells) - 1))
            cells[j] = draw(st.one_of(st.text(max_size=10), st.sampled_from(["", "nan", "inf", "1e999", "-1", "2",
                                                                             "expert", "0", "x,y", '"'])))
            lines[i] = ",".join(cells)
            data = "\n".join(lines).encode()
        elif kind == "bytes":
            pos = draw(st.integers(0, len(data)))
            data = data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
        elif kind == "dup" and lines:
            lines.insert(i, lines[i])
            data = "\n".join(lines).encode()
        elif lines:
            del lines[i]
            data = "\n".join(lines).encode()
    return data


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_scores())
def test_mutated_scores_files_report_or_fail_in_one_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scores.csv"
        path.write_bytes(data)
        r = cli("report", path, "--json")  # the readers and the metrics, without drawing figures
        _one_line_or_ok(r, data)

import subprocess
import sys

import pytest

from mera.config import apply_override, load_config, parse_override
from mera.config.base import StrictModel
from mera.errors import ConfigError


class Inner(StrictModel):
    lr: float = 1e-3
    name: str = "x"


class Outer(StrictModel):
    train: Inner = Inner()
    items: list[int] = [1, 2, 3]
    epochs: int = 1


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "train:\n  lr: 0.5\nepochs: 2\n")
    cfg = load_config(p, ["train.lr=1e-4", "train.name=abc"], Outer)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.name == "abc"
    assert cfg.epochs == 2 and cfg.items == [1, 2, 3]
    # a list index into a list the file does not hold is refused by validation, by name
    with pytest.raises(ConfigError, match="items"):
        load_config(p, ["items.1=7"], Outer)


def test_override_into_list_in_file(tmp_path):
    p = write(tmp_path, "items: [1, 2, 3]\n")
    cfg = load_config(p, ["items.1=7"], Outer)
    assert cfg.items == [1, 7, 3]


def test_unknown_key_is_an_error_naming_file_and_field(tmp_path):
    p = write(tmp_path, "train:\n  lr: 0.5\n  lrr: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, [], Outer)
    msg = str(e.value)
    assert str(p) in msg and "train.lrr" in msg and "unknown key" in msg


def test_wrong_type_names_field_and_value(tmp_path):
    p = write(tmp_path, "epochs: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, [], Outer)
    assert "epochs" in str(e.value) and "'many'" in str(e.value) and "integer" in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    p = write(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p, [], Outer)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", [], Outer)


def test_parse_override_forms():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=text") == (["a"], "text")
    with pytest.raises(ConfigError):
        parse_override("novalue")
    with pytest.raises(ConfigError):
        parse_override("a..b=1")
    d = {"a": 1}
    with pytest.raises(ConfigError, match="is a value"):
        apply_override(d, ["a", "b"], 2, "a.b=2")


def test_cli_bad_config_is_one_line_nonzero(tmp_path):
    p = write(tmp_path, "name: x\nbogus: 1\n")
    r = subprocess.run([sys.executable, "-m", "mera", "run", str(p)], capture_output=True, text=True)
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "bogus" in lines[0] and str(p) in lines[0] and "Traceback" not in r.stderr


def test_paths_are_substituted_and_overridable(tmp_path):
    from mera.config import load_config
    from mera.runner.run_config import RunConfig

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "paths: {models: /m, data: /d}\n"
        "model:\n  llm: ${paths.models}/llama\n  branches:\n"
        "    image: {encoder: {family: hf_clip, path: '${paths.models}/clip'}}\n"
        "data:\n  sets:\n    image: {caption_train: '${paths.data}/a.json', caption_test: x, qa_train: y, qa_test: z}\n"
        "orders: {s: [image]}\nmethods: [{name: FT}]\n")
    cfg = load_config(cfg_file, [], RunConfig)
    assert cfg.model.llm == "/m/llama" and cfg.model.branches["image"].encoder.path == "/m/clip"
    assert cfg.data.sets["image"].caption_train == "/d/a.json" and cfg.paths == {"models": "/m", "data": "/d"}
    cfg = load_config(cfg_file, ["paths.models=/elsewhere"], RunConfig)
    assert cfg.model.llm == "/elsewhere/llama"
    with pytest.raises(ConfigError, match=r"model.llm: \$\{paths.nope\} is not defined"):
        load_config(cfg_file, ["model.llm=${paths.nope}/x"], RunConfig)

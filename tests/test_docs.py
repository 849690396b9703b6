"""The documentation: the site builds in strict mode (every link, anchor and API page resolves),
the README stays short and its links resolve, no page is left out of the navigation, and the
command line reference names every flag of every command."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MKDOCS = Path(sys.executable).parent / "mkdocs"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


class _Loader(yaml.SafeLoader):
    """mkdocs.yml may hold tags such as !!python/name: (Material's emoji options): read them as text."""


_Loader.add_multi_constructor("", lambda loader, suffix, node: None)


def _config() -> dict:
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_Loader)


def _nav_pages(nav) -> list[str]:
    """Every page a nav lists, in order (items are 'page.md', {title: 'page.md'} or {title: [...]})."""
    out = []
    for item in nav:
        values = item.values() if isinstance(item, dict) else [item]
        for v in values:
            out += _nav_pages(v) if isinstance(v, list) else [v]
    return out


def _relative_links(text: str) -> list[str]:
    """The link targets of a Markdown text that are files of this repository (no URL, no bare anchor),
    fenced and indented code left out."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_the_site_builds_in_strict_mode(tmp_path):
    if not MKDOCS.exists():
        pytest.skip(f"mkdocs is not installed in {MKDOCS.parent} (pip install -r requirements-test.txt)")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    res = subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    # the API pages were generated from the docstrings, not left as their `::: module` lines
    runner = (tmp_path / "site" / "api" / "runner" / "index.html").read_text(encoding="utf-8")
    assert "mera.runner.rundir.RunDir" in runner and "::: mera.runner" not in runner


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the detail into docs/"


def test_every_relative_link_of_the_readme_resolves():
    links = _relative_links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert links, "README.md links into docs/"
    missing = [t for t in links if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, missing


def test_the_nav_lists_every_page_and_only_existing_ones():
    cfg = _config()
    nav = _nav_pages(cfg["nav"])
    assert len(nav) == len(set(nav)), "a page is listed twice in mkdocs.yml's nav"
    assert not [p for p in nav if not (DOCS / p).is_file()], "mkdocs.yml lists a page that does not exist"
    excluded = [line.strip().strip("/") for line in (cfg.get("exclude_docs") or "").splitlines() if line.strip()]
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    pages = {p for p in pages if not any(p == e or p.startswith(e + "/") for e in excluded)}
    orphans = sorted(pages - set(nav))
    assert not orphans, f"pages missing from mkdocs.yml's nav: {orphans}"


def test_the_cli_reference_names_every_command_and_flag():
    from mera.cli import _parser

    text = (DOCS / "cli.md").read_text(encoding="utf-8")

    def walk(p, prefix):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield prefix, p
        for a in subs:
            for name, sp in a.choices.items():
                yield from walk(sp, prefix + [name])

    missing = []
    for path, p in walk(_parser(), ["mera"]):
        command = " ".join(path)
        if f"## {command}\n" not in text:
            missing.append(command)
        for a in p._actions:
            missing += [f"{command} {o}" for o in a.option_strings if o not in ("-h", "--help") and f"`{o}" not in text]
    assert not missing, f"docs/cli.md lacks: {missing}"


def test_every_docs_path_named_in_the_code_exists():
    """Error messages, docstrings, configs and tests point users at docs/<page>.md: each must exist."""
    named = set()
    for folder in ("mera", "tests", "benchmarks", "configs"):
        for f in (ROOT / folder).rglob("*"):
            if f.suffix in (".py", ".yaml", ".yml", ".md") and f.is_file():
                named |= set(re.findall(r"docs/[A-Za-z0-9_/.-]+\.(?:md|png)", f.read_text(encoding="utf-8")))
    assert named, "the code names docs pages"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing

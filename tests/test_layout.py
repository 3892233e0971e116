"""The package layout's rules, checked statically (no imports executed): who may import whom, and
that every config key is read somewhere (docs/ARCHITECTURE.md)."""
from __future__ import annotations

import ast
import dataclasses
import os
import typing

from conftest import ROOT

PKG = "coupling_dist"
SHIMS = {f"{PKG}.{m}" for m in ("preprocess", "stage_a", "pair_store", "stage_b", "finetune", "sample", "evaluate",
                                 "pipeline", "plan", "classifier")}


def _modules(root: str, top: str) -> dict[str, str]:
    """{dotted module name: file path} of every .py file under ``root/top``."""
    out = {}
    for d, _, files in os.walk(os.path.join(root, top)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), root)[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(d, f)
    return out


def _imports(name: str, path: str) -> set[str]:
    """Every module ``name`` imports (relative imports resolved; ``from a import b`` counts a and a.b)."""
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                base = parts if is_pkg else parts[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _layer(mod: str) -> tuple[str, str]:
    if mod in SHIMS:
        return "shim", mod.rsplit(".", 1)[1]
    if mod == f"{PKG}.cli":
        return "cli", ""
    parts = mod.split(".")
    if len(parts) >= 3 and parts[1] == "stages":
        return "stage", parts[2]
    return "shared", ""


def import_violations(root: str) -> list[str]:
    bad = []
    for mod, path in sorted(_modules(root, PKG).items()):
        kind, stage = _layer(mod)
        for imp in sorted(_imports(mod, path)):
            if not imp.startswith(PKG + "."):
                continue
            ikind, istage = _layer(imp)
            if kind in ("shared", "cli") and ikind in ("stage", "shim") and imp != f"{PKG}.stages":
                bad.append(f"{mod} ({kind} layer) imports {imp}")
            elif kind == "shared" and ikind == "cli":
                bad.append(f"{mod} (shared layer) imports the CLI {imp}")
            elif kind == "stage" and (ikind in ("cli", "shim") or (ikind == "stage" and istage != stage)):
                bad.append(f"{mod} (stage {stage}) imports {imp}")
            elif kind == "shim" and ikind == "stage" and istage != stage:
                bad.append(f"{mod} (entry shim) imports another stage's {imp}")
    test_mods = {m.rsplit(".", 1)[-1] for m in _modules(root, "tests")}
    for mod, path in sorted(_modules(root, "tools").items()):
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for imp in _imports(mod, path):
            if imp.split(".")[0] in test_mods | {"tests"}:
                bad.append(f"{mod} imports the test module {imp}")
        if any(isinstance(n, ast.Constant) and n.value == "tests" for n in ast.walk(tree)):
            bad.append(f"{mod} puts tests/ on its import path")
    return bad


def test_layers_import_only_downward():
    assert import_violations(ROOT) == []


def test_import_rule_catches_violations(tmp_path):
    def write(rel, text):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    write("coupling_dist/__init__.py", "")
    write("coupling_dist/cli.py", "")
    write("coupling_dist/stages/__init__.py", "")
    write("coupling_dist/stages/a/__init__.py", "")
    write("coupling_dist/stages/a/entry.py", "from ..b import task\nfrom ...components import x\n")
    write("coupling_dist/stages/b/task.py", "")
    write("coupling_dist/components/x.py", "from ..cli import run_entry\nfrom coupling_dist.stages.a import entry\n")
    write("coupling_dist/sample.py", "from .stages.a.entry import main\n")
    write("tests/conftest.py", "")
    write("tools/bench.py", "import sys\nsys.path.insert(0, 'tests')\nfrom conftest import x\n")
    got = import_violations(str(tmp_path))
    assert "coupling_dist.stages.a.entry (stage a) imports coupling_dist.stages.b.task" in got
    assert "coupling_dist.components.x (shared layer) imports the CLI coupling_dist.cli" in got
    assert "coupling_dist.components.x (shared layer) imports coupling_dist.stages.a.entry" in got
    assert "coupling_dist.sample (entry shim) imports another stage's coupling_dist.stages.a.entry" in got
    assert "tools.bench imports the test module conftest" in got and "tools.bench puts tests/ on its import path" in got
    assert not any("imports coupling_dist.components" in g for g in got), got  # downward imports are fine


# --------------------------------------------------------------------------- config keys


def config_leaves(cls, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_leaves(hints[f.name], key + ".")
        else:
            out.append(key)
    return out


def attributes_read(root: str) -> set[str]:
    """Names read as attributes (``x.name``) anywhere in the package outside config.py, plus string
    keys read from a section serialised to a dict (``arch["attention"]``: the generator's export)."""
    names = set()
    for mod, path in _modules(root, PKG).items():
        if mod == f"{PKG}.config":
            continue
        for n in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load):
                names.add(n.attr)
            elif (isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Load) and isinstance(n.slice, ast.Constant)
                  and isinstance(n.slice.value, str)):
                names.add(n.slice.value)
    return names


def test_every_config_key_is_read_somewhere():
    from coupling_dist.config import Config

    read = attributes_read(ROOT)
    dead = [k for k in config_leaves(Config) if k.rsplit(".", 1)[-1] not in read]
    assert dead == [], f"config keys nothing reads (use them or remove them): {dead}"


@dataclasses.dataclass
class _Section:
    used: int = 1
    never_read_anywhere: int = 2


@dataclasses.dataclass
class _Root:
    sec: _Section = dataclasses.field(default_factory=_Section)


def test_config_key_check_catches_a_dead_key(tmp_path):
    (tmp_path / PKG).mkdir()
    (tmp_path / PKG / "m.py").write_text("def f(cfg):\n    return cfg.sec.used\n")
    read = attributes_read(str(tmp_path))
    assert [k for k in config_leaves(_Root) if k.rsplit(".", 1)[-1] not in read] == ["sec.never_read_anywhere"]

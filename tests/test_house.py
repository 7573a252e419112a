"""The shape of the code: no import cycles, pipelines that never import each other, a model library with no
platform imports, a CLI that parses without loading torch/Ray/MLflow, config fields that are all read, and no
stray MLflow store when a command runs without a tracking address."""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from prouigan_platform.config import Config
from tests.conftest import REPO

PACKAGES = {"prouigan": REPO / "prouigan", "prouigan_platform": REPO / "platform" / "prouigan_platform",
            "pipelines": REPO / "pipelines"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """First-party modules imported by a file (``from a.b import c`` counts a.b, and a.b.c when that is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    mods = _modules()
    return {m: {i for i in _imports(p, m, top_level_only) if i in mods and i != m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return cycles


def test_no_import_cycles_between_first_party_modules():
    # every import counts, also those inside functions: a cycle through a deferred import is still a cycle
    assert _cycles(_graph(top_level_only=False)) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_pipelines_are_thin_and_never_import_each_other():
    graph = _graph(top_level_only=False)
    for m, deps in graph.items():
        if m.startswith("pipelines."):
            assert not [d for d in deps if d.startswith("pipelines")], (m, deps)
            assert len(_modules()[m].read_text().splitlines()) <= 10, f"{m} holds work; it belongs in the platform"
        if m.startswith("prouigan_platform"):
            assert not [d for d in deps if d.startswith("pipelines")], (m, deps)
        if m.startswith("prouigan_platform.") and m != "prouigan_platform.cli":
            # the CLI imports the commands (by name, at dispatch): nothing may import the CLI back
            assert "prouigan_platform.cli" not in deps, m


# docs/architecture.md's floors, top to bottom: a module imports from its own floor or below, never above
FOUNDATION = {"config", "storage", "local_files", "paths", "progress", "user_files", "errors", "run_names"}
FLOOR_NAMES = ["prouigan/ (the model)", "the platform's foundation (" + ", ".join(sorted(FOUNDATION)) + ")",
               "the platform's work modules", "commands/", "prouigan_platform.cli", "pipelines/"]


def floor(module: str) -> int:
    if module.startswith("pipelines"):
        return 5
    if module == "prouigan_platform.cli":
        return 4
    if module.startswith("prouigan_platform.commands"):
        return 3
    if module.startswith("prouigan_platform"):
        return 1 if module.split(".")[1:2] and module.split(".")[1] in FOUNDATION else 2
    return 0


def climbing_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({FLOOR_NAMES[floor(m)]}) imports {d} ({FLOOR_NAMES[floor(d)]})"
            for m, deps in sorted(graph.items()) for d in sorted(deps) if floor(d) > floor(m)]


def test_no_import_climbs_a_floor():
    assert climbing_imports(_graph(top_level_only=False)) == []


def test_the_floor_check_finds_an_import_that_climbs():
    graph = {"prouigan_platform.storage": {"prouigan_platform.tracking"}, "prouigan.generator": {"prouigan.attention"},
             "prouigan_platform.gate": {"prouigan_platform.commands.evaluate"}}
    assert climbing_imports(graph) == [
        "prouigan_platform.gate (the platform's work modules) imports prouigan_platform.commands.evaluate (commands/)",
        "prouigan_platform.storage (the platform's foundation (config, errors, local_files, paths, progress, "
        "run_names, storage, user_files)) imports prouigan_platform.tracking (the platform's work modules)"]


def test_exit_codes_are_named_not_literals():
    """Exit codes live in errors.Exit; a literal where an error is raised or a command returns drifts apart."""
    found = []
    for m, p in _modules().items():
        if m.startswith("prouigan_platform") and m != "prouigan_platform.errors":
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if re.search(r"\bcode=\d|^\s*return \d+\s*(#.*)?$|return \d+ if .* else \d+", line) and (
                        m.startswith(("prouigan_platform.commands", "prouigan_platform.cli")) or "code=" in line):
                    found.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert found == []


def test_the_model_library_imports_nothing_of_the_platform():
    for m, p in _modules().items():
        if m.startswith("prouigan.") or m == "prouigan":
            text = p.read_text()
            assert not re.search(r"^\s*(import|from)\s+(prouigan_platform|ray|mlflow|boto3|pyarrow)\b", text, re.M), m


def test_the_cli_parses_without_loading_torch_ray_or_mlflow():
    code = ("import sys\nfrom prouigan_platform.cli import build_parser, main\n"
            "build_parser().parse_args(['train', '-c', 'smoke'])\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'ray', 'mlflow', 'pydantic', 'numpy') if m in sys.modules]\n"
            "print(heavy)\nsys.exit(bool(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stdout[-500:] + out.stderr[-1500:]
    code = ("import sys\nfrom prouigan_platform.cli import main\nrc = main(['config', '-c', 'cpu-small'])\n"
            "heavy = [m for m in ('torch', 'ray', 'mlflow') if m in sys.modules]\nprint(heavy, file=sys.stderr)\n"
            "sys.exit(rc or bool(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr[-1500:]


def _fields(model: type[BaseModel], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str, type]]:
    """(section path, leaf, the section's class) of every leaf field; a list of sections (``data.sources``) counts
    as a section of its item class."""
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        item = getattr(ann, "__args__", (None,))[0] if getattr(ann, "__origin__", None) is list else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _fields(ann, (*path, name))
        elif isinstance(item, type) and issubclass(item, BaseModel):
            out += _fields(item, (*path, name))
        else:
            out.append((path, name, model))
    return out


# sections handed on whole, field by field, to a constructor whose parameters have the same names
PASSED_WHOLE = {("loss",): "LossWeights(**cfg.loss.model_dump("}


def unread_fields(config: type[BaseModel], code: str) -> list[str]:
    """The config fields no code reads.  A field ``a.b.leaf`` is read where the code says ``.b.leaf``, or ``x.leaf``
    for a name ``x`` that the code binds to the section: ``x = ....b``, ``for x in ....b``, ``x: SectionClass``.
    (A bare ``.leaf`` anywhere does not count: ``.name`` or ``.path`` would match everything.)"""
    unread = []
    for path, leaf, cls in _fields(config):
        dotted = ".".join((*path, leaf))
        if path in PASSED_WHOLE and PASSED_WHOLE[path] in code and leaf != "vgg_weights":
            continue
        parent = path[-1] if path else None
        if parent is None:
            if not re.search(rf"\b(cfg|config|self\.cfg)\.{leaf}\b", code):
                unread.append(dotted)
            continue
        names = _bound_names(parent, cls, code)
        pattern = rf"\.{parent}\.{leaf}\b" + "".join(rf"|\b{n}\.{leaf}\b" for n in sorted(names))
        if not re.search(pattern, code):
            unread.append(dotted)
    return unread


@functools.cache
def _bound_names(parent: str, cls: type, code: str) -> frozenset[str]:
    """Names the code binds to a config section: ``x = ....parent``, ``for x in ....parent``, ``x: SectionClass``."""
    names = set(re.findall(rf"\b(\w+)\s*=\s*[\w.]*\.{parent}\b(?!\.)", code))
    names |= set(re.findall(rf"\bfor\s+(\w+)\s+in\s+[\w.]*\.{parent}\b", code))
    for klass in cls.__mro__:  # a parameter annotated with the section's class (or a class it extends)
        if isinstance(klass, type) and issubclass(klass, BaseModel) and klass is not BaseModel:
            names |= set(re.findall(rf"\b(\w+)\s*:\s*{klass.__name__}\b", code))
    return frozenset(names)


@functools.lru_cache(maxsize=1)
def _code() -> str:
    return "\n".join(p.read_text() for m, p in _modules().items()
                     if m != "prouigan_platform.config" and not m.startswith("prouigan_platform.commands.demo"))


def test_every_config_field_is_read_somewhere():
    assert unread_fields(Config, _code()) == [], "config fields that no code reads"


def test_the_field_check_catches_an_unread_field_of_a_section_and_of_a_source():
    """The check run on a config with fields nobody reads: it names them, and only them."""
    from prouigan_platform.config import DataConfig, SourceConfig, TrainConfig

    class Source(SourceConfig):
        colour: str = "red"  # no code says src.colour

    class Data(DataConfig):
        sources: list[Source] = []

    class Train(TrainConfig):
        name: int = 0  # a leaf every other section has: reading `.name` elsewhere must not count

    class Extra(Config):
        data: Data = Data()
        train: Train = Train()

    assert sorted(unread_fields(Extra, _code())) == ["data.sources.colour", "train.name"]


@pytest.mark.stack  # `shard --local` and `train` start a private Ray
@pytest.mark.slow  # ~1 minute on 2 cores
def test_commands_without_a_tracking_address_leave_no_stray_store_in_the_repo(tmp_path):
    """MLflow's client, given no tracking address, would make ./mlflow.db: no command may let it."""
    before = set(os.listdir(REPO))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "AWS_", "PROUIGAN_"))}
    env["PROUIGAN_STATE_DIR"] = str(tmp_path / "state")
    ds = ["data.output={tmp}/ds", "train.storage={tmp}/ck", "train.steps=2", "train.val_every=1"]
    for args in (["config", "-c", "smoke"], ["synth", "--out", "{tmp}/faces", "--count", "3"],
                 ["shard", "--local", "-c", "smoke", *ds], ["train", "-c", "smoke", *ds],
                 ["evaluate", "-c", "smoke", "--model", "{tmp}/ck/smoke/step_0000002", "--split", "val",
                  "--output", "{tmp}/ev", "eval.dlib=false", *ds]):
        out = subprocess.run([sys.executable, "-m", "prouigan_platform.cli", *[a.format(tmp=tmp_path) for a in args]],
                             capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
        assert out.returncode == 0, (args, (out.stdout + out.stderr)[-3000:])
    new = set(os.listdir(REPO)) - before
    assert not {n for n in new if n in ("mlflow.db", "mlruns", "mlartifacts") or n.endswith(".db")}, new


def test_no_database_is_committed_and_git_ignores_stores():
    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO).stdout.split()
    assert not [f for f in files if f.endswith((".db", ".sqlite", ".sqlite3"))]
    ignored = subprocess.run(["git", "check-ignore", "mlflow.db", "mlruns/x", "outputs/x", ".platform/x"],
                             capture_output=True, text=True, cwd=REPO).stdout.split()
    assert ignored == ["mlflow.db", "mlruns/x", "outputs/x", ".platform/x"]

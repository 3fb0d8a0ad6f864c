"""The house rules of the layout, checked on the source: no import circles (between modules or between
stage packages), no function-level imports of layerflow modules in the library, TransformerLens
imported inside models/ only, every package saying what each of its modules owns, the command
line's defaults being the library's, and `import layerflow.models` staying free of torch.

`python tests/test_layout.py` prints the import graph's figures and the longest functions.
"""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "layerflow"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[tuple[str, str, int]], list[tuple[int, str]]]:
    """({module: modules it imports}, function-level imports (module, imported, line), (length, function))
    for the package at `root`, read with `ast`. Imports under `if TYPE_CHECKING:` do not count."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    inner, lengths = [], []
    for module, path in files.items():
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
            for child in ast.iter_child_nodes(node):
                function = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                checking = type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lengths.append((child.end_lineno - child.lineno + 1, f"{module}.{child.name}"))
                if isinstance(child, (ast.Import, ast.ImportFrom)) and not checking:
                    if isinstance(child, ast.Import):
                        names = [a.name for a in child.names]
                    else:
                        base = child.module or ""
                        if child.level:
                            here = module.split(".") if is_package else module.split(".")[:-1]
                            base = ".".join(here[:len(here) - child.level + 1] + ([base] if base else []))
                        names = [base] + [f"{base}.{a.name}" for a in child.names]
                    for name in names:
                        if name in files and name != module:
                            graph[module].add(name)
                            if in_function:
                                inner.append((module, name, child.lineno))
                visit(child, function, checking)

        visit(ast.parse(path.read_text()), False, False)
    return graph, inner, lengths


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            connect(v)
    return found


def stage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Modules collapsed to their stage: layerflow.capture.writer -> layerflow.capture."""
    stage = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    out: dict[str, set[str]] = {}
    for a, targets in graph.items():
        out.setdefault(stage(a), set()).update(stage(b) for b in targets if stage(b) != stage(a))
    return out


def test_the_checker_finds_a_planted_circle_and_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    graph, inner, _ = import_graph(pkg)
    assert circles(graph) == [["pkg.a", "pkg.sub.b"]]
    assert inner == [("pkg.sub.b", "pkg", 2), ("pkg.sub.b", "pkg.a", 2)]
    assert "pkg.a" not in graph["pkg.c"]  # type-checking imports are not edges
    assert circles(stage_graph(graph)) == [["pkg.a", "pkg.sub"]]


# The one exception: converting a config's train section needs SAELens, which takes seconds to
# import, so experiment.py loads it only for a config that gets that far (a config file's own
# errors are refused at once: test_a_config_is_read_without_the_library).
LAZY = {("layerflow.experiment", "layerflow.train.schedule"), ("layerflow.experiment", "layerflow.dictionaries.kinds")}


def test_no_import_circles_and_no_function_level_imports_in_the_library():
    graph, inner, _ = import_graph(LIBRARY)
    assert circles(graph) == []
    assert circles(stage_graph(graph)) == []
    assert {(module, imported) for module, imported, _ in inner} == LAZY


def test_transformer_lens_is_imported_inside_models_only():
    outside = []
    for path in LIBRARY.rglob("*.py"):
        if "models" in path.relative_to(LIBRARY).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            outside += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "transformer_lens"]
    assert outside == []


def test_every_package_says_what_each_of_its_modules_owns():
    for init in LIBRARY.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.relative_to(ROOT)} has no docstring"
        if init.parent == LIBRARY or init.parent.name in ("corpus", "twin_configs"):
            continue
        for module in init.parent.glob("*.py"):
            if module.name != "__init__.py":
                assert module.name in doc, f"{init.relative_to(ROOT)} does not say what {module.name} owns"


def test_the_command_line_shows_the_library_defaults():
    from typer.main import get_command

    from layerflow.capture import CaptureConfig
    from layerflow.features import intervene, trace
    from layerflow.train import TrainConfig
    from layerflow.transfer import TransferOptions, cross_model_runs
    from layerflow_cli.main import app

    command = get_command(app)
    shown = {name: {p.name: p.default for p in command.commands[name].params} for name in command.commands}
    field = lambda cls, name: cls.__dataclass_fields__[name].default  # noqa: E731
    arg = lambda fn, name: inspect.signature(fn).parameters[name].default  # noqa: E731
    capture_defaults = CaptureConfig("m", [0])
    expected = {
        ("capture", "site"): ",".join(k.value for k in capture_defaults.kinds),
        ("capture", "tokens"): field(CaptureConfig, "n_tokens"),
        ("capture", "context_size"): field(CaptureConfig, "context_size"),
        ("capture", "source"): field(CaptureConfig, "source"),
        ("capture", "holdout"): field(CaptureConfig, "holdout_fraction"),
        ("capture", "prepend_bos"): field(CaptureConfig, "prepend_bos"),
        ("capture", "dtype"): field(CaptureConfig, "dtype"),
        ("capture", "batch_size"): field(CaptureConfig, "batch_size"),
        ("capture", "seed"): field(CaptureConfig, "seed"),
        ("capture", "device"): field(CaptureConfig, "device"),
        ("train", "tokens"): field(CaptureConfig, "n_tokens"),
        ("train", "epochs"): field(TrainConfig, "epochs"),
        ("train", "batch_tokens"): field(TrainConfig, "batch_tokens"),
        ("train", "checkpoint_every"): field(TrainConfig, "checkpoint_every"),
        ("train", "samples_every"): field(TrainConfig, "samples_every"),
        ("train", "target_site"): field(TrainConfig, "transcoder_target"),
        ("train", "dead_feature_window"): field(TrainConfig, "dead_feature_window"),
        ("train", "seed"): field(TrainConfig, "seed"),
        ("transfer", "max_tokens"): field(TransferOptions, "max_tokens"),
        ("transfer", "top_k"): field(TransferOptions, "top_k"),
        ("transfer", "match_distance"): field(TransferOptions, "match_distance"),
        ("transfer", "words"): arg(cross_model_runs, "max_words"),
        ("transfer", "source"): arg(cross_model_runs, "source"),
        ("trace", "top_k"): arg(trace, "top_k"),
        ("intervene", "heldout_tokens"): arg(intervene, "heldout_tokens"),
        ("intervene", "top_n"): arg(intervene, "top_n"),
    }
    for (name, option), value in expected.items():
        assert shown[name][option] == value, (name, option)
    from layerflow.train import PRESETS, get_preset

    assert TrainConfig("s").schedule == get_preset(shown["train"]["preset"])
    train_help = command.commands["train"].params
    preset_help = next(p.help for p in train_help if p.name == "preset")
    assert all(name in preset_help for name in PRESETS)


def test_the_zoo_the_sites_and_the_contract_load_without_torch():
    code = ("import sys, layerflow.models, layerflow.files, layerflow.defaults, layerflow_cli.main; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_config_is_read_without_the_library(tmp_path):
    (tmp_path / "bad.toml").write_text('name = "x"\n[capture]\ntokens = "lots"\n')
    code = (f"import sys; from layerflow.experiment import load_config\n"
            f"try:\n    load_config({str(tmp_path / 'bad.toml')!r})\nexcept Exception as e:\n    print(e)\n"
            "assert 'torch' not in sys.modules and 'sae_lens' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "capture.tokens must be an integer, got 'lots'" in done.stdout


if __name__ == "__main__":
    graph, inner, lengths = import_graph(LIBRARY)
    stages = stage_graph(graph)
    print(f"modules {len(graph)}, import edges {sum(map(len, graph.values()))}, circles {circles(graph) or 'none'}, "
          f"function-level imports of layerflow modules {len(inner)}")
    print(f"stages {len(stages)}, edges between them {sum(map(len, stages.values()))}, "
          f"circles {circles(stages) or 'none'}")
    for stage, targets in sorted(stages.items()):
        print(f"  {stage} -> {', '.join(sorted(t.removeprefix('layerflow.') for t in targets)) or '-'}")
    print("longest functions:")
    for n, name in sorted(lengths, reverse=True)[:10]:
        print(f"  {n:4d} {name}")
    sys.exit(pytest.main([__file__, "-q"]) if "--test" in sys.argv else 0)

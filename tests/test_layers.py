"""The import rule of docs/architecture.md: every module of mmdgen imports only from its own package and from
packages of lower layers (``LAYERS`` is the contract), at any depth (inside functions too), and the packages
import each other without cycles. Importing ``mmdgen`` loads no torch."""

import ast
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "mmdgen"
ROOT = "mmdgen"  # the package's own __init__: the public names, imported lazily

# package (a folder under mmdgen/, or a module directly in it) -> layer. A module may import from its own package
# and from packages of a lower layer, never from its layer's other packages or from above.
LAYERS = {
    "version": 0, "files": 0, "tensor_files": 0, "choices": 0, "validation": 0,
    "kernels": 1,
    "model": 2,
    "pretrained": 3,
    "losses": 4, "data": 4,
    "metrics": 5,
    "train": 6, "generate": 6,
    "eval": 7,
    "demo": 8, "codec_cli": 8,
    "cli": 9,
    ROOT: 10,
}


def package_of(module: str) -> str:
    """``mmdgen.train.codec`` -> ``train``; ``mmdgen`` -> ``mmdgen`` (the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_submodule(name: str) -> bool:
    """Whether ``mmdgen.<name>`` is a module or a package (``from mmdgen import codec_cli``)."""
    return (SOURCE / f"{name}.py").is_file() or (SOURCE / name / "__init__.py").is_file()


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every mmdgen import in ``source``, at any depth; ``from mmdgen import X`` counts as
    ``mmdgen.X`` when X is a submodule."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            if base == ROOT:
                found += [(node.lineno, f"{ROOT}.{alias.name}" if is_submodule(alias.name) else ROOT)
                          for alias in node.names]
            else:
                found.append((node.lineno, base))
    return [(line, name) for line, name in found if name == ROOT or name.startswith(ROOT + ".")]


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """One line per import of ``source`` (the text of ``module``) that breaks the rule."""
    own = package_of(module)
    problems = []
    for line, target in imported_modules(source, module, is_package):
        other = package_of(target)
        if other == own:
            continue
        if other not in LAYERS:
            problems.append(f"{module}:{line} imports {target}: package {other!r} has no layer in LAYERS")
        elif LAYERS[other] >= LAYERS[own]:
            problems.append(f"{module}:{line} imports {target}: {own!r} (layer {LAYERS[own]}) may not import "
                            f"{other!r} (layer {LAYERS[other]})")
    return problems


def modules() -> dict[str, tuple[str, bool]]:
    """module name -> (source, is a package's __init__) for every module under mmdgen/."""
    return {module_name(path): (path.read_text(), path.name == "__init__.py") for path in sorted(SOURCE.rglob("*.py"))}


def test_every_package_has_a_layer():
    packages = {package_of(name) for name in modules()}
    assert packages == set(LAYERS), (f"packages without a layer: {sorted(packages - set(LAYERS))}; "
                                     f"layers without a package: {sorted(set(LAYERS) - packages)}")


def test_every_import_points_down():
    problems = [problem for name, (source, is_package) in modules().items()
                for problem in violations(name, source, is_package)]
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_the_rule_sees_upward_imports_at_any_depth():
    upward = "import torch\n\ndef report():\n    from mmdgen.eval.plots import plot_mi_heatmap\n"
    assert violations("mmdgen.train.codec", upward) == [
        "mmdgen.train.codec:4 imports mmdgen.eval.plots: 'train' (layer 6) may not import 'eval' (layer 7)"]
    sideways = "from mmdgen import generate\nimport mmdgen.data.audio\n"
    assert [problem.split(":")[1].split()[0] for problem in violations("mmdgen.train.loop", sideways)] == ["1"]
    relative = "from ..eval import plots\n"
    assert len(violations("mmdgen.train.codec", relative)) == 1
    assert violations("mmdgen.kernels", "from . import mmd\n", is_package=True) == []
    unknown = violations("mmdgen.data.audio", "from mmdgen.nowhere import thing\n")
    assert unknown == ["mmdgen.data.audio:1 imports mmdgen.nowhere: package 'nowhere' has no layer in LAYERS"]


def test_no_cycles_between_packages():
    graph: dict[str, set[str]] = {}
    for name, (source, is_package) in modules().items():
        own = package_of(name)
        graph.setdefault(own, set()).update(
            package_of(target) for _, target in imported_modules(source, name, is_package)
            if package_of(target) != own)
    state: dict[str, str] = {}

    def cycle_from(package: str, path: list[str]) -> list[str] | None:
        state[package] = "open"
        for other in sorted(graph.get(package, ())):
            if state.get(other) == "open":
                return path + [package, other]
            if other not in state:
                found = cycle_from(other, path + [package])
                if found:
                    return found
        state[package] = "done"
        return None

    for package in sorted(graph):
        if package not in state:
            found = cycle_from(package, [])
            assert found is None, "packages import each other in a cycle: " + " -> ".join(found)


def test_importing_mmdgen_loads_no_torch():
    code = ("import sys, mmdgen; assert 'torch' not in sys.modules, 'torch imported';"
            "assert mmdgen.independence_loss.__module__ == 'mmdgen.losses.independence';"
            "import mmdgen.kernels; assert not hasattr(mmdgen.kernels, 'independence_loss')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=SOURCE.parent, timeout=120)
    assert done.returncode == 0, done.stderr

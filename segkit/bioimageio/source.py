"""The self-contained architecture source (`arch.py`) of a package's pytorch_state_dict weights.

bioimageio.core builds pytorch_state_dict weights by importing the architecture named in rdf.yaml.
A package that named `segkit.bioimageio...` would need segkit installed (and `segkit` on PyPI is
another project), so segkit ships the architecture as one Python file inside the package instead:
the source of the model classes and of `segkit.bioimageio.head`, and of everything in segkit they
use (found by reading the modules' syntax trees), without any `segkit` import, plus a small
registry of the classes it holds. It needs torch and the Python standard library only.

A model whose code needs another library (smp models need segmentation-models-pytorch) or imports
segkit inside a function cannot be made self-contained: `architecture_source` raises
`NotSelfContained`, and the package leaves its pytorch_state_dict weights out.

segkit itself never imports or runs this file: it runs its own packages from the checkpoint record
in `config.segkit` with its own registry (`segkit.bioimageio.read`).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from segkit.errors import SegkitError
from segkit.models import COMPOSED, SMP_PREFIX, model_class

#: The callable the package's rdf.yaml names in arch.py.
CALLABLE = "packaged_model"
#: Modules arch.py may import (top-level names): torch and the standard library modules segkit's models use.
ALLOWED_IMPORTS = frozenset({"__future__", "abc", "collections", "dataclasses", "enum", "functools", "itertools",
                             "math", "numbers", "pathlib", "torch", "typing", "warnings"})
#: Names arch.py defines itself instead of taking them from segkit (the registry).
PROVIDED = frozenset({"create_model"})
_HEAD = ("segkit.bioimageio.head", ("PackagedModel", "packaged_model"))


class NotSelfContained(SegkitError):
    """A model whose architecture cannot be written as one file that needs torch only."""


@dataclass
class _Module:
    name: str
    lines: list[str]
    definitions: dict[str, ast.stmt] = field(default_factory=dict)  # top-level name -> its statement
    imports: dict[str, tuple[ast.stmt, str, str | None]] = field(default_factory=dict)  # name -> (stmt, module, attr)


def _parse(name: str) -> _Module:
    source = inspect.getsource(importlib.import_module(name))
    module = _Module(name, source.splitlines())
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            module.definitions[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for item in ast.walk(target):
                    if isinstance(item, ast.Name) and item.id != "__all__":
                        module.definitions[item.id] = node
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                module.imports[alias.asname or alias.name] = (node, node.module or "", alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                module.imports[alias.asname or alias.name.split(".")[0]] = (node, alias.name, None)
    return module


class _References(ast.NodeVisitor):
    """Names a definition reads (annotations skipped: arch.py has `from __future__ import annotations`),
    and a refusal for imports inside it that arch.py could not satisfy."""

    def __init__(self, where: str) -> None:
        self.names: set[str] = set()
        self.where = where

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.names.add(node.id)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for item in [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]:
            if item is not None:
                self.visit(item)
        for statement in node.body:
            self.visit(statement)

    visit_FunctionDef = visit_AsyncFunctionDef = _function  # type: ignore[assignment]

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            _check_import(alias.name, self.where)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        _check_import(node.module or "", self.where)


def _check_import(module: str, where: str) -> None:
    if module.split(".")[0] not in ALLOWED_IMPORTS:
        raise NotSelfContained(f"{where} imports {module}, which a package's architecture file cannot rely on")


def _span(module: _Module, node: ast.stmt) -> str:
    decorators = getattr(node, "decorator_list", [])
    start = min([node.lineno, *(d.lineno for d in decorators)])
    return "\n".join(module.lines[start - 1:node.end_lineno])


def _bundle(roots: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(import statements, definitions in dependency order) for the (module, name) roots."""
    modules: dict[str, _Module] = {}
    done: dict[str, tuple[str, str]] = {}  # name in arch.py -> (module, name) it came from
    emitted: set[int] = set()
    imports: list[str] = []
    definitions: list[str] = []

    def module(name: str) -> _Module:
        if name not in modules:
            modules[name] = _parse(name)
        return modules[name]

    def visit(module_name: str, name: str) -> None:
        where = f"{module_name}.{name}"
        if name in PROVIDED:
            return
        mod = module(module_name)
        if name in mod.imports:
            statement, source, attr = mod.imports[name]
            if source.startswith("segkit"):
                if attr is None or name != attr:
                    raise NotSelfContained(f"{where}: `import {source}` or an alias cannot be inlined")
                visit(source, attr)
                return
            _check_import(source, where)
            text = ast.unparse(statement)
            if text not in imports:
                imports.append(text)
            return
        node = mod.definitions.get(name)
        if node is None or done.get(name) == (module_name, name):
            return  # a builtin or a local name, or already there
        if name in done:
            raise NotSelfContained(f"{where} and {'.'.join(done[name])} share a name in one architecture file")
        done[name] = (module_name, name)
        references = _References(where)
        references.visit(node)
        for reference in sorted(references.names - {name}):
            visit(module_name, reference)
        if id(node) not in emitted:
            emitted.add(id(node))
            definitions.append(_span(mod, node))

    for module_name, name in roots:
        visit(module_name, name)
    return imports, definitions


def _names(model: str, model_kwargs: dict[str, Any]) -> list[str]:
    """The registry names a model is built from (a composed model: its two stages too)."""
    names = [model]
    if model == COMPOSED:
        names += [str(model_kwargs["denoiser"]["name"]), str(model_kwargs["segmenter"]["name"])]
    return names


def architecture_source(model: str, model_kwargs: dict[str, Any], *, version: str = "") -> str:
    """The text of a package's arch.py for a registry model.

    Parameters
    ----------
    model : str
        The registry name.
    model_kwargs : dict
        Its parameters (a composed model's name its stages).
    version : str
        The segkit version, named in the file's header.

    Returns
    -------
    str
        Python source defining the model classes, `PackagedModel`, a `create_model` over the classes
        it holds and `packaged_model(model, model_kwargs, output, pad, channel)` (the callable rdf.yaml
        names); it imports torch and the standard library only.

    Raises
    ------
    NotSelfContained
        The model's code needs another library or cannot be inlined.
    """
    classes: dict[str, type] = {}
    for name in _names(model, model_kwargs):
        if name.startswith(SMP_PREFIX):
            raise NotSelfContained(f"{name} is built by segmentation-models-pytorch (its encoders are that library's "
                                   "code), which a file that needs torch only cannot hold")
        cls = model_class(name)
        if not cls.__module__.startswith("segkit."):
            raise NotSelfContained(f"model {name} is not defined by segkit")
        classes[name] = cls
    roots = [(cls.__module__, cls.__name__) for cls in classes.values()]
    roots += [(_HEAD[0], attr) for attr in _HEAD[1]]
    try:
        imports, definitions = _bundle(roots)
    except NotSelfContained as exc:
        raise NotSelfContained(f"the architecture of {model} cannot be shipped as one file: {exc}") from exc
    registry = "\n".join(f"    {name!r}: {cls.__name__}," for name, cls in classes.items())
    header = (f'"""The architecture of this package\'s pytorch_state_dict weights: segkit {version} `{model}`.\n\n'
              "Written by `segkit package` from segkit's own source (the model classes and what they use), so it\n"
              "needs torch only, not segkit. rdf.yaml names `packaged_model` with the model's parameters.\n"
              '"""')
    future = "from __future__ import annotations"
    imports = [text for text in imports if text != future]
    registry_code = (f"MODELS = {{\n{registry}\n}}\n\n\n"
                     "def create_model(name, **kwargs):\n"
                     '    """A model of this file by segkit registry name."""\n'
                     "    return MODELS[name](**kwargs)\n")
    return "\n\n\n".join([header + "\n\n" + future + "\n\n" + "\n".join(imports), *definitions, registry_code])

"""The method protocol's boundaries: `methods/` never imports `export/` (lazy imports inside functions
included), and a method keeps what it knows on itself, never on the transformers model."""
import ast
from pathlib import Path

import pytest
import torch

import tunesmith.methods
from tests.conftest import make_tiny_model
from tunesmith.methods import REGISTRY, attach, build_method, delta_state
from tunesmith.recipe import method_from_dict

PACKAGE = "tunesmith.methods"
FOLDER = Path(tunesmith.methods.__file__).parent


def imported(source: str, package: str = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import anywhere in `source` (module level, functions,
    classes, branches), relative ones resolved against `package`; `from a import b` yields a and a.b
    (b may be a module), and importlib.import_module / __import__ calls with a literal name count too."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.append((node.lineno, module))
            names += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__"):
                names.append((node.lineno, node.args[0].value))
    return names


def imports_export(source: str) -> list[str]:
    return [f"line {line}: {name}" for line, name in imported(source)
            if name == "tunesmith.export" or name.startswith("tunesmith.export.")]


@pytest.mark.parametrize("source", [
    "from ..export.peft_format import lora_payload",
    "def f():\n    from .. import export\n    return export",
    "class A:\n    def f(self):\n        import tunesmith.export.tuned as t",
    "from tunesmith.export import save_adapter",
    "import importlib\nif True:\n    importlib.import_module('tunesmith.export.tuned')",
])
def test_the_check_sees_every_form_of_import(source):
    assert imports_export(source), "the import check would miss this"


def test_relative_imports_resolve_within_methods():
    assert not imports_export("from .base import MethodBase\nfrom ..models.attention import PREFIX")


def test_methods_never_import_export():
    files = sorted(FOLDER.glob("*.py"))
    assert len(files) >= len(set(spec.split(":")[0] for spec in REGISTRY.values())), "methods/ not found"
    found = {f.name: imports_export(f.read_text()) for f in files}
    assert not {k: v for k, v in found.items() if v}, f"methods/ imports export/: {found}"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_attach_records_on_the_method_and_sets_nothing_on_the_model(tokenizer, name):
    model = make_tiny_model(tokenizer)
    plain_keys, attributes = set(model.state_dict()), set(vars(model))
    method = build_method(method_from_dict(name, {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trained = attach(model, method)
    assert set(vars(model)) == attributes, f"attach set {sorted(set(vars(model)) - attributes)} on the model"
    assert method.base_keys == plain_keys
    assert method.trained_names == tuple(trained) and trained
    assert set(trained) == {n for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict(keep_vars=True)
    base = {id(state[k]) for k in plain_keys}  # a new name for a base tensor (MoE-LoRA's shared experts) adds nothing
    added = {n for n in set(state) - plain_keys if id(state[n]) not in base}
    aliases = {n for n, t in state.items() if any(t is p for p in model.parameters() if p.requires_grad)}  # tied
    assert set(delta_state(model, method)) == set(trained) | added | aliases
    for part in getattr(method, "parts", []):  # compositions hand their record to every part
        assert part.trained_names == method.trained_names and part.base_keys == method.base_keys

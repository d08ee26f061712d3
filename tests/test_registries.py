"""Backends, selection criteria, exit methods and dataset kinds are each registered once; nothing dispatches
on names."""
import ast
import pathlib

import numpy as np
import pytest
import torch

import tinysaver.backends as backends
import tinysaver.criteria as criteria
from tests.helpers import write_zoo
from tinysaver.errors import BackendError, SelectionError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_backend_names_are_the_package_modules_and_each_registers_itself():
    files = sorted(p.stem for p in (ROOT / "tinysaver" / "backends").glob("*.py") if not p.stem.startswith("_"))
    assert sorted(backends.backend_names()) == files and backends.backend_names()[0] == "eager"
    from tinysaver.backends import BACKENDS

    assert BACKENDS == backends.backend_names()
    for name in files:
        b = backends.get_backend(name)
        assert b.name == name and callable(b.build)
    assert backends.get_backend("openvino").exports_onnx and not backends.get_backend("eager").exports_onnx
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'; choose from eager"):
        backends.get_backend("tensorrt")


def test_a_registered_backend_runs_in_a_cascade_without_touching_other_files():
    from tinysaver.backends import Runner, register_backend
    from tinysaver.cascade import Cascade
    from tinysaver.models import ModelSpec, create_model
    from tinysaver.runtimes import make_runner

    calls = []

    @register_backend("doubled", spins=False)
    def build(model, cache_dir=None, threads=None, spin=False):
        def run(x):
            calls.append(len(x))
            return 2 * model.module(x)
        return Runner(model.key, "doubled", run, threads=1)

    try:
        torch.manual_seed(0)
        m = create_model(ModelSpec("test_resnet", num_classes=4, input_size=32))
        r = make_runner(m, "doubled")
        x = torch.rand(3, 3, 32, 32)
        torch.testing.assert_close(r(x), 2 * m.module(x))
        with pytest.raises(BackendError, match="spin applies to the onnxruntime backend only"):
            make_runner(m, "doubled", spin=True)
        imgs = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
        s = create_model(ModelSpec("test_efficientnet", num_classes=4, input_size=32))
        c = Cascade([s, m], [0.5], backend="doubled")
        calls.clear()
        out = c.predict(imgs, batch_size=5)
        # the saver ran all five on the new backend, the base the ones it passed on
        assert calls[0] == 5 and sum(calls[1:]) == int((out.stage == 1).sum())
        # what a stage may ask of a backend follows its declared capabilities, not its name: this
        # one keeps its own threads (torch_modules=False), so a thread count of its own is fine
        # where a torch-module backend refuses one, and half precision is refused
        n = torch.get_num_threads() + 1
        Cascade([s, m], [0.5], backend="doubled", threads=n)
        with pytest.raises(Exception, match="per-stage thread counts apply to"):
            Cascade([s, m], [0.5], backend=backends.DEFAULT_BACKEND, threads=n)
        with pytest.raises(Exception, match="half and channels_last apply to"):
            Cascade([s, m], [0.5], backend="doubled", channels_last=True)
        backends.BACKEND_REGISTRY._items["doubled"] = backends.Backend("doubled", build, torch_modules=True)
        Cascade([s, m], [0.5], backend="doubled", channels_last=True)  # now it may
    finally:
        backends.BACKEND_REGISTRY.remove("doubled")


def test_no_code_outside_the_backends_package_names_a_backend():
    import re

    names = "|".join(backends.backend_names())
    pattern = re.compile(rf"""["']({names})["']""")
    found = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
             for f in [*(ROOT / "tinysaver").rglob("*.py"), *(ROOT / "esn").rglob("*.py")]
             if "backends" not in f.relative_to(ROOT).parts
             for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_no_module_dispatches_on_a_backend_criterion_or_method_name():
    """The if-chains are gone: no comparison of a backend, criterion, family or dataset-kind variable with a name."""
    from esn.methods import registered
    from tinysaver.sources import SOURCES

    names = {*backends.backend_names(), *criteria.criterion_names(), *registered(), *SOURCES, "saver cascade",
             "saver + ESN"}
    offenders = []
    for f in [*(ROOT / "tinysaver").rglob("*.py"), *(ROOT / "esn").rglob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare) and isinstance(node.left, (ast.Name, ast.Attribute)):
                var = node.left.id if isinstance(node.left, ast.Name) else node.left.attr
                if var not in ("backend", "criterion", "name", "family", "kind"):
                    continue
                for c in node.comparators:
                    if isinstance(c, ast.Constant) and c.value in names:
                        offenders.append(f"{f.relative_to(ROOT)}:{node.lineno} {var} vs {c.value!r}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith"
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in names):
                offenders.append(f"{f.relative_to(ROOT)}:{node.lineno} startswith({node.args[0].value!r})")
    assert offenders == []


def test_a_registered_criterion_is_offered_validated_and_used_by_the_selector(tmp_path):
    from tinysaver.selector import SelectorConfig, select
    from tinysaver.zoo import load_zoo

    # "half-zero": at least as accurate as the base on the exits, with at most half the samples exiting
    def half_candidates(order):
        ks, ts = criteria.get_criterion("zero").candidates(order)
        keep = ks <= order.n // 2
        return ks[keep], ts[keep]

    criteria.register_criterion(criteria.Criterion("half-zero", half_candidates, criteria.get_criterion("zero").passes,
                                                   None, False, False))
    try:
        with pytest.raises(SelectionError, match="registered twice"):
            criteria.register_criterion(criteria.get_criterion("zero"))
        with pytest.raises(SelectionError, match="half-zero is a two-stage rule"):
            SelectorConfig(criterion="half-zero", max_stages=3)
        with pytest.raises(SelectionError, match="takes no tolerance"):
            SelectorConfig(criterion="half-zero", tolerance=1)
        write_zoo(tmp_path)
        zoo = load_zoo("syn", tmp_path)
        zero = select(zoo, "m3", SelectorConfig(criterion="zero")).best
        half = select(zoo, "m3", SelectorConfig(criterion="half-zero")).best
        assert half.found and half.criterion == "half-zero"
        assert sum(half.exit_ratio_calib[:-1]) <= 0.5 + 1e-9 < sum(zero.exit_ratio_calib[:-1])
        assert half.acc_cascade_calib >= half.acc_base_calib
    finally:
        criteria.CRITERION_REGISTRY.remove("half-zero")
    with pytest.raises(SelectionError, match="unknown criterion .*; choose from zero, bounded, subset, guaranteed"):
        SelectorConfig(criterion="half-zero")


def test_a_registered_exit_method_is_trained_and_compared(pair, data):
    from esn import methods
    from esn.compare import CompareSettings, method_row, parse_families, train_methods
    from esn.sdn import SDN

    @methods.register_method("sdn-once")
    def _one(ctx):
        return {"SDN, own rule": methods.ExitMethod(ctx.sdn(), own_rule=lambda cal, s: [0.9] * cal["confs"].shape[0])}

    try:
        assert parse_families("sdn-once") == ["sdn-once"]
        from esn.train import frozen_features

        cache = frozen_features(pair, data.images)
        s = CompareSettings(epochs=1, wallclock_images=0)
        out = train_methods(pair, data, cache, ["sdn-once"], s, log=lambda m: None)
        assert list(out) == ["saver cascade", "SDN, own rule"] and isinstance(out["SDN, own rule"].module, SDN)
        feats = {"calib": cache, "test": cache}
        labels = {"calib": np.asarray(data.labels), "test": np.asarray(data.labels)}
        row, front = method_row("SDN, own rule", out["SDN, own rule"], pair, feats, labels, None, s, log=lambda m: None)
        assert "own_rule" in row and front and all(len(p) == 4 for p in front)
        plain, _ = method_row("SDN", methods.ExitMethod(out["SDN, own rule"].module), pair, feats, labels, None, s,
                              log=lambda m: None)
        assert "own_rule" not in plain
    finally:
        methods.EXIT_METHODS.remove("sdn-once")
    with pytest.raises(ValueError, match="unknown method"):
        parse_families("sdn-once")


def test_a_registered_dataset_kind_is_loaded_sized_and_named_in_errors():
    """A new kind of dataset name is one register_source call: load_dataset, dataset_size and the
    unknown-name message all read the registry."""
    import tinysaver.sources as sources
    from tests.helpers import png_bytes
    from tinysaver.data import dataset_size, load_dataset
    from tinysaver.decoding import RawSource
    from tinysaver.errors import DatasetError

    rng = np.random.default_rng(5)
    blobs = [png_bytes(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(5)]

    def listing(args: str) -> RawSource:
        n = int(args)
        return RawSource(f"blobs:{n}", [f"b{i}" for i in range(n)], np.arange(n) % 2, lambda i: blobs[i], ["a", "b"])

    sources.register_source("blobs", "blobs:N", listing=listing)
    try:
        assert dataset_size("blobs:5") == 5 and dataset_size("blobs:5", limit=3) == 3
        ds = load_dataset("blobs:5", progress=False, rows=(1, 4))
        assert ds.ids == ["b1", "b2", "b3"] and ds.labels.tolist() == [1, 0, 1] and ds.class_names == ["a", "b"]
        with pytest.raises(DatasetError, match="registered twice"):
            sources.register_source("blobs", "blobs:N", listing=listing)
        with pytest.raises(DatasetError, match=r"unknown dataset 'nope:x'; use imagefolder:PATH, .* or blobs:N"):
            load_dataset("nope:x")
    finally:
        sources.SOURCES.remove("blobs")


def test_every_registry_is_one_type_and_names_the_kind_the_unknown_name_and_the_known_ones():
    from esn import methods
    from tinysaver import backends, criteria, defer, sources
    from tinysaver.errors import TinysaverError
    from tinysaver.registry import Registry

    for registry, kind in [(backends.BACKEND_REGISTRY, "backend"), (criteria.CRITERION_REGISTRY, "criterion"),
                           (defer.DEFER_LOSSES, "loss"), (sources.SOURCES, "dataset kind"),
                           (methods.EXIT_METHODS, "exit method")]:
        assert isinstance(registry, Registry) and len(registry.names()) >= 2
        with pytest.raises(TinysaverError) as e:
            registry.get("nope")
        msg = str(e.value)
        assert msg == f"unknown {kind} 'nope'; choose from {', '.join(registry.names())}", msg
        first = registry.names()[0]
        assert registry.get(first) is registry.get(first) and first in registry
        with pytest.raises(TinysaverError, match=f"{kind} '{first}' is registered twice"):
            registry.add(first, registry.get(first))


def test_no_two_classes_of_the_package_share_a_name():
    """One meaning per name: a reader who meets `StagePlan`, `ServiceSpec` or `ProfileCost` knows
    which one it is (three classes were called Plan, and two Stage)."""
    import ast
    from collections import defaultdict

    from tests.helpers import REPO

    where = defaultdict(list)
    for path in [*(REPO / "tinysaver").rglob("*.py"), *(REPO / "esn").rglob("*.py")]:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                where[node.name].append(str(path.relative_to(REPO)))
    assert len(where) > 30 and {n: w for n, w in where.items() if len(w) > 1} == {}


def test_every_module_says_what_it_exports():
    """`__all__` in every module of the package, each name defined or imported there: the API a
    reader may use. Read from the source, so that no module is imported (and no Ray started) here."""
    import ast

    from tests.helpers import REPO

    for path in sorted([*(REPO / "tinysaver").rglob("*.py"), *(REPO / "esn").rglob("*.py")]):
        if path.name == "__main__.py" or (path.name == "__init__.py" and "__all__" not in path.read_text()):
            continue
        tree = ast.parse(path.read_text())
        bound, exported = set(), None
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    for name in (target.elts if isinstance(target, ast.Tuple) else [target]):
                        if isinstance(name, ast.Name):
                            bound.add(name.id)
                            if name.id == "__all__":  # a computed one (the package's lazy face) is checked as a name
                                exported = ast.literal_eval(node.value) if isinstance(node.value, ast.List) else []
            elif isinstance(node, ast.If):  # a guarded import or definition (TYPE_CHECKING, a fallback)
                bound.update(n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
        assert exported is not None, path
        missing = [n for n in exported if n not in bound]
        assert not missing, (path, missing)


def _module_imports(repo):
    """Each module of the package (dotted name) → (the modules it imports at its top level, the
    imports inside its functions as ``(function, line, module)``), read from the source."""
    import ast

    mods = {}
    for path in [*(repo / "tinysaver").rglob("*.py"), *(repo / "esn").rglob("*.py")]:
        parts = list(path.relative_to(repo).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    out = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

        def targets(node):
            if isinstance(node, ast.Import):
                return [a.name for a in node.names]
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module
            return [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods] or [base]

        tree = ast.parse(path.read_text())
        top = [t for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)) for t in targets(node)]
        inner = [(fn.name, node.lineno, t) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom)) for t in targets(node)]
        out[name] = (top, inner)
    return out


def test_imports_inside_functions_each_keep_something_heavy_out():
    """The package's rule (its docstring): imports are at module level, except where one would make
    a module load a third-party package it does not load already (torch, Ray, an extra). Each import
    inside a function is checked against what its module's top-level imports load, transitively
    (a module's packages' ``__init__`` included), read from the source."""
    import sys

    from tests.helpers import REPO

    mods = _module_imports(REPO)

    def loads(name: str) -> set:
        """The third-party top-level packages that importing ``name`` loads (a walk of the graph:
        a package's ``__init__`` and its modules import each other)."""
        seen, todo, found = set(), [name], set()
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            if m in mods:
                todo += [".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)] + mods[m][0]
            elif m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] not in ("tinysaver", "esn"):
                found.add(m.split(".")[0])
        return found

    needless = [f"{name}:{line} ({fn}) imports {t}"
                for name, (_, inner) in mods.items() for fn, line, t in inner
                if not loads(t) - loads(name) and not (t.split(".")[0] in mods and t not in mods)]
    assert len(mods) > 80 and not needless, needless

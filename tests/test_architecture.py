"""The package's structure: imports run one way (utilities and kernels at the bottom, the CLI on
top), no import cycles, no private names imported across modules, the simulator free of torch,
and one home for each shared concept. Reads the source (module- and function-level imports)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dipstream"

# a package may import only from its own layer or below
LAYERS = {
    0: ("dipstream", "errors", "io", "validation", "config", "paths", "budget", "options", "devices", "names", "limits"),
    1: ("native", "selection", "simulator", "kernels", "data"),
    2: ("models",),
    3: ("sparsity", "engine"),
    4: ("evaluation", "runtime"),
    5: ("experiments",),
    6: ("training", "reports", "api"),
    7: ("cli", "server", "chat_session"),
}
LAYER = {pkg: n for n, pkgs in LAYERS.items() for pkg in pkgs}


def _modules() -> dict[str, Path]:
    mods = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


MODS = _modules()


def _resolve(name: str) -> str:
    while name and name not in MODS:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "dipstream"


def _imports(mod: str) -> list[tuple[str, str]]:
    """(imported module, imported name or '') of every dipstream import in `mod`."""
    f = MODS[mod]
    out = []
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("dipstream"):
                for a in node.names:
                    sub = f"{name}.{a.name}"
                    out.append((sub if sub in MODS else _resolve(name), a.name))
        elif isinstance(node, ast.Import):
            out += [(_resolve(a.name), "") for a in node.names if a.name.startswith("dipstream")]
    return out


# `import dipstream` offers the Python API (`dipstream.load`, ...) by a lazy facade to dipstream.api,
# loaded on first use: the one edge from the bottom to the top that is not a dependency
FACADE = ("dipstream", "dipstream.api")
GRAPH = {m: {d for d, _ in _imports(m) if d and d != m and (m, d) != FACADE} for m in MODS}


def test_every_package_has_a_layer():
    assert {_package(m) for m in MODS} <= set(LAYER)


def test_imports_run_one_way():
    upward = sorted((m, d) for m, ds in GRAPH.items() for d in ds if LAYER[_package(d)] > LAYER[_package(m)])
    assert not upward, f"imports from a higher layer: {upward}"


def test_no_import_cycles():
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_across_modules():
    private = [(m, d, n) for m in MODS for d, n in _imports(m)
               if n.startswith("_") and not n.startswith("__") and d != m]
    assert not private, f"private names imported across modules: {private}"


def test_simulator_and_budget_need_no_torch():
    for mod, f in MODS.items():
        if _package(mod) == "simulator" or mod == "dipstream.budget":
            names = [a.name for node in ast.walk(ast.parse(f.read_text()))
                     if isinstance(node, (ast.Import, ast.ImportFrom))
                     for a in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])]
            assert not any(n.split(".")[0] == "torch" for n in names), mod


def test_one_home_per_concept():
    """Each shared concept is defined once (the copies the architecture review found are gone)."""
    homes = {"dip_split": "dipstream.budget", "keep_to_k": "dipstream.budget", "gamma_at": "dipstream.budget",
             "topk_mask": "dipstream.selection", "ca_select": "dipstream.selection",
             "cache_root": "dipstream.paths", "machine": "dipstream.paths", "shape_of": "dipstream.models.loading",
             "check_density": "dipstream.budget", "replace_mlps": "dipstream.models.arch"}
    found = {}
    for mod, f in MODS.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in homes:
                found.setdefault(node.name, []).append(mod)
    assert found == {name: [home] for name, home in homes.items()}


def test_decode_methods_are_the_registrys():
    """The registry's decode side (what the engine runs, torch-free) names exactly the registered
    methods that decode, and `generate` offers exactly those."""
    from dataclasses import fields

    from dipstream.runtime.generate import GenerateConfig
    from dipstream.sparsity import METHODS
    from dipstream.sparsity.decoding import DECODERS

    assert set(DECODERS) == {n for n, c in METHODS.items() if c.decodes} == {"dense", "dip", "dip-ca"}
    method = next(f for f in fields(GenerateConfig) if f.name == "method")
    assert set(method.metadata["choices"]) == set(DECODERS)


def _trees():
    return {mod: ast.parse(f.read_text()) for mod, f in MODS.items()}


TREES = _trees()


def _modules_where(pred) -> set[str]:
    return {mod for mod, tree in TREES.items() if any(pred(node) for node in ast.walk(tree))}


def test_one_module_reads_the_model_file_directly():
    """Direct I/O, positioned reads and the page-cache drop have one home (engine.storage): one
    module names O_DIRECT, calls os.preadv or posix_fadvise, or the native read pool."""
    def direct(node):
        return (isinstance(node, ast.Attribute) and node.attr in ("O_DIRECT", "preadv", "posix_fadvise")) or \
            (isinstance(node, ast.Constant) and node.value == "O_DIRECT")

    def pool(node):
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("ds_pread")

    assert _modules_where(direct) == {"dipstream.engine.storage"}
    assert _modules_where(pool) == {"dipstream.engine.storage"}


def test_one_top_k_rule_per_language():
    """The selection rule's top-k is written once in Python (selection: torch's topk, used for arrays
    through the native kernel) and once in C (ds_topk_abs); no numpy top-k on the methods' paths."""
    def torch_topk(node):
        return isinstance(node, ast.Attribute) and node.attr == "topk"

    def numpy_topk(node):
        return isinstance(node, ast.Attribute) and node.attr == "argpartition"

    assert _modules_where(torch_topk) == {"dipstream.selection"}
    on_paths = {m for m in _modules_where(numpy_topk) if _package(m) in ("engine", "sparsity", "runtime", "selection",
                                                                         "kernels", "dipstream")}
    assert not on_paths, on_paths
    import re

    csrc = PKG / "native" / "csrc"
    defs = [(f.name, m) for f in csrc.glob("*.c") for m in re.findall(r"^\S.*\b(\w*topk\w*)\s*\(", f.read_text(), re.M)]
    assert defs == [("gemv.c", "ds_topk_abs")], defs


def test_one_module_spells_layer_names():
    """Hook and tensor names (`layers.<i>.<part>`) are formatted in one module (dipstream.names)."""
    def spells(node):
        if not isinstance(node, ast.JoinedStr):
            return False
        parts = node.values
        return any(isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.endswith("layers.")
                   and not a.value.endswith("model.layers.") and isinstance(b, ast.FormattedValue)
                   for a, b in zip(parts, parts[1:]))

    assert _modules_where(spells) == set()  # names.py joins its parts; nothing else formats them
    assert any('"layers"' in line for line in (PKG / "names.py").read_text().splitlines())


def test_one_sampler_and_one_cache_aware_choice():
    """Tokens are sampled in one place (engine.decode's Sampler: numpy, one seeded stream on every
    path), and DIP-CA's re-weighting (gamma_t) is applied in one (selection.ca_select)."""
    def samples(node):
        return isinstance(node, ast.Attribute) and node.attr in ("multinomial", "choice") and \
            not (isinstance(node.value, ast.Name) and node.value.id in ("random",))

    def gamma(node):
        return isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "gamma_at"

    assert {m for m in _modules_where(samples) if _package(m) not in ("simulator",)} == {"dipstream.engine.decode"}
    assert _modules_where(gamma) == {"dipstream.selection"}


def test_one_reader_of_model_shapes():
    """A ModelShape is made from a config (`from_hf_config`, the presets too) or from a stored dict,
    never built field by field outside its module."""
    def builds(node):
        return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ModelShape"

    assert _modules_where(builds) <= {"dipstream.simulator.model_shape"}


def test_every_registered_method_has_one_catalog_entry():
    """What a method is and needs has one home (sparsity.catalog, torch-free, read by the CLI before
    the model stack loads); `register` gives each class its entry."""
    from dipstream.sparsity import METHODS
    from dipstream.sparsity.catalog import CATALOG

    assert list(METHODS) == list(CATALOG)
    for name, cls in METHODS.items():
        assert (cls.summary, cls.reads, cls.needs_calibration, cls.on_experts) == (
            CATALOG[name].summary, CATALOG[name].reads, CATALOG[name].needs_calibration, CATALOG[name].on_experts)

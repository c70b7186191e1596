"""The shape of the code: layers in the order data flows, no import cycles (lazy imports count),
only the public APIs of Flower and Ray, no internal tracker numbers."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def import_graph(package: Path) -> dict[str, set[str]]:
    mods = {}
    for f in package.rglob("*.py"):
        rel = f.relative_to(package.parent).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    edges = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and not (mods[m].name == "__init__.py" and t.startswith(m + ".")):
                    edges[m].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                on.discard(w)
                comp.append(w)
            on.discard(v)
            if comp:
                found.append(sorted([v, *comp]))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_of_fedcl_has_no_cycle():
    assert cycles(import_graph(ROOT / "fedcl")) == []


# Lower layers never import higher ones (lazy imports count). A module may import its own layer
# and those below.
LAYERS = [
    ("fedcl.errors", "fedcl.seeding", "fedcl.metrics", "fedcl.report", "fedcl.plugins", "fedcl.hooks",
     "fedcl.faults", "fedcl.conf"),                   # foundations, the interfaces of cross-cutting concerns,
                                                      # and fault injection (a concern that needs nothing more)
    ("fedcl.aggregation",),                           # pure math: rules, LoRA factor schemes, subspace merges
    ("fedcl.data",),
    ("fedcl.models",),
    ("fedcl.methods",),                               # know nothing of the server, the client or the runtime
    ("fedcl.experiment",),                            # data + scenario + model factory + method
    ("fedcl.client",),                                # one logical client's round, its state store, the codec
    ("fedcl.server",),                                # the strategy and what it drives; uses the client's codec
    ("fedcl.privacy",),                               # a concern behind server callbacks + client hooks
    ("fedcl.config",),                                # composing and validating (each plug-in checks itself)
    ("fedcl.runtime",),                               # the one Flower/Ray adapter: starts server + clients
    ("fedcl.cli", "fedcl", "fedcl.subspace", "fedcl.federation"),  # entry points; old module names
]
# The few upward imports there are, each lazy and for a stated reason.
UPWARD = {
    # the contract: ContinualStrategy.from_overrides composes and validates like `fedcl`
    ("fedcl.server.strategy", "fedcl.config"),
    # README's ServerApp example: strategy.backend_config() gives run_simulation the Ray resources of the config
    ("fedcl.server.strategy", "fedcl.runtime.backend"),
}


def layer_of(module: str) -> int:
    best = max((p for layer in LAYERS for p in layer if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    # `from fedcl import report` also yields an edge to the package itself: the submodule is the import
    return sorted(f"{m} -> {t}" for m, targets in edges.items() for t in targets
                  if t != "fedcl" and layer_of(t) > layer_of(m) and (m, t) not in UPWARD)


def test_layers_import_only_their_own_and_lower_ones():
    edges = import_graph(ROOT / "fedcl")
    assert all(layer_of(m) >= 0 for m in edges)  # every module has a layer
    assert upward_imports(edges) == []


def test_the_layer_check_finds_a_method_that_imports_the_server_and_a_client_that_imports_it():
    edges = {"fedcl.methods.mine": {"fedcl.server.strategy", "fedcl.aggregation.rules"},
             "fedcl.aggregation.rules": {"fedcl.methods.base"},
             "fedcl.client.app": {"fedcl.server.schedule"}, "fedcl.server.loop": {"fedcl.runtime.simulation"}}
    assert upward_imports(edges) == ["fedcl.aggregation.rules -> fedcl.methods.base",
                                     "fedcl.client.app -> fedcl.server.schedule",
                                     "fedcl.methods.mine -> fedcl.server.strategy",
                                     "fedcl.server.loop -> fedcl.runtime.simulation"]


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import pkg.b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


# Flower's and Ray's internals: anything under a ``_``-prefixed name, and the packages that are the
# server, SuperLink and simulation engine of Flower rather than its API for apps and strategies
PRIVATE_MODULES = ("flwr.server.superlink", "flwr.superlink", "flwr.supercore", "flwr.compat",
                   "flwr.simulation.ray_transport", "ray._private")
THIRD_PARTY = ("flwr", "ray")


def private_uses(source: str) -> list[str]:
    """Uses of Flower or Ray outside their public API in one module: imports of private modules or
    names, private attributes read from them, and attributes assigned on their modules or classes."""
    tree, found, bound = ast.parse(source), [], set()

    def third_party(module: str) -> bool:
        return module.split(".")[0] in THIRD_PARTY

    def private_module(module: str) -> bool:
        parts = module.split(".")
        return (any(p.startswith("_") for p in parts)
                or any(module == m or module.startswith(m + ".") for m in PRIVATE_MODULES))

    def root(node):
        while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
            node = node.func if isinstance(node, ast.Call) else node.value
        return node.id if isinstance(node, ast.Name) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if third_party(a.name):
                    bound.add(a.asname or a.name.split(".")[0])
                    if private_module(a.name):
                        found.append(f"line {node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and third_party(node.module):
            for a in node.names:
                bound.add(a.asname or a.name)
                if private_module(node.module) or private_module(f"{node.module}.{a.name}"):
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and root(node) in bound:
            if node.attr.startswith("_") and not (node.attr.startswith("__") and node.attr.endswith("__")):
                found.append(f"line {node.lineno}: .{node.attr} of {root(node)}")
            if isinstance(node.ctx, (ast.Store, ast.Del)):
                found.append(f"line {node.lineno}: assigns {root(node)}...{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr")
              and node.args and root(node.args[0]) in bound):
            found.append(f"line {node.lineno}: {node.func.id} on {root(node.args[0])}")
    return found


def test_fedcl_uses_only_the_public_api_of_flower_and_ray():
    hits = {str(f.relative_to(ROOT)): uses for f in sorted((ROOT / "fedcl").rglob("*.py"))
            if (uses := private_uses(f.read_text()))}
    assert hits == {}


def test_the_private_use_finder_finds_patches_and_internal_imports():
    patched = (
        "import ray._private.utils\n"
        "from flwr.server.superlink.fleet.vce import vce_api\n"
        "from flwr.simulation.ray_transport.ray_actor import BasicActorPool\n"
        "from flwr.supercore.date import now\n"
        "import flwr.compat.client.run_info_store as ris\n"
        "from flwr.server.superlink.fleet.vce.backend import raybackend\n"
        "def install():\n"
        "    raybackend.BasicActorPool = object\n"
        "    vce_api._register_nodes(3, None)\n"
        "    setattr(vce_api, 'add_messages_to_queue', print)\n"
    )
    uses = private_uses(patched)
    assert len(uses) == 9, uses
    assert private_uses("import ray\nfrom flwr.app import Message\nray.init()\nMessage.metadata\n") == []
    assert private_uses("import ray\nray.exceptions.X = 1\n") == ["line 2: assigns ray...X"]


def test_no_internal_tracker_numbers_in_what_users_read():
    pattern = re.compile(r"\bissues? ?#?\d+", re.IGNORECASE)
    hits = []
    for folder in ("fedcl", "tests", "simulations", "docs"):
        for f in (ROOT / folder).rglob("*"):
            if f.suffix in {".py", ".md", ".yaml", ".sh", ".txt"} and f.name != Path(__file__).name:
                hits += [f"{f.relative_to(ROOT)}:{n}" for n, line in enumerate(f.read_text().splitlines(), 1)
                         if pattern.search(line)]
    readme = (ROOT / "README.md").read_text().splitlines()
    hits += [f"README.md:{n}" for n, line in enumerate(readme, 1) if pattern.search(line)]
    assert hits == []

"""The layout of node/ (README, "Layout"): one subpackage per service, py-libp2p behind
node/p2p, no import cycles. Read from the source with ast: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

NODE = Path(__file__).resolve().parent.parent / "node"
SUBPACKAGES = {"agent", "api", "chain", "cli", "discovery", "jobs", "ml", "p2p", "smip",
               "testnet"}


def module_name(path: Path) -> str:
    parts = path.relative_to(NODE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports when it runs (at any depth: lazy imports inside
    functions count; imports under ``if TYPE_CHECKING:`` are never run and do not)."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(node) for branch in ast.walk(tree) if _is_type_checking(branch)
                   for statement in branch.body for node in ast.walk(statement)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"


MODULES = {module_name(p): p for p in NODE.rglob("*.py")}


def node_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps = set()
        for target in imports(path):
            while target and target not in MODULES:  # `from node.x import name`: node.x
                target = target.rpartition(".")[0]
            if target and target not in (name, "node"):
                deps.add(target)
        graph[name] = deps
    return graph


def test_node_is_one_subpackage_per_service() -> None:
    packages = {p.parent.name for p in NODE.glob("*/__init__.py")}
    assert packages == SUBPACKAGES
    for package in packages:
        doc = ast.get_docstring(ast.parse((NODE / package / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"node/{package}/__init__.py: say what it may import"


def test_only_node_p2p_imports_libp2p() -> None:
    offenders = {name: sorted(m for m in imports(path) if m.split(".")[0] == "libp2p")
                 for name, path in MODULES.items() if not name.startswith("node.p2p")}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components: each of two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for dep in graph.get(module, set()):
            if dep not in index:
                visit(dep)
                low[module] = min(low[module], low[dep])
            elif dep in stack:
                low[module] = min(low[module], index[dep])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycles_in_node() -> None:
    assert find_cycles(node_graph()) == []


def test_the_checks_can_fail(tmp_path: Path) -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from node.b import g\n")
    assert "node.b" in imports(a)
    guarded = tmp_path / "t.py"
    guarded.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                       "    from node.b import g\n")
    assert "node.b" not in imports(guarded)


def test_ml_imports_nothing_else_of_node() -> None:
    graph = node_graph()
    for name, deps in graph.items():
        if name.startswith("node.ml"):
            assert all(d.startswith("node.ml") for d in deps), (name, deps)


def test_the_package_imports_no_test_code() -> None:
    """Test-only code (the cluster, the cheating workers) lives in tests/: the installed
    package imports none of it (taskproc loads tests/adversary.py by name only when a
    worker is configured to cheat)."""
    for name, path in MODULES.items():
        assert not any(t == "tests" or t.startswith("tests.") for t in imports(path)), name
    assert not (NODE / "ml" / "adversary.py").exists()


# The libp2p objects behind node/p2p's Network (host.py), and the library's stream
# internals: the services use the typed calls of node/p2p/api.py's P2P instead.
LIBRARY_ATTRIBUTES = {"host", "pubsub", "dht", "gossipsub", "guard", "nat", "muxed_conn"}
# node/testnet's namespace network (netns.Network.host(name)) is no p2p Network.
NOT_A_P2P_NETWORK = {("node.cli.testnet", "host")}


def library_reaches(path: Path) -> list[str]:
    """``net.X`` / ``<anything>.net.X`` with X a library object of the Network, and any
    ``.muxed_conn``, as ``line:expression``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute) or node.attr not in LIBRARY_ATTRIBUTES:
            continue
        owner = node.value
        on_net = ((isinstance(owner, ast.Name) and owner.id == "net")
                  or (isinstance(owner, ast.Attribute) and owner.attr == "net"))
        if on_net or node.attr == "muxed_conn":
            found.append(f"{node.lineno}:{ast.unparse(node)}")
    return found


def test_services_use_the_typed_p2p_calls() -> None:
    offenders = {}
    for name, path in MODULES.items():
        if name.startswith("node.p2p"):
            continue
        reaches = [r for r in library_reaches(path)
                   if (name, r.split(".")[-1]) not in NOT_A_P2P_NETWORK]
        if reaches:
            offenders[name] = reaches
    assert offenders == {}


def test_the_reach_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("async def f(self, net, stream):\n"
                   "    await self.net.pubsub.publish('t', b'')\n"
                   "    net.dht.value_store\n"
                   "    peer = stream.muxed_conn.peer_id\n"
                   "    self.net.connected_peers()\n")
    assert sorted(library_reaches(bad)) == ["2:self.net.pubsub", "3:net.dht",
                                           "4:stream.muxed_conn"]

"""
The package's layers (issue 15): which module may import which, read from the
source with C{ast} so that nothing of the package is imported and the check
runs even while a module is broken.

The rules are the tables below.  A pattern is a dotted module name, C{*}
matching anything (C{*.__main__}), and C{x.*} also covers the package C{x}
itself.  C{from x import name} counts as importing the submodule C{x.name}
when there is one, as importing C{x} otherwise.  The checker is itself run
on an in-memory package that breaks every rule, so a checker bug cannot hide
a violation in the real tree.
"""

import ast
from collections import namedtuple
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = "clawdbot"
ROOT = Path(__file__).resolve().parent.parent

LEAVES = (
    "clawdbot.errors",
    "clawdbot.units",
    "clawdbot.net",
    "clawdbot.server_tls",
    "clawdbot.strictjson",
    "clawdbot.workers",
    "clawdbot.auth.identity",
    "clawdbot.auth.presets",
    "clawdbot.auth.session",
)

OWN = "own subpackage"
"""In L{MAY_IMPORT}: the importer's own subpackage, e.g. C{clawdbot.backend.*}."""

MAY_IMPORT = (
    # (rule, importers, all that they may import from the package)
    ("leaves import only leaves", LEAVES, LEAVES),
    ("config imports only leaves", ("clawdbot.config",), LEAVES),
    (
        "auth, backend, storage, ops import only leaves, config and their own subpackage",
        ("clawdbot.auth.*", "clawdbot.backend.*", "clawdbot.storage.*", "clawdbot.ops.*"),
        LEAVES + ("clawdbot.config", OWN),
    ),
    ("__main__ imports only cli", ("*.__main__",), ("clawdbot.cli",)),
)

ONLY_IMPORTED_BY = (
    # (module, all that may import it, at module level or inside a function)
    ("twisted.web.server", ("clawdbot.http.*",)),
    ("clawdbot.http.*", ("clawdbot.http.*", "clawdbot.tap", "clawdbot.cli")),
    ("twisted.internet.reactor", ("clawdbot.tap", "clawdbot.cli")),
)

CYCLES = "no import cycles"
LOCAL = "no function-local imports of the package"

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)

Found = namedtuple("Found", "path line importer name local")
"""One name an import statement touches: C{importer} imports C{name} at C{path:line}, inside a function if C{local}."""


def in_package(name):
    """
    @return: whether the dotted C{name} is the package or in it.
    """
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def matches(name, pattern):
    """
    @return: whether the dotted C{name} matches C{pattern}; C{x.*} also matches C{x}.
    """
    return fnmatchcase(name, pattern) or (pattern.endswith(".*") and name == pattern[:-2])


def covered(name, patterns):
    """
    @return: whether C{name} matches one of C{patterns}.
    """
    return any(matches(name, pattern) for pattern in patterns)


def module_name(path):
    """
    @param path: a module's path relative to the repository, C{clawdbot/auth/tokens.py}.
    @return: its dotted name; a package's C{__init__.py} names the package.
    """
    parts = list(PurePosixPath(path).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_package(root):
    """
    @return: C{{path: source}} for every module of the package under C{root}, paths relative to it.
    """
    files = sorted((root / PACKAGE).rglob("*.py"))
    return {f.relative_to(root).as_posix(): f.read_text(encoding="utf-8") for f in files}


def import_nodes(node, local=False):
    """
    Every import statement under C{node}, at any depth.

    @return: C{(statement, local)} pairs, C{local} when it sits inside a function.
    """
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local
        yield from import_nodes(child, local or isinstance(child, FUNCTIONS))


def from_base(node, path):
    """
    @return: the absolute name of the module a C{from ... import} statement in C{path} reads from.
    """
    if not node.level:
        return node.module
    package = module_name(path) if path.endswith("/__init__.py") else module_name(path).rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def touched(node, path, modules):
    """
    The dotted names one import statement touches.

    @param modules: the package's module names, to tell a submodule from an attribute.
    @return: for the package, the modules it imports; elsewhere, the module
        read from and each C{module.name}, since any name may be a submodule.
    """
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = from_base(node, path)
    names = {f"{base}.{alias.name}" for alias in node.names}
    if not in_package(base):
        return names | {base}
    submodules = names & modules
    return submodules | ({base} if len(submodules) < len(names) else set())


def scan(sources):
    """
    @param sources: C{{path: source}}, the package's modules.
    @return: a L{Found} for every name every import statement touches.
    """
    modules = {module_name(path) for path in sources}
    found = []
    for path, source in sorted(sources.items()):
        for node, local in import_nodes(ast.parse(source, path)):
            for name in sorted(touched(node, path, modules)):
                found.append(Found(path, node.lineno, module_name(path), name, local))
    return found


def own(allowed, importer):
    """
    @return: C{allowed} with L{OWN} replaced by the pattern of C{importer}'s subpackage.
    """
    subpackage = ".".join(importer.split(".")[:2]) + ".*"
    return [subpackage if pattern == OWN else pattern for pattern in allowed]


def layer_violations(found):
    """
    @return: C{(rule, "path:line: ...")} for every import that breaks a row of
        L{MAY_IMPORT} or L{ONLY_IMPORTED_BY}.
    """
    violations = []
    for f in found:
        where = f"{f.path}:{f.line}: {f.importer} imports {f.name}"
        for rule, importers, allowed in MAY_IMPORT:
            if in_package(f.name) and covered(f.importer, importers) and not covered(f.name, own(allowed, f.importer)):
                violations.append((rule, where))
        for module, importers in ONLY_IMPORTED_BY:
            if matches(f.name, module) and not covered(f.importer, importers):
                violations.append((f"only {', '.join(importers)} import {module}", where))
    return violations


def components(graph):
    """
    Tarjan's strongly connected components.

    @param graph: C{{node: set of nodes}}, every node a key.
    @return: the components, each a set of nodes.
    """
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for after in sorted(graph[node]):
            if after not in index:
                visit(after)
                low[node] = min(low[node], low[after])
            elif after in on_stack:
                low[node] = min(low[node], index[after])
        if low[node] == index[node]:
            component = set()
            while node not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            result.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def cycles(found):
    """
    Import cycles among the package's modules, function-local imports included.

    @return: C{(rule, text)} per cycle: its modules, then every import that closes it, with C{path:line}.
    """
    graph = {f.importer: set() for f in found}
    edges = [f for f in found if in_package(f.name)]
    for f in edges:
        graph.setdefault(f.name, set())
        graph[f.importer].add(f.name)
    violations = []
    for component in components(graph):
        if len(component) > 1 or any(node in graph[node] for node in component):
            inside = [f"{f.path}:{f.line}: {f.importer} imports {f.name}" for f in edges if {f.importer, f.name} <= component]
            violations.append((CYCLES, "\n    ".join([" <-> ".join(sorted(component))] + inside)))
    return sorted(violations)


def local_imports(found):
    """
    @return: C{(rule, "path:line: ...")} for every import of a package module inside a function.
    """
    return [(LOCAL, f"{f.path}:{f.line}: {f.importer} imports {f.name} inside a function") for f in found if f.local and in_package(f.name)]


def report(violations):
    """
    @return: the violations as text, grouped by rule.
    """
    lines = [f"{len(violations)} violations"]
    for rule in dict.fromkeys(rule for rule, _ in violations):
        lines.append(f"[{rule}]")
        lines.extend(f"  {text}" for r, text in violations if r == rule)
    return "\n".join(lines)


BROKEN = {
    "clawdbot/__init__.py": "",
    "clawdbot/__main__.py": "from clawdbot.cli import run\nfrom clawdbot import tap\n",
    "clawdbot/cli.py": "from twisted.internet import reactor\nfrom clawdbot.http.site import Site\n",
    "clawdbot/tap.py": "import twisted.internet.reactor\nfrom clawdbot import config\n",
    "clawdbot/config.py": "from clawdbot.errors import APIError\n\ndef load():\n    from clawdbot import tap\n",
    "clawdbot/errors.py": "import json\n",
    "clawdbot/units.py": "from . import errors\nfrom .auth import identity, NAME\n",
    "clawdbot/logs.py": "import twisted.web.server\n",
    "clawdbot/auth/__init__.py": "",
    "clawdbot/auth/identity.py": "from .tokens import Principal\n",
    "clawdbot/auth/tokens.py": (
        "from clawdbot.auth import identity\nfrom ..backend import options\n\n"
        "class Key:\n    def check(self):\n        from clawdbot.http import sso\n        import json\n"
    ),
    "clawdbot/backend/__init__.py": "",
    "clawdbot/backend/options.py": "from clawdbot.config import Config\nfrom clawdbot.errors import APIError\nfrom twisted.web import resource\n",
    "clawdbot/storage/__init__.py": "",
    "clawdbot/storage/store.py": "from twisted.web import server\nimport clawdbot.backend.options as options\n",
    "clawdbot/ops/__init__.py": "",
    "clawdbot/ops/runtime.py": "from twisted.internet.reactor import callLater\nfrom clawdbot.ops import NAME\n",
    "clawdbot/http/__init__.py": "",
    "clawdbot/http/site.py": "from twisted.web.server import Site, Request\nfrom . import sso\n",
    "clawdbot/http/sso.py": "from clawdbot.config import Config\n",
}
"""A package that breaks each rule at least once, beside imports each rule allows."""


class CheckerTests(SynchronousTestCase):
    """
    The checker on L{BROKEN}: every violation found, nothing allowed reported.
    """

    def test_layer_rules(self):
        """Each row of both tables catches its violations, with relative, aliased, submodule and third-party forms resolved."""
        self.assertEqual(
            sorted(layer_violations(scan(BROKEN))),
            sorted(
                [
                    ("__main__ imports only cli", "clawdbot/__main__.py:2: clawdbot.__main__ imports clawdbot.tap"),
                    (
                        "auth, backend, storage, ops import only leaves, config and their own subpackage",
                        "clawdbot/auth/tokens.py:2: clawdbot.auth.tokens imports clawdbot.backend.options",
                    ),
                    (
                        "auth, backend, storage, ops import only leaves, config and their own subpackage",
                        "clawdbot/auth/tokens.py:6: clawdbot.auth.tokens imports clawdbot.http.sso",
                    ),
                    (
                        "auth, backend, storage, ops import only leaves, config and their own subpackage",
                        "clawdbot/storage/store.py:2: clawdbot.storage.store imports clawdbot.backend.options",
                    ),
                    ("config imports only leaves", "clawdbot/config.py:4: clawdbot.config imports clawdbot.tap"),
                    ("leaves import only leaves", "clawdbot/auth/identity.py:1: clawdbot.auth.identity imports clawdbot.auth.tokens"),
                    ("leaves import only leaves", "clawdbot/units.py:2: clawdbot.units imports clawdbot.auth"),
                    ("only clawdbot.http.*, clawdbot.tap, clawdbot.cli import clawdbot.http.*", "clawdbot/auth/tokens.py:6: clawdbot.auth.tokens imports clawdbot.http.sso"),
                    ("only clawdbot.http.* import twisted.web.server", "clawdbot/logs.py:1: clawdbot.logs imports twisted.web.server"),
                    ("only clawdbot.http.* import twisted.web.server", "clawdbot/storage/store.py:1: clawdbot.storage.store imports twisted.web.server"),
                    ("only clawdbot.tap, clawdbot.cli import twisted.internet.reactor", "clawdbot/ops/runtime.py:1: clawdbot.ops.runtime imports twisted.internet.reactor"),
                ]
            ),
        )

    def test_cycles(self):
        """Cycles through relative and function-local imports are found, each with the imports that close it."""
        self.assertEqual(
            cycles(scan(BROKEN)),
            [
                (
                    CYCLES,
                    "clawdbot.auth.identity <-> clawdbot.auth.tokens\n"
                    "    clawdbot/auth/identity.py:1: clawdbot.auth.identity imports clawdbot.auth.tokens\n"
                    "    clawdbot/auth/tokens.py:1: clawdbot.auth.tokens imports clawdbot.auth.identity",
                ),
                (
                    CYCLES,
                    "clawdbot.config <-> clawdbot.tap\n"
                    "    clawdbot/config.py:4: clawdbot.config imports clawdbot.tap\n"
                    "    clawdbot/tap.py:2: clawdbot.tap imports clawdbot.config",
                ),
            ],
        )

    def test_local_imports(self):
        """Package imports inside functions and methods are listed; third-party ones are not."""
        self.assertEqual(
            local_imports(scan(BROKEN)),
            [
                (LOCAL, "clawdbot/auth/tokens.py:6: clawdbot.auth.tokens imports clawdbot.http.sso inside a function"),
                (LOCAL, "clawdbot/config.py:4: clawdbot.config imports clawdbot.tap inside a function"),
            ],
        )

    def test_report(self):
        """The report counts the violations and groups them under their rule, in first-seen order."""
        self.assertEqual(
            report([("a", "x:1"), ("b", "y:2"), ("a", "z:3")]),
            "3 violations\n[a]\n  x:1\n  z:3\n[b]\n  y:2",
        )


class PackageTests(SynchronousTestCase):
    """
    The real package follows the rules.
    """

    def setUp(self):
        self.found = scan(read_package(ROOT))

    def assertClean(self, violations):
        """
        Fail with the report of C{violations} unless there are none.
        """
        if violations:
            self.fail(report(violations))

    def test_layers(self):
        """No import breaks a row of L{MAY_IMPORT} or L{ONLY_IMPORTED_BY}."""
        self.assertClean(layer_violations(self.found))

    def test_no_cycles(self):
        """The package's modules import one another without a cycle, counting function-local imports."""
        self.assertClean(cycles(self.found))

    def test_no_function_local_imports(self):
        """No function or method imports a module of the package."""
        self.assertClean(local_imports(self.found))

    def test_named_modules_exist(self):
        """Every module the tables name exists, so a misspelt or removed leaf cannot leave a module unchecked."""
        modules = {module_name(path) for path in read_package(ROOT)}
        named = {p for _, importers, allowed in MAY_IMPORT for p in importers + allowed} | {p for m, i in ONLY_IMPORTED_BY for p in (m, *i)}
        missing = sorted(p for p in named if in_package(p) and "*" not in p and p not in modules)
        self.assertEqual(missing, [])

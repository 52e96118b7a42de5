"""Dependencies flow one way: engine_adapter -> kvstore, tools -> kvstore; only the disk tier
imports lmdb; the store never imports an engine or a tool. Within tools/ no module imports
itself back through others, and each CLI command is a module of its own that imports no other
command; the CLI reaches the store through one module. Library code builds no test models."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package, forbidden", [
    ("kvstore", {"engine_adapter", "tools", "transformers", "vllm", "fastapi", "uvicorn", "pydantic"}),
    ("engine_adapter", {"tools"}),
])
def test_dependencies_flow_one_way(package, forbidden):
    for f in files(package):
        bad = imports_of(f) & forbidden
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_only_the_collector_imports_prometheus_client():
    """kvstore/prometheus.py is the one mapping of the declared metrics to Prometheus, shared by
    tools/exporter.py and the engine adapter's server; nothing else in kvstore imports it."""
    users = [f.relative_to(ROOT).as_posix() for f in files("kvstore") if "prometheus_client" in imports_of(f)]
    assert users == ["kvstore/prometheus.py"]
    for f in files("kvstore"):
        if f.name != "prometheus.py":
            assert "kvstore.prometheus" not in first_party_imports(f), f.relative_to(ROOT)


def test_the_http_stack_stays_in_the_server():
    """engine_adapter/server.py is the HTTP side (FastAPI, uvicorn); request schemas are
    api_schemas.py's (pydantic); the engine-side modules know nothing of HTTP."""
    for f in files("engine_adapter"):
        used = imports_of(f)
        if f.name != "server.py":
            assert not used & {"fastapi", "starlette", "uvicorn"}, f"{f.relative_to(ROOT)} imports {used}"
        if f.name not in ("server.py", "api_schemas.py"):
            assert "pydantic" not in used, f.relative_to(ROOT)


def test_only_the_disk_tier_imports_lmdb():
    users = [f.relative_to(ROOT).as_posix() for f in files("kvstore") if "lmdb" in imports_of(f)]
    assert users == ["kvstore/tiers/disk/env.py"]


def test_only_the_remote_tier_imports_the_redis_client():
    users = [f.relative_to(ROOT).as_posix() for f in files("kvstore") if "redis" in imports_of(f)]
    assert sorted(users) == ["kvstore/tiers/remote.py", "kvstore/tiers/resp.py"]  # resp: its wire


def test_no_utils_modules():
    for package in ("kvstore", "engine_adapter", "tools"):
        assert not [f for f in files(package) if f.stem in ("utils", "helpers", "misc")]


# -- the module graph -------------------------------------------------------------------------
def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The modules of this repository that ``path`` imports (relative imports resolved; for
    ``from P import x`` both P and P.x when P.x is a module here)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m in MODULES}


MODULES = {module_name(f) for pkg in ("kvstore", "engine_adapter", "tools") for f in files(pkg)}


def import_graph(package: str) -> dict[str, set[str]]:
    return {module_name(f): first_party_imports(f) & {module_name(g) for g in files(package)}
            for f in files(package)}


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that ends where it starts), or None. A package's __init__
    that imports its own submodules is not a cycle: importing a submodule runs the package's
    __init__ first, so an edge from a submodule up to its package is left out."""
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d] if d in path else [m, d]
            if d not in state and (found := visit(d, path + [d])):
                return found
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_no_import_cycle_among_tools_modules():
    cycle = cycle_in(import_graph("tools"))
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle():
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"p": {"p.x"}, "p.x": {"p"}}) is None  # a package and its submodule


CLI = ROOT / "tools" / "cli"


def command_modules() -> list[Path]:
    """The CLI's command modules: those defining NAME and run()."""
    out = []
    for f in sorted(CLI.glob("*.py")):
        top = ast.parse(f.read_text()).body
        names = {t.id for n in top if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        funcs = {n.name for n in top if isinstance(n, ast.FunctionDef)}
        if "NAME" in names and {"run", "add_parser"} <= funcs:
            out.append(f)
    return out


def test_each_cli_command_is_a_module_that_imports_no_other_command():
    commands = {module_name(f) for f in command_modules()}
    assert len(commands) >= 7, commands  # stats, ls, inspect, purge, verify, explain, serve-metrics
    from tools.cli.parser import COMMANDS
    assert {m.__name__ for m in COMMANDS.values()} == commands
    for f in command_modules():
        others = first_party_imports(f) & (commands - {module_name(f)})
        assert not others, f"{f.relative_to(ROOT)} imports the command module(s) {others}"


def test_the_cli_reaches_the_store_through_one_module():
    """Only tools/cli/reading.py opens a store or touches a tier (``.disk``), so that switching
    the commands to a read-only reader is one module's change."""
    for f in sorted(CLI.glob("*.py")):
        if f.name == "reading.py":
            continue
        tree = ast.parse(f.read_text())
        tiers = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "disk"]
        opens = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "kvstore"
                 and any(a.name in ("KVStore", "StoreConfig") for a in n.names)]
        assert not tiers and not opens, f"{f.relative_to(ROOT)}: store access at lines {tiers + opens}"


def test_cli_modules_import_heavy_libraries_only_where_needed():
    """torch, transformers and prometheus_client are imported inside the command that needs
    them, never when the command line is built."""
    heavy = {"torch", "transformers", "prometheus_client", "vllm"}
    for f in sorted(CLI.glob("*.py")) + [ROOT / "tools" / "explain.py"]:
        top = set()
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.Import):
                top.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top.add(node.module.split(".")[0])
        assert not top & heavy, f"{f.relative_to(ROOT)} imports {top & heavy} at module level"


@pytest.mark.parametrize("package, allowed", [
    ("kvstore", {"kvstore"}),
    ("engine_adapter", {"engine_adapter", "kvstore"}),
])
def test_first_party_dependencies(package, allowed):
    for f in files(package):
        bad = {m.split(".")[0] for m in first_party_imports(f)} - allowed
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_tools_use_engine_adapters_only_in_benchmarks_and_demos():
    """tools -> kvstore; a benchmark or a demo runs a real engine, so it may import the adapters."""
    for f in files("tools"):
        if {m.split(".")[0] for m in first_party_imports(f)} & {"engine_adapter"}:
            assert f.stem.startswith(("bench", "demo")), f"{f.relative_to(ROOT)} imports engine_adapter"


def test_the_model_modules_each_do_one_job():
    """model_files, kv_blocks and generation import none of each other, and nothing here
    imports the old all-in-one hf_model (kept for outside code)."""
    jobs = {"engine_adapter.model_files", "engine_adapter.kv_blocks", "engine_adapter.generation"}
    for m in jobs:
        path = ROOT / (m.replace(".", "/") + ".py")
        assert not first_party_imports(path) & (jobs - {m}), m
    for pkg in ("kvstore", "engine_adapter", "tools", "tests"):
        for f in files(pkg):
            if f.name != "hf_model.py":
                assert "engine_adapter.hf_model" not in first_party_imports(f), f.relative_to(ROOT)


def test_library_code_builds_no_test_models():
    """Tiny random models for tests are built in tests/ fixtures, not in the packages."""
    builders = {"LlamaConfig", "LlamaForCausalLM"}
    for pkg in ("kvstore", "engine_adapter", "tools"):
        for f in files(pkg):
            names = {a.name for n in ast.walk(ast.parse(f.read_text()))
                     if isinstance(n, ast.ImportFrom) for a in n.names}
            assert not names & builders, f"{f.relative_to(ROOT)} imports {names & builders}"


def test_the_store_names_no_concrete_tier():
    """store.py loops over Tier objects: it imports only the tier protocol, and no tier name."""
    src = (ROOT / "kvstore" / "store.py").read_text()
    tree = ast.parse(src)
    tier_imports = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and n.module and n.module.startswith("tiers")]
    assert tier_imports == ["tiers.base"]
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not names & {"disk", "host", "device"}, "store.py names a tier"


def test_the_vllm_connector_modules_depend_one_way():
    """vllm_connector.py (vLLM's API: scheduler side and glue) uses vllm_transfer.py (threads,
    staging and copies: no vLLM import, so it is the same code on any engine's paged cache) and
    vllm_stats.py (vLLM's stats classes: no store); nothing else in the adapter imports vLLM or
    these modules."""
    ea = ROOT / "engine_adapter"
    transfer, stats = ea / "vllm_transfer.py", ea / "vllm_stats.py"
    assert "vllm" not in imports_of(transfer)
    assert not {m for m in first_party_imports(transfer) if m.startswith("engine_adapter")}
    assert not first_party_imports(stats)
    for f in files("engine_adapter"):
        if not f.name.startswith("vllm_"):
            assert "vllm" not in imports_of(f), f.relative_to(ROOT)
        if f.name != "vllm_connector.py":
            assert not first_party_imports(f) & {"engine_adapter.vllm_transfer",
                                                 "engine_adapter.vllm_stats"}, f.relative_to(ROOT)


@pytest.mark.parametrize("bench", ["bench_datapath.py", "bench_trace.py"])
def test_the_data_path_benchmarks_measure_through_the_public_api_only(bench):
    """tools/bench_datapath.py and bench_trace.py time what a user gets: KVStore and its
    config, no tier class."""
    mods = first_party_imports(ROOT / "tools" / bench)
    assert {m for m in mods if m.startswith("kvstore")} <= {"kvstore", "kvstore.codec"}, mods

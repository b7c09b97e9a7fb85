"""Run a function on N local ranks, or once per rank inside an existing torchrun world.

``LocalWorld`` forks N long-lived worker processes that join one process group
(gloo on CPU, NCCL on GPU) and then run any number of functions; the test suite
shares worlds between tests because starting ranks is the slow part on 2 cores.
A rank that raises does not hang the others: its traceback comes back, the
world waits a short grace period for the rest and is then killed.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import RankError, WorldTimeoutError

DEFAULT_TIMEOUT_S = float(os.environ.get("PTDP_TIMEOUT", "300"))
ERROR_GRACE_S = 3.0


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank, world_size, store_path, conn, backend, timeout_s):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      PTDP_LOCAL_WORLD="1")
    # N ranks share few cores: intra-op threads would only oversubscribe them
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    status = 0
    try:
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        while True:
            msg = conn.recv_bytes()
            if msg == b"STOP":
                break
            try:
                fn, args, kwargs = pickle.loads(msg)
                reply = ("ok", fn(*args, **kwargs))
            except BaseException as e:  # the parent re-raises it, naming this rank
                try:
                    pickle.dumps(e)
                    exc = e
                except Exception:
                    exc = None
                reply = ("err", f"{type(e).__name__}: {e}", traceback.format_exc(), exc)
            try:
                conn.send_bytes(_dumps(reply))
            except Exception as e:
                conn.send_bytes(_dumps(("err", f"could not send the result back: {e!r}",
                                        traceback.format_exc(), None)))
    except (EOFError, KeyboardInterrupt):
        status = 1
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
        os._exit(status)


class LocalWorld:
    """N local ranks in one process group, reusable for many ``run`` calls."""

    def __init__(self, world_size: int, backend: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.world_size = world_size
        self.backend = backend or _default_backend()
        # fork costs 0.2 s for 8 ranks, spawn ~9 s; CUDA cannot survive a fork
        ctx = mp.get_context("spawn" if self.backend == "nccl" else "fork")
        fd, self._store = tempfile.mkstemp(prefix="ptdp_store_")
        os.close(fd)
        os.unlink(self._store)
        self._conns, self._procs = [], []
        for r in range(world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(r, world_size, self._store, child,
                                                  self.backend, timeout_s), daemon=True)
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)
        self.alive = True

    def run(self, fn, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the ranks' results in rank order."""
        if not self.alive:
            raise RuntimeError("this LocalWorld was closed")
        msg = pickle.dumps((fn, args, kwargs))
        for c in self._conns:
            c.send_bytes(msg)
        results, pending = [None] * self.world_size, set(range(self.world_size))
        first_error = None
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            waitables = {self._conns[r]: r for r in pending}
            waitables.update({self._procs[r].sentinel: r for r in pending})
            for obj in mp.connection.wait(list(waitables), timeout=left):
                r = waitables[obj]
                if r not in pending:
                    continue
                reply = None
                if obj is self._conns[r] and self._conns[r].poll():
                    try:
                        reply = _loads(self._conns[r].recv_bytes())
                    except (EOFError, OSError):   # the rank died: its pipe closed
                        self._procs[r].join(1.0)
                if reply is not None:
                    pass
                elif not self._procs[r].is_alive():
                    reply = ("err", f"rank {r} process died (exit code {self._procs[r].exitcode})",
                             "", None)
                else:
                    continue
                pending.discard(r)
                if reply[0] == "ok":
                    results[r] = reply[1]
                elif first_error is None:
                    first_error = RankError(r, reply[1], reply[2])
                    if reply[3] is not None:
                        first_error.__cause__ = reply[3]
                    # the others may be blocked in a collective with the failed rank
                    deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
        if pending:
            self.close(force=True)
            if first_error is not None:
                raise first_error
            raise WorldTimeoutError(
                f"ranks {sorted(pending)} of a {self.world_size}-rank world did not finish "
                f"{getattr(fn, '__name__', fn)} within {timeout:.0f} s (a hang); the world was killed")
        if first_error is not None:
            raise first_error
        return results

    def close(self, force: bool = False):
        if not self.alive:
            return
        self.alive = False
        if not force:
            for c in self._conns:
                try:
                    c.send_bytes(b"STOP")
                except Exception:
                    pass
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for c in self._conns:
            c.close()
        if os.path.exists(self._store):
            os.unlink(self._store)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(force=exc[0] is not None)


def in_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
        and "PTDP_LOCAL_WORLD" not in os.environ)


TOKEN_KEY = "ptdp/process_group_token"


def init_torchrun_world(backend: str, timeout: float):
    """Join the torchrun world, in a store namespace no earlier worker group has used.

    torchrun's agent hosts one TCPStore for the whole job (``TORCHELASTIC_USE_AGENT_STORE``)
    and, in torch 2.13, keeps it across ``--max-restarts`` restarts; the default env://
    init writes its keys (gloo's listening addresses, ``default_pg/0//cpu//0/<rank>``)
    under the same names in every attempt. A restarted rank that reads its peer's key
    before the peer rewrites it gets the dead worker's address and hangs connecting to
    it (pytorch/pytorch#135712). ``TORCHELASTIC_RESTART_COUNT`` cannot name the attempt:
    each node's agent counts only its own failures. So rank 0 draws a fresh token, the
    others wait for it, the group is built under ``ptdp/<token>/``, and once every rank
    has joined, rank 0 deletes the token: the next worker group finds no token until its
    own rank 0 writes one.
    """
    to = timedelta(seconds=timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        # rank 0 hosts a new store in every attempt: nothing stale can be read
        dist.init_process_group(backend, timeout=to)
        return
    import uuid
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          world_size, is_master=False, timeout=to)
    if rank == 0:
        store.set(TOKEN_KEY, uuid.uuid4().hex)
    store.wait([TOKEN_KEY], to)
    token = store.get(TOKEN_KEY).decode()
    dist.init_process_group(backend, store=dist.PrefixStore(f"ptdp/{token}/", store),
                            rank=rank, world_size=world_size, timeout=to)
    dist.barrier()  # every rank has read the token
    if rank == 0:
        store.delete_key(TOKEN_KEY)


def launch(fn, *args, world_size: int, timeout: float = DEFAULT_TIMEOUT_S,
           backend: str | None = None, **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks and return their results.

    Under torchrun (or any world already initialised) it runs ``fn`` on this rank
    and all-gathers the results, so the return value is the same list either way.
    A rank's exception is re-raised in the caller as ``RankError`` naming the rank.
    """
    if dist.is_initialized() or in_torchrun():
        if not dist.is_initialized():
            init_torchrun_world(backend or _default_backend(), timeout)
        if dist.get_world_size() != world_size:
            from ..errors import WorldSizeError
            raise WorldSizeError(f"launch(world_size={world_size}) inside a world of "
                                 f"{dist.get_world_size()} ranks; pass the torchrun world size")
        result = fn(*args, **kwargs)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, result)
        return gathered
    with LocalWorld(world_size, backend=backend, timeout_s=timeout) as world:
        return world.run(fn, *args, timeout=timeout, **kwargs)

"""Multi-process / multi-node GEN-CNP training and evaluation on ``torch.distributed`` (launched with ``torchrun``).

Nothing changes for a single process: every function here is a no-op (or the identity) unless the process was
started by ``torchrun`` with ``WORLD_SIZE > 1``. Under ``torchrun`` the CLI calls :func:`init_distributed` (backend
``nccl`` when CUDA is available, each process on ``cuda:LOCAL_RANK``; ``gloo`` on CPU) and then:

**Training** (:func:`gencnp_fast.generator.train_gencnp`). The single-process batch order is kept: in epoch ``e``
the permutation ``randperm(N, generator seeded (seed·1000003 + e))`` is cut into *global* batches of
``batch_size``; global batch ``b`` is split into ``world_size`` contiguous slices (``torch.tensor_split``: sizes
differ by at most one, equal when ``world_size`` divides the batch) and rank ``r`` takes slice ``r``
(``_Trainer._steps`` in :mod:`gencnp_fast.generator.train`). Every rank computes the same permutation, so no
sampler state is exchanged, and reads only the images of its own slices. The generator is wrapped in
``DistributedDataParallel`` (:func:`wrap_generator`; the frozen target is not: it has no trainable
parameters; the generator has no batch norm, only LayerNorm, so no SyncBatchNorm is needed). Every rank runs the
one training loss, :func:`gencnp_fast.generator.gencnp_loss`, on its slice; it equals the single-process loss of
the global batch:

* per-sample terms (KD faithfulness, mask density, PDN head distillation) are means over the local slice, weighted
  by ``n_r · world_size / n_global`` so that DDP's gradient average is the global-batch mean also for uneven slices;
* the batch-coupled class terms (supervised-contrastive on the codes and on the masks) are computed on the *whole*
  global batch on every rank, from rows all-gathered with ``torch.distributed.nn.functional.all_gather``
  (:func:`gather_batch`, whose backward sums the gradients of all ranks; with DDP's average this is exactly the
  single-process gradient).

No sample is dropped or padded: a global batch of fewer than 2 samples is skipped, as in one process; a rank whose
slice is empty (a last batch smaller than the world size) runs its forward on a placeholder row with weight 0 and
contributes no gathered rows. The parameters after ``k`` steps therefore equal those of one process with the same
``batch_size`` up to floating-point reassociation. Rank 0 writes ``checkpoint.pt`` / ``generator.pt`` and logs;
checkpoints hold no world-size-dependent state (the position is the global step), so a run resumes with any
world size, from an epoch-end or a mid-epoch (``checkpoint_every``) checkpoint.

**Evaluation** (:func:`gencnp_fast.stream.explain_set`, which ``explain``, ``evaluate`` and validation use). The
test set is cut into the same batches of ``batch_size`` as in one process and whole batches are assigned to ranks
(contiguous blocks, :func:`batch_shard`); each rank reads only its own images, so every sample's logits and pathway
are computed in exactly the batch they would be in one process. mDC / mIC / fidelity and the accuracy come from
float64 sums all-reduced over ranks (:func:`~gencnp_fast.evaluation.metrics.confidence_sums`); the per-sample rows
(packed pathways, labels, predictions) are all-gathered in one process's order, so density, acIOU and inter-class
IoU are computed from exactly the rows one process would have. Rank 0 runs the evaluation hooks and writes
``metrics.json`` / ``pathways.pt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "DistEnv",
    "env_from_torchrun",
    "init_distributed",
    "shutdown",
    "abort",
    "peer_failure",
    "lost_peer",
    "maybe_distributed",
    "per_rank",
    "is_active",
    "rank",
    "world_size",
    "is_main",
    "device",
    "barrier",
    "broadcast_object",
    "load_on_main",
    "shard_sizes",
    "shard_slice",
    "batch_shard",
    "wrap_generator",
    "all_reduce_sum",
    "gather_rows",
    "gather_batch",
]


@dataclasses.dataclass
class DistEnv:
    """What ``torchrun`` told this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_STATE = {"device": torch.device("cpu"), "group": None, "owned": False}


def _env_int(e, name: str, default: int) -> int:
    raw = e.get(name)
    if raw is None or str(raw).strip() == "":
        return default
    try:
        return int(str(raw).strip())
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (torchrun sets RANK, WORLD_SIZE "
                         f"and LOCAL_RANK; unset them to run as one process)") from None


def env_from_torchrun(environ=None) -> DistEnv:
    """Rank, world size and local rank from ``torchrun``'s environment (defaults: one process); a one-line
    ``ValueError`` for values that are not integers or out of range."""
    e = os.environ if environ is None else environ
    env = DistEnv(_env_int(e, "RANK", 0), _env_int(e, "WORLD_SIZE", 1), _env_int(e, "LOCAL_RANK", 0))
    if env.world_size < 1:
        raise ValueError(f"environment variable WORLD_SIZE={env.world_size} must be >= 1")
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"environment variable RANK={env.rank} is out of range for WORLD_SIZE={env.world_size} "
                         f"(0 <= RANK < WORLD_SIZE)")
    if env.local_rank < 0:
        raise ValueError(f"environment variable LOCAL_RANK={env.local_rank} must be >= 0")
    return env


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group of a ``torchrun`` launch (no-op for one process). ``backend``: ``nccl`` when CUDA is
    available (this process uses ``cuda:LOCAL_RANK``), else ``gloo``. Rendezvous: ``env://`` (torchrun's
    ``MASTER_ADDR`` / ``MASTER_PORT``)."""
    env = env_from_torchrun()
    if not env.distributed:
        return env
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
        _STATE["device"] = torch.device("cuda", env.local_rank)
    else:
        _STATE["device"] = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        _STATE["owned"] = True
    # a second group for the loss's all-gathers, so that they never interleave with DDP's gradient all-reduces
    _STATE["group"] = dist.new_group(backend=backend)
    _start_abort_watch(env.rank)
    return env


def shutdown() -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    _stop_abort_watch()
    if _STATE["owned"] and dist.is_initialized():
        dist.destroy_process_group()
    _STATE.update(group=None, owned=False, device=torch.device("cpu"))


# Failing together -------------------------------------------------------------------------------------------------
# A rank that fails calls abort(): it writes its error under one key of torchrun's agent store (MASTER_ADDR:
# MASTER_PORT, hosted by the agent, so it outlives the workers) and ends its process at once. Every rank runs a
# watcher thread that polls that key every ABORT_POLL_S seconds and ends its own process (status 1) when it appears.
# So one failing rank stops all of them within seconds, whatever the backend (NCCL included), whether they wait in a
# collective or compute, instead of after the collective timeout. (torchrun also stops a node's other workers when
# one exits with an error; the store reaches the other nodes too. With gloo a peer's exit also breaks at once the
# collectives the others wait in: the CLI turns that error into one line too.)
ABORT_POLL_S = 1.0
_ABORT: Dict[str, object] = {"watch": None, "post": None, "key": None, "stop": None, "thread": None}


def _abort_key() -> str:
    return "gencnp_fast/abort/{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", "-"),
                                            os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _store_client():
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=30), wait_for_workers=False)


def _start_abort_watch(rank: int) -> None:
    """Connect two store clients (the watcher's and :func:`abort`'s) and start the watcher thread. Only where the
    store outlives every worker: torchrun's agent store (``TORCHELASTIC_USE_AGENT_STORE=True``). Without it the
    store lives in rank 0, and rank 0's failure would take the store with it; a peer's exit still breaks the
    collectives the others wait in (gloo at once)."""
    import threading

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    try:
        watch, post = _store_client(), _store_client()
    except Exception:
        return
    key, stop = _abort_key(), threading.Event()

    def run() -> None:
        while not stop.wait(ABORT_POLL_S):
            try:
                if not watch.check([key]):
                    continue
                why = watch.get(key).decode("utf-8", "replace")
            except Exception:  # the store is gone: the job is ending
                return
            if stop.is_set():
                return
            import sys

            print(f"gencnp: error (rank {rank}): stopping because another process failed: {why}", file=sys.stderr,
                  flush=True)
            os._exit(1)

    thread = threading.Thread(target=run, name="gencnp-abort-watch", daemon=True)
    _ABORT.update(watch=watch, post=post, key=key, stop=stop, thread=thread)
    thread.start()


def _stop_abort_watch() -> None:
    if _ABORT["stop"] is not None:
        _ABORT["stop"].set()
    _ABORT.update(watch=None, post=None, stop=None, thread=None)


def peer_failure() -> Optional[str]:
    """The error another rank posted with :func:`abort` (``None`` if none did, or the store is gone)."""
    post = _ABORT["post"]
    if post is None:
        return None
    try:
        return post.get(_ABORT["key"]).decode("utf-8", "replace") if post.check([_ABORT["key"]]) else None
    except Exception:
        return None


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` says a collective lost another process (it exited or was killed)."""
    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def abort(message: str, status: int = 2) -> None:
    """End this process now with ``status`` (after flushing stdout/stderr) and, under ``torchrun``, make every
    other rank stop within seconds (see above). The caller prints its own error first."""
    import sys

    if _ABORT["stop"] is not None:
        _ABORT["stop"].set()  # this rank's own watcher must not report its own failure
    post = _ABORT["post"]
    if post is not None:
        try:
            post.set(_ABORT["key"], f"rank {rank()}: {message}"[:2000])
        except Exception:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


@contextlib.contextmanager
def maybe_distributed(backend: Optional[str] = None):
    """``with maybe_distributed(): ...``: init under ``torchrun`` (WORLD_SIZE > 1), shut down after."""
    env = init_distributed(backend)
    try:
        yield env
    finally:
        if env.distributed:
            shutdown()


def is_active() -> bool:
    """A process group with more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and logs."""
    return rank() == 0


def device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` under NCCL, else CPU."""
    return _STATE["device"] if is_active() else torch.device("cpu")


def barrier() -> None:
    if is_active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if not is_active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def load_on_main(path: str, what: str = "file"):
    """:func:`gencnp_fast.io.safe_load` (``weights_only=True``) of ``path`` on rank 0, sent to every rank (no
    shared file system needed); a load error is raised on every rank."""
    from .io import safe_load

    res, err = None, None
    if is_main():
        try:
            res = safe_load(path, what)
        except Exception as exc:  # re-raised on every rank below
            err = exc
    res, err = broadcast_object((res, err))
    if err is not None:
        raise err
    return res


# Sharding --------------------------------------------------------------------------------------------------------
def shard_sizes(n: int, world: int) -> List[int]:
    """Sizes of ``torch.tensor_split(range(n), world)``: ``n // world`` each, the first ``n % world`` one more."""
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


def shard_slice(n: int, world: int, r: int) -> slice:
    """Rank ``r``'s contiguous slice of ``n`` items (see :func:`shard_sizes`)."""
    sizes = shard_sizes(n, world)
    start = sum(sizes[:r])
    return slice(start, start + sizes[r])


def batch_shard(n: int, batch_size: int, world: int, r: int) -> List[Tuple[int, int]]:
    """Rank ``r``'s evaluation batches ``[(start, stop)]``: the batches ``[i, i + batch_size)`` of one process,
    whole batches dealt out to ranks in contiguous blocks."""
    starts = list(range(0, n, batch_size))
    return [(i, min(i + batch_size, n)) for i in starts[shard_slice(len(starts), world, r)]]


# Collectives -----------------------------------------------------------------------------------------------------
def wrap_generator(gen: nn.Module):
    """What :func:`~gencnp_fast.generator.gencnp_loss` calls the generator through: ``gen.from_features(features,
    logits, mode)`` for one process; under ``torchrun`` the generator in ``DistributedDataParallel`` (on this rank's
    device) with that forward. The frozen target moves to the device but is not wrapped."""
    if not is_active():
        return gen.from_features
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = device()
    gen.to(dev)
    gen.target.to(dev)
    module = _FromFeatures(gen)
    return DDP(module, device_ids=[dev.index] if dev.type == "cuda" else None)


class _FromFeatures(nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.gen = gen

    def forward(self, features, logits, mode):
        return self.gen.from_features(features, logits, mode)


def all_reduce_sum(values: Sequence[float]) -> List[float]:
    """Element-wise float64 sum over ranks."""
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    if is_active():
        dist.all_reduce(t)
    return t.cpu().tolist()


def per_rank(value: float) -> List[float]:
    """``value`` of every rank, in rank order (``[value]`` for one process)."""
    t = torch.zeros(world_size(), dtype=torch.float64, device=_comm_device())
    t[rank()] = float(value)
    if is_active():
        dist.all_reduce(t)
    return t.cpu().tolist()


def _comm_device() -> torch.device:
    return device() if is_active() and dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(t: torch.Tensor, sizes: Sequence[int], autograd: bool = False, group=None) -> torch.Tensor:
    """The rows of every rank concatenated in rank order; rank ``r`` holds ``sizes[r]`` valid rows (its first
    ``sizes[r]`` rows; more may be there, ignored). Rows are padded to equal size for the gather. ``autograd``:
    differentiable (the backward sums every rank's gradient into the rows of their owner)."""
    if not is_active():
        return t[:sizes[0]]
    m = max(max(sizes), 1)
    local = t[:sizes[rank()]]
    if local.shape[0] < m:
        local = torch.cat([local, local.new_zeros((m - local.shape[0],) + tuple(t.shape[1:]))])
    if autograd:
        import warnings

        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # deprecated in favour of a functional collective without this backward
            warnings.simplefilter("ignore", FutureWarning)
            parts = all_gather(local, group=group if group is not None else dist.group.WORLD)
    else:
        dtype = local.dtype
        if dtype == torch.bool:
            local = local.to(torch.uint8)
        local = local.to(_comm_device()).contiguous()
        parts = [torch.empty_like(local) for _ in sizes]
        dist.all_gather(parts, local, group=group)
        parts = [p.to(t.device).to(dtype) for p in parts]
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


# Training ----------------------------------------------------------------------------------------------------------
def gather_batch(t: torch.Tensor, sizes: Sequence[int], autograd: bool = False) -> torch.Tensor:
    """The global batch's rows of ``t`` (each rank holding ``sizes[rank]``), in rank order: :func:`gather_rows` on
    the loss's own process group, so that these gathers never interleave with DDP's gradient all-reduces. ``t``'s
    rows for one process."""
    return gather_rows(t, sizes, autograd=autograd, group=_STATE["group"])

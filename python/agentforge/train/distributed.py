"""Process-group helpers. Under `torchrun` (env ``WORLD_SIZE`` > 1) the trainer joins the group
itself, so the same script runs on one process or many with no code change. Without torchrun
every helper answers as rank 0 of a world of one."""

import os

import torch
import torch.distributed as dist


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of training processes (1 without torchrun)."""
    return dist.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 without torchrun)."""
    return dist.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine: the index of its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the one process that writes checkpoints, metrics and W&B."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its own GPU when CUDA is available, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def choose_device(kind: str) -> None:
    """``--device``: ``cpu`` hides the GPUs from torch (before CUDA starts), ``cuda`` requires one,
    ``auto`` takes the GPU when torch sees one."""
    from agentforge.errors import ConfigError

    if kind == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif kind == "cuda" and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"--device cuda: torch {torch.__version__} ({built}) sees no GPU; use --device cpu or install a CUDA torch"
        )
    elif kind not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: expected auto, cpu or cuda, got {kind!r}")


def maybe_init() -> bool:
    """Join the process group when launched by torchrun with more than one process (NCCL on CUDA,
    gloo on CPU) unless already joined. Returns whether a process group is active."""
    if not _initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            dist.init_process_group("nccl", device_id=device())
        else:
            dist.init_process_group("gloo")
    return _initialized()


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if _initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (no-op on one process)."""
    if _initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not (_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 only; every rank returns its result or raises its error, so
    no rank waits forever for a rank that failed. On the other ranks the error is re-raised as the
    same class when it is one of agentforge's one-line errors (``agentforge.errors``), else as a
    ``RuntimeError`` naming the original."""
    from agentforge import errors

    outcome, error = None, None
    if is_main():
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except Exception as e:
            outcome, error = ("error", (type(e).__name__, str(e))), e
    status, value = broadcast_from_main(outcome)
    if error is not None:
        raise error
    if status == "error":
        name, message = value
        raise (
            getattr(errors, name, None)(message)
            if hasattr(errors, name)
            else RuntimeError(f"rank 0 failed: {name}: {message}")
        )
    return value


def all_gather(obj) -> list:
    """Every rank's ``obj`` in rank order, on every rank (picklable objects)."""
    if not (_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def shutdown() -> None:
    """Leave the process group (call once at the end of a torchrun script)."""
    if _initialized():
        dist.destroy_process_group()

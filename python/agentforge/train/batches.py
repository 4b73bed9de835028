"""Which rows each step trains on, as a pure function of the step number: that is what makes
resume exact. The global row stream is the concatenation of one seeded permutation per epoch;
global batch ``i`` is the next ``batch_size`` entries of that stream, rank ``r`` takes its
contiguous share, and the share is cut into micro-batches for gradient accumulation."""

import functools

import torch

REQUIRED_COLUMNS = ("input_ids", "labels")


@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def epoch_permutation(n_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The row order of ``epoch``."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return tuple(torch.randperm(n_rows, generator=generator).tolist())


def global_batch(index: int, n_rows: int, batch_size: int, seed: int) -> list[int]:
    """Row indices of global batch ``index`` (0-based), continuing into the next epoch as needed."""
    start = index * batch_size
    rows = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, n_rows)
        rows.append(epoch_permutation(n_rows, seed, epoch)[offset])
    return rows


def rank_share(rows: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous slice of a global batch (its length divides evenly)."""
    per_rank = len(rows) // world_size
    return rows[rank * per_rank : (rank + 1) * per_rank]


def micro_batches(rows: list[int], micro_batch_size: int) -> list[list[int]]:
    """Consecutive chunks of ``micro_batch_size`` rows."""
    return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


def check_dataset(data) -> None:
    """Fail early, in one line, on data the trainer cannot use."""
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(
            f"train: data must be a datasets.Dataset or an indexable of dict rows, got {type(data).__name__}"
        )
    if len(data) == 0:
        raise ValueError("train: data is empty")
    first = data[0]
    if not isinstance(first, dict):
        raise TypeError(f"train: data rows must be dicts, got {type(first).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in first]
    if missing:
        raise ValueError(f"train: data lacks column(s) {missing}; it has {sorted(first)}")


def _columns(data, rows: list[int]) -> dict:
    if hasattr(data, "column_names"):  # datasets.Dataset: one columnar read is much faster than per row
        return data[rows]
    records = [data[i] for i in rows]
    return {key: [record[key] for record in records] for key in records[0]}


def _as_tensor(name: str, values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values
    if values and isinstance(values[0], torch.Tensor):
        return torch.stack(values)
    try:
        return torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"train: column {name!r} is not a fixed-length numeric column ({e}); "
            f"remove it from the training data (e.g. dataset.remove_columns([{name!r}]))"
        ) from None


def collate(data, rows: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """The given rows as one tensor per column, on ``device``."""
    return {
        name: _as_tensor(name, values).to(device, non_blocking=True) for name, values in _columns(data, rows).items()
    }

"""Target-argmax counts: at every position SpecForge trains on, the id the target itself predicts.

SpecForge's EAGLE-3 loss keeps a position only when the target's argmax there is in the draft
vocabulary (docs/SPECFORGE.md section 7). The teacher of position t is
``argmax_v bf16(W[v] . h[t + 1])``: W the target's LM head [V, H] in bfloat16, h the stored
final hidden state, the product accumulated in fp32 and rounded to bfloat16, ties to the lowest
id. :class:`TargetArgmax` computes it for blocks of hidden states, exactly and in bounded memory:

1. **fast pass**: fp32 logits (exact products of bfloat16 operands, fp32 sums; TF32 and other
   reduced-precision matmul modes are switched off) over tiles of the vocabulary, keeping each
   position's ``keep`` largest values; memory is ``positions x tile``, never ``positions x V``;
2. **bound**: an fp32 sum of H products is off by at most ``H * 2**-24 * sum|w_i h_i|`` (doubled
   here for safety), and ``sum|w_i h_i| <= |W[v]| |h|``. Every id whose rounded logit can tie or beat
   the fast winner's lies within ``2 * error + 2 * bf16 spacing`` of the fast maximum;
3. **exact pass**: those candidates' dot products are recomputed in float64 (the products of
   bfloat16 numbers are exact there, and so is their sum unless they span more than 53 bits),
   rounded to bfloat16 (round half to even) and compared: highest value, lowest id on ties. A
   position with more than ``keep`` candidates (exact ties across many ids, e.g. an all-zero
   hidden state) is scanned again over the whole vocabulary against its threshold.

The result is therefore the same on CPU and CUDA and for any tile size: the argmax of the
correctly rounded bfloat16 logits. GPU GEMMs that accumulate in another order can round a
logit lying within fp32 error of a bfloat16 rounding boundary the other way, which moves a
near-tie; that is the only difference from a particular SpecForge run.

>>> import torch
>>> W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.bfloat16)
>>> h = torch.tensor([[2.0, 1.0], [0.0, 0.0]], dtype=torch.bfloat16)
>>> TargetArgmax(W)(h).tolist()  # ids 0 and 2 tie on the first row; all three tie on the second
[0, 0]
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, List, Optional, Tuple

import numpy as np

from specforge_vocab.errors import InputError

logger = logging.getLogger(__name__)


FP32_UNIT_ROUNDOFF = 2.0**-24


# Hidden states per block: the fast pass reads all of W once per block (on CPU it converts each tile of
# W to fp32 on the fly), so bigger blocks amortise that; memory is block x VOCAB_TILE x 4 bytes.
DEFAULT_BLOCK = 2048


DEFAULT_VOCAB_TILE = 8192


DEFAULT_KEEP = 32


# Candidate pairs recomputed in float64 per chunk (pairs x H x 8 bytes each for the two gathered operands).
EXACT_CHUNK_ELEMENTS = 1 << 22


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """Float64 values rounded to the nearest bfloat16 (ties to even), returned as float64.

    Rounds once, from float64: torch's float64 -> bfloat16 cast goes through float32 (two roundings).

    >>> round_to_bf16(np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-30])).tolist()
    [1.0, 1.015625, 1.0078125]
    """
    x = np.asarray(values, dtype=np.float64)
    _, exponent = np.frexp(x)
    quantum = np.maximum(exponent - 8, -133)  # 8 significant bits; bfloat16's smallest subnormal is 2**-133
    return np.ldexp(np.rint(np.ldexp(x, -quantum)), quantum)


def bf16_spacing(magnitude):
    """The gap between adjacent bfloat16 numbers at ``magnitude`` (a float64 torch tensor, >= 0)."""
    import torch

    _, exponent = torch.frexp(magnitude)
    return torch.exp2(torch.clamp(exponent.to(torch.float64) - 8.0, min=-133.0))


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cpu' and 'cuda' as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def best_per_position(
    positions: np.ndarray, ids: np.ndarray, values: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each position present: (position, id with the highest value, that value); lowest id on ties.

    >>> best_per_position(np.array([0, 0, 1]), np.array([5, 3, 9]), np.array([1.0, 1.0, 0.0]))[1].tolist()
    [3, 9]
    """
    if positions.size == 0:
        return positions, ids, values
    order = np.lexsort((ids, -values, positions))
    positions, ids, values = positions[order], ids[order], values[order]
    first = np.ones(positions.size, dtype=bool)
    first[1:] = positions[1:] != positions[:-1]
    return positions[first], ids[first], values[first]


@contextlib.contextmanager
def full_precision_matmul(threads: Optional[int]) -> Iterator[None]:
    """fp32 matmuls in full IEEE precision (no TF32 / bf16 shortcuts), on ``threads`` CPU threads."""
    import torch

    precision = torch.get_float32_matmul_precision()
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    old_threads = torch.get_num_threads()
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.set_num_threads(old_threads)


class TargetArgmax:
    """``argmax_v bf16(W[v] . h)`` for blocks of hidden states h (see the module docstring).

    ``weight``: W [V, H] bfloat16 on the CPU. ``device``: "cpu" or "cuda" (W is copied there once,
    as fp32). ``vocab_tile``: rows of W per fast-pass tile. ``keep``: fast-pass values kept per position.
    """

    def __init__(self, weight, *, device: str = "cpu", vocab_tile: int = DEFAULT_VOCAB_TILE, keep: int = DEFAULT_KEEP):
        import torch

        if weight.dtype != torch.bfloat16 or weight.dim() != 2:
            raise ValueError(f"weight must be a bfloat16 matrix, but got {weight.dtype} {list(weight.shape)}")
        self.weight = weight
        self.device = torch.device(device)
        self.vocab_size, self.hidden_size = int(weight.shape[0]), int(weight.shape[1])
        self.vocab_tile = max(1, min(int(vocab_tile), self.vocab_size))
        self.keep = max(1, min(int(keep), self.vocab_size))
        norms = torch.cat([chunk.double().norm(dim=1) for chunk in weight.split(self.vocab_tile)])
        self.max_row_norm = float(norms.max()) * (1 + 1e-9)
        if self.device.type == "cpu":
            self._tile_buffer = torch.empty(self.vocab_tile, self.hidden_size, dtype=torch.float32)
            self._resident = None
        else:
            self._resident = weight.to(self.device).float()  # exact: every bfloat16 is an fp32

    # ---------------------------------------------------------------- tiles of W in fp32

    def _tiles(self) -> Iterator[Tuple[int, "torch.Tensor"]]:  # noqa: F821 - torch is imported lazily
        for start in range(0, self.vocab_size, self.vocab_tile):
            end = min(start + self.vocab_tile, self.vocab_size)
            if self._resident is not None:
                yield start, self._resident[start:end]
            else:
                yield start, self._tile_buffer[: end - start].copy_(self.weight[start:end])

    def _rows64(self, ids):
        """Rows ``ids`` of W as float64, on this device."""
        if self._resident is not None:
            return self._resident.index_select(0, ids.to(self.device)).double()
        return self.weight.index_select(0, ids.cpu()).double()

    # ---------------------------------------------------------------- the three steps

    def __call__(self, hidden) -> np.ndarray:
        """The exact argmax id (int64 numpy) for each row of ``hidden`` [n, H] (bfloat16)."""
        import torch

        n = int(hidden.shape[0])
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        with torch.no_grad():
            h32 = hidden.to(self.device).float()
            bound = self.max_row_norm * torch.linalg.vector_norm(h32, dim=1, dtype=torch.float64)  # >= sum|w_i h_i|
            error = 2.0 * self.hidden_size * FP32_UNIT_ROUNDOFF * bound
            values, ids = self._fast_top(h32, 2.0 * error + 2.0 * bf16_spacing(bound + error))
            top = values.double().max(dim=1).values
            threshold = top - 2.0 * error - 2.0 * bf16_spacing(top.abs() + error) - 1e-300
            candidate = values.double() >= threshold[:, None]
            crowded = candidate.all(dim=1) if self.keep < self.vocab_size else torch.zeros_like(candidate[:, 0])
            chosen = np.zeros(n, dtype=np.int64)
            easy = candidate & ~crowded[:, None]
            rows, cols = easy.nonzero(as_tuple=True)
            if rows.numel():
                positions, best, _ = self._exact_best(h32, rows, ids[rows, cols])
                chosen[positions] = best
            for start in range(0, n, 64):  # rare: more than `keep` ids within the bound of the maximum
                crowd = crowded[start : start + 64].nonzero(as_tuple=True)[0] + start
                if crowd.numel():
                    positions, best = self._scan(h32, crowd, threshold)
                    chosen[positions] = best
        return chosen

    def _fast_top(self, h32, loose):
        """The ``keep`` largest fp32 logits of each row and their ids, one vocabulary tile at a time. A tile
        whose largest value is more than ``loose`` (per row) below the row's maximum so far holds no candidate
        and is skipped for that row."""
        import torch

        n = h32.shape[0]
        values = torch.full((n, self.keep), float("-inf"), dtype=torch.float32, device=h32.device)
        ids = torch.zeros((n, self.keep), dtype=torch.int64, device=h32.device)
        running = torch.full((n,), float("-inf"), dtype=torch.float32, device=h32.device)
        scratch = torch.empty(n * self.vocab_tile, dtype=torch.float32, device=h32.device)  # reused: no page faults
        for start, tile in self._tiles():
            logits = torch.matmul(h32, tile.T, out=scratch[: n * tile.shape[0]].view(n, tile.shape[0]))
            tile_max = logits.amax(dim=1)
            running = torch.maximum(running, tile_max)
            rows = (tile_max.double() >= running.double() - loose).nonzero(as_tuple=True)[0]
            if not rows.numel():
                continue
            tile_values, tile_ids = torch.topk(logits.index_select(0, rows), min(self.keep, logits.shape[1]), dim=1)
            merged_values = torch.cat([values.index_select(0, rows), tile_values], 1)
            merged_ids = torch.cat([ids.index_select(0, rows), tile_ids + start], 1)
            best, at = torch.topk(merged_values, self.keep, dim=1)
            values[rows], ids[rows] = best, torch.gather(merged_ids, 1, at)
        return values, ids

    def _exact_values(self, h32, rows, ids) -> np.ndarray:
        """bf16(W[ids] . h[rows]) per pair, from float64 sums of the exact products."""
        out: List[np.ndarray] = []
        step = max(1, EXACT_CHUNK_ELEMENTS // self.hidden_size)
        for start in range(0, int(rows.numel()), step):
            r, i = rows[start : start + step], ids[start : start + step]
            exact = (h32.index_select(0, r.to(h32.device)).double() * self._rows64(i)).sum(dim=1)
            out.append(exact.cpu().numpy())
        return round_to_bf16(np.concatenate(out))

    def _exact_best(self, h32, rows, ids) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = self._exact_values(h32, rows, ids)
        return best_per_position(rows.cpu().numpy(), ids.cpu().numpy().astype(np.int64), values)

    def _scan(self, h32, crowd, threshold) -> Tuple[np.ndarray, np.ndarray]:
        """Exact argmax of the positions ``crowd`` over the whole vocabulary: every id at or above the threshold."""
        sub, limit = h32.index_select(0, crowd), threshold.index_select(0, crowd)
        best_pos = best_id = best_val = np.zeros(0)
        for start, tile in self._tiles():
            rows, cols = ((sub @ tile.T).double() >= limit[:, None]).nonzero(as_tuple=True)
            if not rows.numel():
                continue
            values = self._exact_values(h32, crowd[rows], cols + start)
            best_pos, best_id, best_val = best_per_position(
                np.concatenate([best_pos, crowd[rows].cpu().numpy()]).astype(np.int64),
                np.concatenate([best_id, (cols + start).cpu().numpy()]).astype(np.int64),
                np.concatenate([best_val, values]),
            )
        return best_pos, best_id


class ArgmaxCounter:
    """Counts the target's argmax over hidden states added file by file, computed in blocks of
    ``block`` rows (memory independent of how many positions are added)."""

    def __init__(self, engine: TargetArgmax, *, block: int = DEFAULT_BLOCK, progress=None):
        self.engine = engine
        self.block = max(1, int(block))
        self.counts = np.zeros(engine.vocab_size, dtype=np.int64)
        self.positions = 0
        self.progress = progress
        self._pending: list = []
        self._pending_rows = 0

    def add(self, hidden, *, source: str) -> None:
        """Queue ``hidden`` [n, H] bfloat16 (the teachers of one file's training positions)."""
        import torch

        if hidden.shape[1] != self.engine.hidden_size:
            raise InputError(
                f"{source}: the stored hidden states have size {hidden.shape[1]}, but the target's LM head has "
                f"hidden size {self.engine.hidden_size}. The features were captured from another model than "
                "--target-model-path; use that model's directory."
            )
        if hidden.numel() and not bool(torch.isfinite(hidden).all()):
            raise InputError(
                f"{source}: 'hidden_state' holds NaN or infinite values at positions SpecForge trains on "
                "(prepare_hidden_states.py skips such records). Remove the file or capture it again."
            )
        if hidden.shape[0]:
            self._pending.append(hidden)
            self._pending_rows += int(hidden.shape[0])
        if self._pending_rows >= self.block:
            self.flush(whole_blocks_only=True)

    def flush(self, *, whole_blocks_only: bool = False) -> None:
        """Count the queued rows (``whole_blocks_only``: leave a last partial block queued)."""
        import torch

        if not self._pending:
            return
        rows = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        done = (rows.shape[0] // self.block) * self.block if whole_blocks_only else rows.shape[0]
        for start in range(0, done, self.block):
            ids = self.engine(rows[start : min(start + self.block, done)])
            self.counts += np.bincount(ids, minlength=self.engine.vocab_size)
            self.positions += int(ids.size)
            if self.progress is not None:
                self.progress.update(int(ids.size))
        rest = rows[done:]
        self._pending = [rest.clone()] if rest.shape[0] else []
        self._pending_rows = int(rest.shape[0])

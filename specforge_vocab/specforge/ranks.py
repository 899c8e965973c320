"""Running prepare under torchrun: one gloo group of its own, rank 0 deciding and writing, every rank agreeing.

>>> run_on_rank_zero(None, lambda: 42)  # outside a distributed job the function just runs
42
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from typing import Any, Callable, Iterator

from specforge_vocab.errors import InputError

logger = logging.getLogger(__name__)


def run_on_rank_zero(session, fn: Callable[[], Any]) -> Any:
    return fn() if session is None else session.on_rank_zero(fn)


def agreed(session, fn: Callable[[], Any]) -> Any:
    return fn() if session is None else session.agree(fn)[0]


_GROUPS_STARTED = 0


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Under torchrun with no process group yet, start a gloo group whose store keys live under a
    prefix of their own, and destroy it on exit.

    A group started with plain ``env://`` leaves its keys in torchrun's store under the names the
    training script's own ``init_process_group`` uses next (in this process, or after an exec),
    and that second start then intermittently fails or hangs.
    """
    global _GROUPS_STARTED
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        yield
        return
    env = os.environ
    if (
        not dist.is_available()
        or dist.is_initialized()
        or int(env.get("WORLD_SIZE", "1") or 1) <= 1
        or not all(env.get(name) for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"))
    ):
        yield
        return

    _GROUPS_STARTED += 1
    prefix = "specforge_vocab/{}/{}/{}".format(
        env.get("TORCHELASTIC_RUN_ID", "run"), env.get("TORCHELASTIC_RESTART_COUNT", "0"), _GROUPS_STARTED
    )
    try:
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timedelta(minutes=10)))
        dist.init_process_group(
            "gloo",
            store=dist.PrefixStore(prefix, store),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=60),
        )
    except Exception as exc:
        raise InputError(
            f"torchrun's environment is set (RANK={env.get('RANK')}, WORLD_SIZE={env.get('WORLD_SIZE')}, "
            f"MASTER_ADDR={env.get('MASTER_ADDR')}, MASTER_PORT={env.get('MASTER_PORT')}), but a gloo process group "
            f"cannot be started ({type(exc).__name__}: {exc}). Every rank must run the pre-step; or unset these "
            "variables to run it in one process."
        ) from None
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()

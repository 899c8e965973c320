"""The TPE trials of the draft_vocab_size search, in memory or kept in an Optuna RDB storage.

With ``storage=None`` :func:`run_tpe_trials` is exactly the paper's search: one study
``create_study(direction="maximize", sampler=TPESampler(seed=random_state))`` running
``n_trials`` trials of ``trial.suggest_int("vocab_size", low, high, step=step)``.

With ``storage`` (an SQLAlchemy URL such as ``sqlite:///study.db``) and ``study_name``
the study lives in that database: a search that was interrupted (Ctrl-C, a crash, a
killed job) resumes where it stopped and runs only the trials still missing, and the
study can be inspected with Optuna's own tools::

    import optuna
    study = optuna.load_study(study_name="llama3-sharegpt", storage="sqlite:///study.db")
    print(study.trials_dataframe()[["number", "params_vocab_size", "value", "state"]])

A resumed study picks the same k's as an uninterrupted one with the same seed. The
trials run in an in-memory study (exactly as without storage) whose sampler is first
replayed over the trials already stored: it must suggest the stored k's, their stored
values are returned without calling the objective, so its random state ends where the
uninterrupted run had it. Each new trial is added to the stored study as soon as it
completes; a trial cut short by a crash leaves nothing behind and is simply run again.
The study records its range, step, seed and an optional fingerprint of the inputs; a
rerun with other settings is refused rather than mixed into it.

Example::

    >>> pairs = run_tpe_trials(lambda k: -abs(k - 300), low=10, high=1000, n_trials=5, random_state=0)
    >>> len(pairs), all(10 <= k <= 1000 for k, _ in pairs)
    (5, True)
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from specforge_vocab.errors import InputError, SettingsError, must, short
from specforge_vocab.fileio import DEFAULT_LOCK_TIMEOUT, file_lock

logger = logging.getLogger(__name__)


PARAM_NAME = "vocab_size"


SETTINGS_ATTR = "specforge_vocab"


class _ReplayDiverged(Exception):
    pass


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[Any]:
    import optuna

    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield optuna
    finally:
        optuna.logging.set_verbosity(previous)


def best_of(pairs: List[Tuple[int, float]]) -> Tuple[int, float]:
    """The first (k, value) with the highest value (Optuna's ``best_trial`` in memory)."""
    if not pairs:
        raise ValueError("no completed trials")
    best = pairs[0]
    for pair in pairs[1:]:
        if pair[1] > best[1]:
            best = pair
    return best


def _study_settings(low: int, high: int, step: int, random_state: int, fingerprint: Optional[str]) -> Dict[str, Any]:
    return {
        "param": PARAM_NAME,
        "low": int(low),
        "high": int(high),
        "step": int(step),
        "random_state": int(random_state),
        "fingerprint": fingerprint,
    }


def _sqlite_path(storage: str) -> Optional[str]:
    if storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///") :]
        return path if path and path != ":memory:" else None
    return None


def check_storage_settings(storage: Optional[str], study_name: Optional[str]) -> List[str]:
    """Problems with --storage / --study-name (for a settings dataclass's ``problems()``)."""
    out = []
    if storage is None:
        if study_name is not None:
            out.append(
                must(
                    "--study-name",
                    "given together with --storage",
                    study_name,
                    "Add --storage sqlite:///study.db to keep the study.",
                )
            )
        return out
    if not isinstance(storage, str) or "://" not in storage:
        out.append(must("--storage", "an SQLAlchemy database URL such as sqlite:///study.db", storage))
    if not study_name or not isinstance(study_name, str):
        out.append(
            must(
                "--study-name",
                "a name for the study kept in --storage",
                study_name,
                "A rerun with the same name resumes it.",
            )
        )
    path = _sqlite_path(storage) if isinstance(storage, str) else None
    if path is not None:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            out.append(f"--storage {storage}: the directory {parent} does not exist. Create it or choose another path.")
    return out


def _load_study(optuna, storage: str, study_name: str, sampler, settings: Dict[str, Any]):
    try:
        study = optuna.create_study(
            storage=storage, study_name=study_name, load_if_exists=True, sampler=sampler, direction="maximize"
        )
    except Exception as exc:  # noqa: BLE001 - storage backends raise many types
        raise InputError(
            f"--storage {storage} --study-name {study_name}: the study cannot be created or loaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Check the URL, or choose "
            "another --study-name."
        ) from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise InputError(
            f"--study-name {study_name} in {storage} minimizes; the search maximizes. Choose another name."
        )
    recorded = study.user_attrs.get(SETTINGS_ATTR)
    if recorded is None:
        if study.trials:
            raise InputError(
                f"--study-name {study_name} in {storage} already holds {len(study.trials)} trials of another "
                "tool or search. Choose another --study-name."
            )
        study.set_user_attr(SETTINGS_ATTR, settings)
    elif recorded != settings:
        differ = [
            f"{key} {short(recorded.get(key))} -> {short(settings.get(key))}"
            for key in sorted(set(recorded) | set(settings))
            if recorded.get(key) != settings.get(key)
        ]
        raise InputError(
            f"--study-name {study_name} in {storage} was made with other settings ({'; '.join(differ)}), so it "
            "cannot be resumed by this search. Use a new --study-name (or the original settings and data)."
        )
    return study


def _completed(study) -> List[Any]:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def _shadow_objective(trial_objective: Callable[[Any], float], done: List[Any], *, low: int, high: int, step: int):
    """The objective of the in-memory study: trials already in the storage are replayed
    (the sampler must suggest the stored k; its stored value is returned, the objective is
    not called), later ones are evaluated."""

    def objective(trial) -> float:
        if trial.number < len(done):
            stored = done[trial.number]
            k = trial.suggest_int(PARAM_NAME, low, high, step=step)
            if k != int(stored.params[PARAM_NAME]):
                raise _ReplayDiverged(trial.number)
            for key, value in stored.user_attrs.items():
                trial.set_user_attr(key, value)
            return float(stored.value)
        return trial_objective(trial)

    return objective


def run_tpe_trials(
    objective: Callable[[int], float],
    *,
    low: int,
    high: int,
    n_trials: int,
    random_state: int,
    step: int = 1,
    storage: Optional[str] = None,
    study_name: Optional[str] = None,
    user_attrs: Optional[Callable[[int], Dict[str, Any]]] = None,
    fingerprint: Optional[str] = None,
) -> List[Tuple[int, float]]:
    """Run the TPE trials of the search; return (k, value) of the first ``n_trials`` completed trials, in order.

    ``objective(k)`` is the value to maximise; ``user_attrs(k)`` (optional) is stored on each
    trial (coverage, latency...). With ``storage``, completed trials are reused and only the
    missing ones run; ``fingerprint`` (e.g. a hash of the counts and settings) must match
    the one the study was made with.
    """
    problems = check_storage_settings(storage, study_name)
    if problems:
        raise SettingsError(problems)

    def trial_objective(trial) -> float:
        k = trial.suggest_int(PARAM_NAME, low, high, step=step)
        if user_attrs is not None:
            for key, value in user_attrs(k).items():
                trial.set_user_attr(key, value)
        return objective(k)

    with _quiet_optuna() as optuna:
        from optuna.samplers import TPESampler

        sampler = TPESampler(seed=random_state)
        if storage is None:
            study = optuna.create_study(direction="maximize", sampler=sampler)
            study.optimize(trial_objective, n_trials=n_trials, show_progress_bar=False)
            return [(int(t.params[PARAM_NAME]), float(t.value)) for t in study.trials]

        path = _sqlite_path(storage)
        lock = file_lock(os.path.abspath(path), timeout=DEFAULT_LOCK_TIMEOUT) if path else contextlib.nullcontext()
        with lock:
            settings = _study_settings(low, high, step, random_state, fingerprint)
            kept = _load_study(optuna, storage, study_name, TPESampler(seed=random_state), settings)
            done = _completed(kept)
            if done:
                logger.info("Resuming study %s: %d of %d trials done.", study_name, min(len(done), n_trials), n_trials)

            def mirror(_study, frozen) -> None:  # each new completed trial is stored at once
                if frozen.number >= len(done) and frozen.state == optuna.trial.TrialState.COMPLETE:
                    kept.add_trial(frozen)

            shadow = optuna.create_study(direction="maximize", sampler=sampler)
            try:
                shadow.optimize(
                    _shadow_objective(trial_objective, done, low=low, high=high, step=step),
                    n_trials=n_trials,
                    show_progress_bar=False,
                    callbacks=[mirror],
                )
            except _ReplayDiverged as exc:
                logger.warning(
                    "Study %s: trial %s was not suggested by this seed's sampler (another Optuna version?); the "
                    "remaining trials continue the study but may differ from an uninterrupted run.",
                    study_name,
                    exc,
                )
                shadow = optuna.create_study(direction="maximize", sampler=TPESampler(seed=random_state))
                for frozen in done:
                    shadow.add_trial(frozen)
                shadow.optimize(
                    trial_objective,
                    n_trials=max(0, n_trials - len(done)),
                    show_progress_bar=False,
                    callbacks=[
                        lambda _s, frozen: (
                            kept.add_trial(frozen) if frozen.state == optuna.trial.TrialState.COMPLETE else None
                        )
                    ],
                )
        return [(int(t.params[PARAM_NAME]), float(t.value)) for t in _completed(shadow)[:n_trials]]

"""Resumable TPE studies (specforge_vocab.choosing.studies): without storage exactly the paper's search
(search.tpe_search); with an Optuna RDB storage an interrupted search resumes, runs only the
missing trials, and picks the same k's as an uninterrupted run with the same seed."""

from __future__ import annotations

import os
import signal

import numpy as np
import optuna
import pytest
from reliability_helpers import run_forked

from specforge_vocab.choosing.search import Evaluation, tpe_search
from specforge_vocab.choosing.studies import PARAM_NAME, best_of, run_tpe_trials
from specforge_vocab.errors import InputError, SettingsError

LOW, HIGH, SEED = 50, 50_000, 42
COUNTS = np.sort(np.random.default_rng(0).zipf(1.2, 128_256) % 100_000)[::-1].astype(np.int64)
CURVE = np.concatenate([[0.0], np.cumsum(COUNTS) / COUNTS.sum()])


def utility(k: int) -> float:
    """The paper's utility shape: coverage minus a linear LM-head cost."""
    return float(0.5 * CURVE[k] + 0.5 * (1 - (5.9e8 + 8192 * k) / (5.9e8 + 8192 * 128_256)))


def attrs(k: int):
    return {"coverage": float(CURVE[k])}


class Interrupt(Exception):
    pass


def interrupted_after(n: int, exc=Interrupt):
    calls = []

    def objective(k):
        if len(calls) == n:
            raise exc()
        calls.append(k)
        return utility(k)

    return objective, calls


def counting(function):
    calls = []

    def objective(k):
        calls.append(k)
        return function(k)

    return objective, calls


def test_without_storage_it_is_exactly_tpe_search():
    result = tpe_search(
        lambda k: Evaluation(k, float(CURVE[k]), 0.0, utility(k)), low=LOW, high=HIGH, n_trials=40, random_state=SEED
    )
    pairs = run_tpe_trials(utility, low=LOW, high=HIGH, n_trials=40, random_state=SEED)
    assert pairs == [(t.k, t.value) for t in result.trials]
    assert best_of(pairs)[0] == result.pick.k


@pytest.mark.parametrize(
    "cut,exc", [(1, Interrupt), (7, KeyboardInterrupt), (10, Interrupt), (23, KeyboardInterrupt), (39, Interrupt)]
)
def test_interrupted_study_resumes_with_only_the_missing_trials_and_the_same_picks(tmp_path, cut, exc):
    storage, name = f"sqlite:///{tmp_path / 'study.db'}", "resume"
    uninterrupted = run_tpe_trials(utility, low=LOW, high=HIGH, n_trials=40, random_state=SEED)
    objective, _ = interrupted_after(cut, exc)
    with pytest.raises(exc):
        run_tpe_trials(
            objective,
            low=LOW,
            high=HIGH,
            n_trials=40,
            random_state=SEED,
            storage=storage,
            study_name=name,
            user_attrs=attrs,
        )
    stored = optuna.load_study(study_name=name, storage=storage)
    assert len(stored.trials) == cut  # each finished trial was stored as it completed
    objective, calls = counting(utility)
    resumed = run_tpe_trials(
        objective,
        low=LOW,
        high=HIGH,
        n_trials=40,
        random_state=SEED,
        storage=storage,
        study_name=name,
        user_attrs=attrs,
    )
    assert len(calls) == 40 - cut  # only the missing trials were evaluated
    assert resumed == uninterrupted
    # Optuna's own tools see one complete study.
    study = optuna.load_study(study_name=name, storage=storage)
    assert len(study.trials) == 40 and {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    assert [t.params[PARAM_NAME] for t in study.trials] == [k for k, _ in uninterrupted]
    assert all(t.user_attrs["coverage"] == float(CURVE[t.params[PARAM_NAME]]) for t in study.trials)
    assert study.best_value == best_of(uninterrupted)[1]


def test_a_killed_search_resumes(tmp_path):
    storage, name = f"sqlite:///{tmp_path / 'study.db'}", "killed"

    def child():
        def objective(k):
            if len(optuna.load_study(study_name=name, storage=storage).trials) >= 12:
                os.kill(os.getpid(), signal.SIGKILL)
            return utility(k)

        run_tpe_trials(objective, low=LOW, high=HIGH, n_trials=30, random_state=SEED, storage=storage, study_name=name)
        return 0

    assert run_forked(child) == ("signal", signal.SIGKILL)
    objective, calls = counting(utility)
    resumed = run_tpe_trials(
        objective, low=LOW, high=HIGH, n_trials=30, random_state=SEED, storage=storage, study_name=name
    )
    assert len(calls) == 30 - 12
    assert resumed == run_tpe_trials(utility, low=LOW, high=HIGH, n_trials=30, random_state=SEED)


def test_more_trials_later_extend_the_study_as_one_long_run_would(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = run_tpe_trials(utility, low=LOW, high=HIGH, n_trials=15, random_state=SEED, storage=storage, study_name="x")
    objective, calls = counting(utility)
    longer = run_tpe_trials(
        objective, low=LOW, high=HIGH, n_trials=25, random_state=SEED, storage=storage, study_name="x"
    )
    assert len(calls) == 10 and longer[:15] == first
    assert longer == run_tpe_trials(utility, low=LOW, high=HIGH, n_trials=25, random_state=SEED)
    objective, calls = counting(utility)  # a finished study: nothing to run
    assert (
        run_tpe_trials(objective, low=LOW, high=HIGH, n_trials=25, random_state=SEED, storage=storage, study_name="x")
        == longer
        and calls == []
    )


def test_a_study_made_with_other_settings_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    run_tpe_trials(
        utility,
        low=LOW,
        high=HIGH,
        n_trials=3,
        random_state=SEED,
        storage=storage,
        study_name="s",
        fingerprint="counts-A",
    )
    with pytest.raises(InputError, match=r"--study-name s in .* was made with other settings \(high 50000 -> 60000\)"):
        run_tpe_trials(
            utility,
            low=LOW,
            high=60_000,
            n_trials=3,
            random_state=SEED,
            storage=storage,
            study_name="s",
            fingerprint="counts-A",
        )
    with pytest.raises(InputError, match=r"fingerprint 'counts-A' -> 'counts-B'"):
        run_tpe_trials(
            utility,
            low=LOW,
            high=HIGH,
            n_trials=3,
            random_state=SEED,
            storage=storage,
            study_name="s",
            fingerprint="counts-B",
        )
    with pytest.raises(InputError, match=r"random_state 42 -> 7"):
        run_tpe_trials(
            utility,
            low=LOW,
            high=HIGH,
            n_trials=3,
            random_state=7,
            storage=storage,
            study_name="s",
            fingerprint="counts-A",
        )
    # A study of someone else's (trials, no settings of ours) is not mixed into either.
    foreign = optuna.create_study(storage=storage, study_name="foreign", direction="maximize")
    foreign.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with pytest.raises(InputError, match=r"already holds 2 trials of another tool"):
        run_tpe_trials(
            utility, low=LOW, high=HIGH, n_trials=3, random_state=SEED, storage=storage, study_name="foreign"
        )


@pytest.mark.parametrize(
    "storage,name,message",
    [
        ("sqlite:///study.db", None, r"--study-name must be a name for the study kept in --storage"),
        (
            "study.db",
            "x",
            r"--storage must be an SQLAlchemy database URL such as sqlite:///study\.db, but got 'study\.db'",
        ),
        (None, "x", r"--study-name must be given together with --storage"),
        (
            "sqlite:////no/such/dir/study.db",
            "x",
            r"--storage sqlite:////no/such/dir/study\.db: the directory /no/such/dir "
            r"does not exist",
        ),
    ],
)
def test_bad_storage_settings(storage, name, message):
    with pytest.raises(SettingsError, match=message):
        run_tpe_trials(utility, low=LOW, high=HIGH, n_trials=3, random_state=SEED, storage=storage, study_name=name)


def test_an_unusable_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "not_a_db.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(InputError, match=r"the study cannot be created or loaded \(.*\)\. Check the URL"):
        run_tpe_trials(
            utility, low=LOW, high=HIGH, n_trials=3, random_state=SEED, storage=f"sqlite:///{bad}", study_name="x"
        )

"""`compare`: studies side by side from their folders and storages, a nightly study night by night."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from lora_search.core import records
from lora_search.core.errors import ConfigError
from lora_search.report import compare

DISTRIBUTIONS = {"lora.r": CategoricalDistribution([4, 8, 16]),
                 "trainer.learning_rate": FloatDistribution(2e-4, 3e-3, log=True)}


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory):
    """A resolved RunConfig, as the pipeline writes it to sweep.yaml."""
    from lora_search.config.compose import load_config

    return load_config(["model=tiny_llama", f"results_dir={tmp_path_factory.mktemp('results')}"])


def make_study(results, cfg, name: str, values: list[float], pruned: int = 0, **sweep) -> None:
    """results/<name>/: sweep.yaml and a SQLite study with these complete values (and pruned trials)."""
    cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, name=name, **sweep))
    folder = results / name
    records.write_config(folder / "sweep.yaml", cfg)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}",
                                direction=cfg.sweep.direction)
    for i, value in enumerate(values):
        params = {"lora.r": [4, 8, 16][i % 3], "trainer.learning_rate": 1e-3}
        study.add_trial(create_trial(value=value, params=params, distributions=DISTRIBUTIONS))
    for _ in range(pruned):
        study.add_trial(create_trial(state=TrialState.PRUNED, params=params, distributions=DISTRIBUTIONS,
                                     intermediate_values={5: 1.0}))


def test_two_studies_side_by_side_name_the_best(tmp_path, base_cfg):
    results = tmp_path / "results"
    make_study(results, base_cfg, "rank_lr", [0.62, 0.55, 0.71], pruned=2)
    make_study(results, base_cfg, "targets", [0.58, 0.49])
    records.write_json(results / "targets" / "full" / "metrics.json", {"full_value": 0.45, "wall_s": 120.0})
    records.write_json(results / "targets" / "benchmark.json", {"tuned": {"exact_match": 0.75}})
    (results / "notes").mkdir()  # not a study: no sweep.yaml

    text = compare.main(["rank_lr", "targets", f"results_dir={results}"])
    lines = text.splitlines()
    assert lines[0].startswith("| study | model | data | metric | best | best params | complete | pruned | failed")
    rank_lr = next(x for x in lines if x.startswith("| rank_lr "))
    targets = next(x for x in lines if x.startswith("| targets "))
    assert "| tiny_llama | embedded | eval_loss (min) | 0.55 | r=8, learning_rate=0.001 | 3 | 2 | 0 |" in rank_lr
    assert "| 0.49 | r=8, learning_rate=0.001 | 2 | 0 | 0 | 2 | 0.45 | 0.75 |" in targets
    assert lines[-1].startswith("Best eval_loss (minimize): targets (0.49)")
    assert compare.main([f"results_dir={results}"]) == text  # no names: every study under results_dir
    assert compare.main([str(results / "targets"), str(results / "rank_lr")]).count("| tiny_llama |") == 2


def test_a_missing_storage_leaves_blank_cells(tmp_path, base_cfg):
    results = tmp_path / "results"
    make_study(results, base_cfg, "rank_lr", [0.5])
    (results / "rank_lr" / "study.db").unlink()
    row = compare.main(["rank_lr", f"results_dir={results}"]).splitlines()[2]
    assert row.startswith("| rank_lr | tiny_llama | embedded | eval_loss (min) |  |  |  |  |  |  |")
    assert not (results / "rank_lr" / "study.db").exists()  # read-only: nothing created


def test_a_nightly_study_alone_shows_one_row_per_night(tmp_path, base_cfg):
    results = tmp_path / "results"
    make_study(results, base_cfg, "nightly", [0.61, 0.4])
    night = {"study": "nightly", "metric": "eval_loss", "direction": "minimize", "failed": 0, "best_trial": 1,
             "best_params": {"lora.r": 8}, "fingerprints": {"data": "a", "model": "b"}}
    records.write_json(results / "nightly" / "nights" / "2026-11-23" / "night.json", {
        **night, "night": "2026-11-23", "trials": 6, "pruned": 2, "best_value": 0.42, "candidate_value": 0.42,
        "champion_value_before": None, "champion_value_after": 0.42, "decision": "new_champion",
        "reason": "first champion", "changed": [], "wall_s": 812.3})
    records.write_json(results / "nightly" / "nights" / "2026-11-24" / "night.json", {
        **night, "night": "2026-11-24", "trials": 6, "pruned": 1, "best_value": 0.43, "candidate_value": None,
        "champion_value_before": 0.42, "champion_value_after": 0.42, "decision": "no_change",
        "reason": "no better candidate", "changed": ["data"], "wall_s": 600.0})

    text = compare.main(["nightly", f"results_dir={results}"])
    assert text.splitlines()[0] == "Study nightly: 2 nights, eval_loss (minimize)."
    assert "| 2026-11-23 | 6 | 2 | 0 | 0.42 | new_champion | 0.42 |  | 13.5 | first champion |" in text
    assert "| 2026-11-24 | 6 | 1 | 0 | 0.43 | no_change | 0.42 | data | 10 | no better candidate |" in text
    assert text.splitlines()[-1] == "Champion: 0.42 since night 2026-11-23."
    make_study(results, base_cfg, "rank_lr", [0.5])
    both = compare.main(["nightly", "rank_lr", f"results_dir={results}"])  # several: one row per study
    assert "| nightly |" in both and "| rank_lr |" in both and "2026-11-23" not in both


def test_an_unknown_study_names_it_and_the_studies_there(tmp_path, base_cfg):
    results = tmp_path / "results"
    make_study(results, base_cfg, "rank_lr", [0.5])
    make_study(results, base_cfg, "targets", [0.5])
    with pytest.raises(ConfigError) as e:
        compare.main(["rank_l", f"results_dir={results}"])
    assert "unknown study 'rank_l'" in str(e.value) and "did you mean rank_lr?" in str(e.value)
    assert "studies under" in str(e.value) and "rank_lr, targets" in str(e.value)

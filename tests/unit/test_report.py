"""The report: Optuna's plots as real PNGs, the importance sentence, a self-contained HTML page."""

from __future__ import annotations

import math
import re

import matplotlib.image
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from lora_search.report import confidence, importance, study_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DISTRIBUTIONS = {
    "lora.r": CategoricalDistribution([4, 8, 16, 32]),
    "lora.dropout": FloatDistribution(0.0, 0.1),
    "lora.targets": CategoricalDistribution(["qv", "attn", "all_linear"]),
    "trainer.learning_rate": FloatDistribution(2e-4, 3e-3, log=True),
}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """The default sweep (rank_lr) for the tiny model, results in a temporary folder."""
    from lora_search.config.compose import load_config

    return load_config(["model=tiny_llama", f"results_dir={tmp_path_factory.mktemp('results')}"])


def make_study(folder, n_trials: int = 12, pruned=(3, 7)) -> optuna.Study:
    """A SQLite study whose eval loss is set by the learning rate; the other parameters barely matter."""
    folder.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="rank_lr", storage=f"sqlite:///{folder / 'study.db'}",
                                direction="minimize")
    for i in range(n_trials):
        lr = min(max(2e-4 * 15 ** ((i * 7 % n_trials) / max(n_trials - 1, 1)), 2e-4), 3e-3)
        params = {"lora.r": [4, 8, 16, 32][i % 4], "lora.dropout": (i * 3 % 5) / 50,
                  "lora.targets": ["qv", "attn", "all_linear"][i % 3], "trainer.learning_rate": lr}
        final = 0.4 + 0.3 * math.log(3e-3 / lr) / math.log(15) + 0.002 * (i % 2)
        steps = {s: final + 0.6 / s for s in (2, 4, 6, 8, 10)}
        attrs = {"exact_match": 0.5, "wall_s": 12.0, "status": "complete", "steps": 10}
        if i in pruned:
            steps = {s: v + 0.3 for s, v in steps.items() if s <= 4}
            attrs = {**attrs, "status": "pruned", "steps": 4}
            study.add_trial(create_trial(state=TrialState.PRUNED, params=params, distributions=DISTRIBUTIONS,
                                         intermediate_values=steps, user_attrs=attrs))
        else:
            study.add_trial(create_trial(value=final, params=params, distributions=DISTRIBUTIONS,
                                         intermediate_values=steps, user_attrs=attrs))
    return study


def test_importance_sentence_reads_the_shares_and_claims_only_the_order_its_intervals_support():
    shares = {"trainer.learning_rate": 0.71, "lora.r": 0.15, "lora.dropout": 0.08, "lora.targets": 0.06}
    apart = {"trainer.learning_rate": (0.55, 0.85), "lora.r": (0.05, 0.3), "lora.dropout": (0.0, 0.2),
             "lora.targets": (0.0, 0.15)}
    text = importance.importance_sentence(shares, "eval_loss", method="fanova", n_complete=12, intervals=apart)
    assert text.startswith("Learning rate matters most: 71% of the variance of eval loss (55-85%)")
    assert "the order of the rest (rank 15% (5-30%), dropout 8% (0-20%) and target modules 6% (0-15%)) is not " \
           "established" in text
    assert "fANOVA over 12 complete trials" in text and "share of the variance explained by single parameters" in text
    ped = importance.importance_sentence(shares, "exact_match", method="ped_anova", n_complete=20, intervals=apart)
    assert ped.startswith("Learning rate matters most: 71% of the importance for exact match") and "best 25%" in ped
    # overlapping intervals: no parameter is said to matter more, whatever the point estimates
    overlap = {**apart, "trainer.learning_rate": (0.25, 0.85)}
    text = importance.importance_sentence(shares, "eval_loss", method="fanova", n_complete=12, intervals=overlap)
    assert text.startswith("These trials do not rank the parameters") and "matters most" not in text
    # 7 trials for 4 parameters: too few, said plainly, even where the intervals look apart
    few = importance.importance_sentence(shares, "eval_loss", method="fanova", n_complete=7, intervals=apart)
    assert few.startswith("7 complete trials are too few to rank 4 parameters") and "matters most" not in few
    # no intervals at all: the shares, and no order claimed
    bare = importance.importance_sentence(shares, "eval_loss", method="fanova", n_complete=30)
    assert "no ranking is claimed" in bare and "matters most" not in bare
    assert "too few complete trials" in importance.importance_sentence({}, "eval_loss")
    assert importance.importance_sentence({"trainer.learning_rate": 1.0}, "eval_loss").startswith(
        "Learning rate is the only parameter searched")
    assert [importance.readable(k) for k in ("lora.alpha_ratio", "lora.targets", "trainer.warmup_steps")] == [
        "alpha ratio", "target modules", "warmup steps"]


def test_report_has_optuna_plots_importances_and_a_self_contained_html(cfg, tmp_path):
    out = tmp_path / "rank_lr"
    study = make_study(out, n_trials=16)  # 14 complete: enough for the intervals to single out the learning rate
    shares = importance.importances(study)
    assert next(iter(shares)) == "trainer.learning_rate" and shares["trainer.learning_rate"] > 0.5
    assert math.isclose(sum(shares.values()), 1.0) and importance.importances(study) == shares  # seeded

    path = study_report.write_report(study, cfg, out)
    md = path.read_text()
    names = ("history", "importances", "intermediate", "parallel", "rank_lr")
    for name in names:
        png = out / "plots" / f"{name}.png"
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
        height, width = matplotlib.image.imread(png).shape[:2]
        assert width > 300 and height > 200, name
        assert f"](plots/{name}.png)" in md
    assert "where a trial was pruned" in md
    sentence = re.search(r"Learning rate matters most: (\d+)% of the (variance of|importance for) eval loss "
                         r"\((\d+)-(\d+)%\)", md)
    assert sentence and int(sentence[1]) > 50 and int(sentence[3]) <= int(sentence[1]) <= int(sentence[4])
    intervals = info_intervals = confidence.summary(study, "eval_loss")["importance_intervals"]
    assert set(intervals) == set(shares) and all(lo <= shares[k] + 1e-9 and lo <= hi for k, (lo, hi) in
                                                 info_intervals.items())
    assert "| share | 90% interval |" in md
    assert "## Parameter importances" in md and "| trainer.learning_rate | learning rate |" in md

    html = (out / "report.html").read_text()
    assert 'src="http' not in html and "<link" not in html and "<script" not in html
    assert html.count('src="data:image/png;base64,') == len(names)
    assert "<table>" in html and "<td>trainer.learning_rate</td>" in html and "<th>learning_rate</th>" in html

    info = confidence.summary(study, "eval_loss")
    assert (info["complete"], info["pruned"], info["failed"]) == (14, 2, 0)
    assert info["best_value"] == study.best_value and info["importances"] == shares


def test_a_study_of_one_trial_still_gets_a_report(cfg, tmp_path):
    out = tmp_path / "rank_lr"
    study = make_study(out, n_trials=1, pruned=())
    path = study_report.write_report(study, cfg, out)
    md = path.read_text()
    assert "too few complete trials" in md and "## Trials (1: 1 complete)" in md
    assert "![" not in md and not list((out / "plots").glob("*.png"))
    assert (out / "report.html").exists()
    assert importance.importances(study) == {} and confidence.summary(study, "eval_loss")["best_trial"] == 0


def test_the_report_command_rebuilds_the_report_from_the_storage(tmp_path, tiny_cache, capsys, monkeypatch):
    import sys

    from lora_search.__main__ import main

    results = tmp_path / "results"
    make_study(results / "rank_lr")
    monkeypatch.setattr(sys, "argv", ["lora_search"])  # main() hands Hydra its arguments through sys.argv
    main(["report", "model=tiny_llama", f"results_dir={results}", f"cache_dir={tiny_cache}", "tracking=none",
          f"hydra.run.dir={tmp_path / 'hydra'}"])
    out = results / "rank_lr"
    md = (out / "report.md").read_text()
    assert "## Trials (12: 10 complete, 2 pruned)" in md and "](plots/history.png)" in md
    assert (out / "plots" / "importances.png").read_bytes()[:8] == PNG_MAGIC and (out / "report.html").exists()
    printed = capsys.readouterr().out
    header = study_report.table(*study_report.trial_rows(optuna.load_study(study_name="rank_lr", storage=f"sqlite:///{out / 'study.db'}"),
                                             "eval_loss")).splitlines()[0]
    assert header.startswith("| # | state | dropout | r | targets | learning_rate | eval_loss |") and header in printed
    assert f"report: {out / 'report.md'}" in printed
    assert not (out / "trials").exists() and not (out / "full").exists()  # nothing trained


def test_the_report_command_on_a_missing_study_is_one_line_and_writes_nothing(tmp_path, tiny_cache, capsys,
                                                                             monkeypatch):
    import sys

    from lora_search.__main__ import main

    results = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["lora_search"])
    with pytest.raises(SystemExit) as info:
        main(["report", "model=tiny_llama", "sweep.name=nosuch", f"results_dir={results}", f"cache_dir={tiny_cache}",
              "tracking=none"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no study 'nosuch' in storage 'sqlite:///" in errors[0]
    assert str(results / "nosuch" / "study.db") in errors[0] and "stage=search" in errors[0]
    assert not results.exists()  # no empty study.db, no Hydra log

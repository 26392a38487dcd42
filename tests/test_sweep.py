"""hw-dq sweep: a tiny SQLite sweep killed mid-trial and resumed, its report, the pruner, the front, SPEC errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_one_line_error, run_cli, run_cli_here

TINY = ROOT / "hw_dq" / "configs" / "sweep_tiny.yaml"


def _study(out: Path):  # the sweep's own study, read the way any Optuna user would
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")


def _start(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "hw_dq.cli", "sweep", str(TINY), "--out", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny sweep (3 trials), SIGKILLed while its second trial runs, then the same command again."""
    from optuna.trial import TrialState

    out = tmp_path_factory.mktemp("sweep") / "tiny"
    proc = _start(out)
    deadline, killed = time.time() + 240, None
    while time.time() < deadline and killed is None:
        time.sleep(0.5)
        if (out / "study.db").is_file():
            try:
                running = [t for t in _study(out).get_trials(states=(TrialState.RUNNING,)) if t.number >= 1]
            except Exception:  # noqa: BLE001 - the study is still being created
                continue
            if running and (out / running[0].user_attrs.get("run_dir", "-")).is_dir():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed = running[0]
    assert killed is not None, proc.communicate(timeout=5)[0] if proc.poll() is not None else "never reached trial 1"
    first = _study(out).get_trials()
    done_before = {t.number: (out / t.user_attrs["run_dir"] / "model.safetensors").stat().st_mtime_ns
                   for t in first if t.state == TrialState.COMPLETE}  # fmt: skip
    again = run_cli("sweep", str(TINY), "--out", str(out), timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    return {"out": out, "killed": killed, "done_before": done_before, "trials": _study(out).get_trials(),
            "stdout": again.stdout}  # fmt: skip


def test_kill_and_resume_continues_the_same_study(resumed: dict) -> None:
    from optuna.trial import TrialState

    trials, killed, out = resumed["trials"], resumed["killed"], resumed["out"]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and len({t.number for t in complete}) == 3
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    dead = next(t for t in trials if t.number == killed.number)
    assert dead.state == TrialState.FAIL and dead.user_attrs["error"] == "worker process died"
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == killed.params and retry[0].user_attrs["run_dir"] == killed.user_attrs["run_dir"]
    for number, mtime in resumed["done_before"].items():  # finished trials are not redone
        t = next(t for t in trials if t.number == number)
        assert t.state == TrialState.COMPLETE
        assert (out / t.user_attrs["run_dir"] / "model.safetensors").stat().st_mtime_ns == mtime
    assert "queued for a retry" in resumed["stdout"]
    # a finished sweep run again asks for nothing
    again = run_cli("sweep", str(TINY), "--out", str(out), "--quiet", timeout=120)
    assert again.returncode == 0 and len(_study(out).get_trials()) == len(trials), again.stderr


def test_every_trial_is_an_ordinary_run_directory(resumed: dict) -> None:
    from optuna.trial import TrialState

    out = resumed["out"]
    for t in resumed["trials"]:
        if t.state != TrialState.COMPLETE:
            continue
        run = out / t.user_attrs["run_dir"]
        assert (run / "model.safetensors").is_file() and (run / "config.json").is_file()
        assert (run / "build" / "Pynq-Z1" / "dataflow_model.onnx").is_file()
        proxy = json.loads((run / "attacks" / "proxy-hw.json").read_text())
        s = json.loads((run / "sweep_trial.json").read_text())
        assert s["robust"] == proxy["headline"]["robust_acc"] <= s["clean"] == proxy["clean_acc"]
        assert list(t.values) == [s["robust"], s["clean"], s["fps"], s["lut"], s["bram"]]
        cfg = json.loads((run / "config.json").read_text())["train"]
        assert all(cfg[k] == v for k, v in t.params.items())


def test_report_front_plots_and_relative_paths(resumed: dict) -> None:
    from hw_dq.experiments.sweep.pareto import dominates

    out = resumed["out"]
    proc = run_cli("sweep", str(out), "--report", "--min-fps", "1000", "--final", timeout=300)
    assert proc.returncode == 0, proc.stderr
    for png in ("pareto_robust_fps.png", "pareto_robust_lut.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "trials.json").read_text())
    assert str(out) not in json.dumps(data) and "/tmp" not in json.dumps(data)
    # a trial that repeated a finished point (NSGA-II may propose one again) stands as the trial that ran it
    rows = [r for r in data["trials"] if r["state"] == "COMPLETE" and r.get("duplicate_of") is None]
    report = (out / "report.md").read_text()
    objectives = ("robust", "clean", "fps", "lut", "bram")
    front = [r for r in rows if f"| {r['number']} | `{r['run_dir']}` |" in report.split("## Best")[0]]
    assert front, report
    for r in rows:  # the table is exactly the non-dominated set
        dominated = any(dominates(q["summary"], r["summary"], objectives) for q in rows if q is not r)
        assert (r in front) == (not dominated), (r["number"], report)
    assert "Pynq-Z1: trial" in report and "re-evaluates the front with square + transfer-pgd on 16" in report
    for r in front:  # --final: the SPEC's final standard on each point of the front, in its run directory
        final = json.loads((out / r["run_dir"] / "attacks" / "final-hw.json").read_text())
        assert [e["attack"] for e in final["evaluations"]] == ["square", "transfer-pgd"]
        assert final["headline"]["robust_acc"] <= final["clean_acc"]
        assert f"| {100 * final['headline']['robust_acc']:.1f}% |" in report.split(f"| {r['number']} | `")[1]


def test_pruner_stops_hopeless_trials() -> None:
    from dataclasses import replace

    from hw_dq.experiments.sweep.spec import Pruner, load_spec
    from hw_dq.experiments.sweep.trial import should_prune

    spec = replace(load_spec(TINY), pruner=Pruner(percentile=25, n_startup=4, warmup_epochs=1, margin=0.02))
    finished = [[0.30, 0.40], [0.32, 0.42], [0.28, 0.38], [0.35, 0.45]]
    assert should_prune(spec, 1, 0.11, [])  # chance level: hopeless at once
    assert not should_prune(spec, 1, 0.25, finished[:3])  # too few finished trials to compare with
    assert should_prune(spec, 1, 0.25, finished)  # below the 25th percentile at epoch 1 (0.295)
    assert not should_prune(spec, 1, 0.30, finished)
    assert not should_prune(spec, 2, 0.40, finished) and should_prune(spec, 2, 0.39, finished)  # 0.395
    assert not should_prune(replace(spec, pruner=Pruner(enabled=False)), 1, 0.0, finished)


BAD_SPECS = [
    ({"colour": "red"}, "unknown key(s) colour"),
    ({"space": {"wbits": []}}, "space.wbits is an empty list"),
    ({"constraints": {"min_fps": 5e9}}, "impossible constraint min_fps"),
    ({"space": {"beta": {"low": 1e-2, "high": 1e-4}}}, "space.beta is an empty range"),
    ({"constraints": {"max_lut": 1.5}}, "impossible constraint max_lut"),
    ({"space": {"wbits": [2, 9]}}, "space.wbits value 9"),
    ({"space": {"depth": [16, 28]}}, "unknown key(s) depth in SPEC"),
    ({"objectives": ["robust", "power"]}, "unknown objective(s) power"),
]


def _spec_file(tmp_path: Path, patch: dict) -> Path:
    import yaml

    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**yaml.safe_load(TINY.read_text()), **patch}))
    return path


@pytest.mark.parametrize(("patch", "needle"), BAD_SPECS[:3])
def test_bad_spec_is_one_line(tmp_path: Path, patch: dict, needle: str) -> None:
    proc = run_cli("sweep", str(_spec_file(tmp_path, patch)), "--out", str(tmp_path / "s"))
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("patch", "needle"), BAD_SPECS[3:])
def test_bad_spec_is_refused_before_anything_runs(tmp_path: Path, patch: dict, needle: str) -> None:
    from hw_dq.errors import ConfigError
    from hw_dq.experiments.sweep import load_spec

    with pytest.raises(ConfigError) as e:
        load_spec(_spec_file(tmp_path, patch))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unreachable_storage_is_one_line(tmp_path: Path) -> None:
    url = "postgresql://nobody:secret@127.0.0.1:9/none"  # port 9 (discard): nothing listens
    proc = run_cli("sweep", str(TINY), "--out", str(tmp_path / "s"), "--storage", url)
    assert_one_line_error(proc, "cannot open the study storage", "127.0.0.1:9")
    assert "secret" not in proc.stderr
    assert_one_line_error(run_cli_here("sweep", str(tmp_path), "--report"), "not a sweep folder")


def test_misused_flags_and_another_spec_are_one_line(resumed: dict, tmp_path: Path) -> None:
    out = resumed["out"]
    assert_one_line_error(run_cli_here("sweep", str(out), "--report", "--min-fps", "-5"), "invalid --min-fps -5")
    assert_one_line_error(run_cli_here("sweep", str(TINY), "--out", str(out), "--final"), "go with --report")
    other = _spec_file(tmp_path, {"seed": 1})  # the same study name, another SPEC
    assert_one_line_error(run_cli_here("sweep", str(other), "--out", str(out)), "holds a sweep of another SPEC")


def test_a_point_proposed_again_reuses_its_results_and_stands_once_on_the_front() -> None:
    """NSGA-II may propose a finished point again in a small space: no second training, one front row."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    from hw_dq.experiments.sweep.pareto import collect, front
    from hw_dq.experiments.sweep.study import _same_point

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"])
    dist = {"abits": CategoricalDistribution([1, 2])}
    summaries = [{"robust": 0.1, "clean": 0.5}, {"robust": 0.3, "clean": 0.3}]  # neither dominates
    for n, (abits, sm) in enumerate(zip((2, 1), summaries, strict=True)):
        attrs = {"run_dir": f"trials/t{n:04d}", "summary": sm}
        trial = optuna.trial.create_trial(params={"abits": abits}, distributions=dist,
                                          values=[sm["robust"], sm["clean"]], user_attrs=attrs)  # fmt: skip
        study.add_trial(trial)
    study.enqueue_trial({"abits": 2})
    again = study.ask()
    again.suggest_categorical("abits", [1, 2])
    twin = _same_point(study, again)
    assert twin is not None and twin.number == 0
    for k, v in {"duplicate_of": 0, "run_dir": "trials/t0000", "summary": summaries[0]}.items():
        again.set_user_attr(k, v)
    study.tell(again, [0.1, 0.5])
    assert _same_point(study, study.ask()) is None  # a fresh trial with no parameters yet matches nothing
    rows = [{**r, "feasible": True} for r in collect(study) if r["state"] == "COMPLETE"]
    assert len(rows) == 3 and sorted(r["number"] for r in front(rows, ("robust", "clean"))) == [0, 1]


def test_without_out_the_sweep_goes_to_a_fresh_folder_under_runs(tmp_path: Path) -> None:
    proc = run_cli("sweep", str(TINY), "--quiet", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "sweep" / "tiny" / "study.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing written anywhere else

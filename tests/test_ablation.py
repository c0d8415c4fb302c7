"""``benchmarks/ablation.py`` (the paper's Table 4): the verdict against the baseline, and the ledger that builds a
table of many runs over several calls."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ablation  # noqa: E402
from ablation import against_baseline, in_use, record, verdict_lines  # noqa: E402
from accuracy import budgeted  # noqa: E402


def _runs(values: list[float]) -> list[dict]:
    return [{"seed": s, "val": v, "test": None} for s, v in enumerate(values)]


def test_against_baseline_by_hand():
    results = {"baseline": _runs([70.0, 72.0, 74.0]),  # mean 72, sample std 2
               "+RF": _runs([75.0, 76.0, 77.0]),  # mean 76, std 1: +4 > max(2, 1)
               "+IED": _runs([71.0, 73.0, 75.5]),  # mean 73.1667, std 2.2546: +1.17 < 2.25
               "+RF +IED": _runs([74.0, 72.0])}  # seed 2 missing: paired over seeds 0 and 1 only
    v = against_baseline(results, "val")
    assert v["+RF"]["diff"] == pytest.approx(4.0) and v["+RF"]["spread"] == pytest.approx(2.0)
    assert v["+RF"]["verdict"] == "better" and v["+RF"]["better_seeds"] == 3
    assert v["+RF"]["paired"] == {0: 5.0, 1: 4.0, 2: 3.0}
    assert v["+IED"]["diff"] == pytest.approx(73.5 - 72.0 - 1 / 3) and v["+IED"]["spread"] == pytest.approx(
        (((71 - 73.5 + 1 / 3) ** 2 + (73 - 73.5 + 1 / 3) ** 2 + (75.5 - 73.5 + 1 / 3) ** 2) / 2) ** 0.5)
    # better on every seed, yet within the spread: the table's question is about the means
    assert v["+IED"]["verdict"] == "within" and v["+IED"]["better_seeds"] == 3
    assert v["+RF +IED"]["paired"] == {0: 4.0, 1: 0.0} and v["+RF +IED"]["better_seeds"] == 1  # a tie: not better
    lines = verdict_lines(v)
    assert lines[0] == ("+RF vs baseline: +4.00 points, seed spread 2.00: better by more than the spread; better on "
                        "3 of 3 seeds (seed 0 +5.00, seed 1 +4.00, seed 2 +3.00)")
    # a ledger in another order pairs and prints by seed
    shuffled = {name: runs[::-1] for name, runs in results.items()}
    assert verdict_lines(against_baseline(shuffled, "val")) == lines
    assert "within the spread" in lines[1]


def test_a_worse_variant_and_a_single_seed_get_their_own_verdicts():
    worse = against_baseline({"baseline": _runs([90.0, 90.2, 89.8]), "+RF": _runs([85.0, 85.2, 84.8])}, "val")
    assert worse["+RF"]["diff"] == pytest.approx(-5.0) and worse["+RF"]["verdict"] == "worse"  # not "within"
    assert "worse by more than the spread; better on 0 of 3 seeds" in verdict_lines(worse)[0]
    one = against_baseline({"baseline": _runs([90.0]), "+RF": _runs([90.01])}, "val")
    assert one["+RF"]["verdict"] is None  # one seed: a spread of 0 says nothing
    assert "no spread to compare with (fewer than 2 seeds)" in verdict_lines(one)[0]


def test_budgeted_keys_follow_overridden_epochs(tmp_path: Path):
    """cifar10-fast's ``epochs: 1`` is a placeholder (its time budget plans the steps): with ``--set epochs=20``
    the warm-up keeps the recipe's 0.2 epochs (it was capped at 0 by the placeholder) and a teacher, the recipe
    having no teacher_epochs of its own, trains the student's 20 epochs (it trained 1)."""
    fast = budgeted("cifar10", 1.0, None, None, tmp_path, 0, "cifar10-fast", {"epochs": 20, "time_budget": None})
    assert (fast["epochs"], fast["warmup_epochs"], fast["teacher_epochs"], fast["time_budget"]) == (20, 0.2, 20, None)
    assert budgeted("cifar10", 1.0, None, None, tmp_path, 0, "cifar10-fast",
                    {"epochs": 20, "warmup_epochs": 0})["warmup_epochs"] == 0  # an explicit --set wins
    # a recipe with its own teacher epochs scales them with the budget, whatever the student's epochs
    mnist = budgeted("mnist", 2.0, None, None, tmp_path, 0, None, {"epochs": 7})
    assert (mnist["epochs"], mnist["teacher_epochs"]) == (7, 2)
    assert "limit" not in mnist and budgeted("mnist", 0.01, None, None, tmp_path, 0)["limit"] == 700
    # the keys counted in epochs follow the run's: the paper's 400-epoch recipe (warm-up 20, cool-down 10, mixup
    # off at 200) cut to 20 epochs warms up 5 epochs (a quarter), cools down 1 and stops mixup at epoch 10
    short = budgeted("cifar10", 1.0, None, None, tmp_path, 0, None, {"epochs": 20})
    assert (short["warmup_epochs"], short["cooldown_epochs"], short["mixup_off_epoch"]) == (5.0, 1, 10)
    assert budgeted("cifar10", 1.0, None, None, tmp_path, 0, "cifar10-fast")["warmup_epochs"] == 0.2  # was 0


def test_ledger_builds_the_table_over_calls(tmp_path: Path):
    ledger = tmp_path / "t4.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "digits", "--seeds", "2", "--limit", "32",
           "--set", "epochs=1", "--set", "teacher_epochs=1", "--set", "batch_size=16", "--set", "time_steps=1",
           "--results", str(ledger)]

    def call(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")})

    first = call("--runs", "5")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "3 of 8 runs still to do (next: +RF, seed 1)" in first.stdout
    saved = json.loads(ledger.read_text())
    assert sum(len(r) for r in saved["runs"].values()) == 5 and Path(tmp_path, saved["teacher_checkpoint"]).is_file()
    assert 0 <= saved["teacher_val"] <= 100
    assert not (tmp_path / "ablation_digits_t4.json").exists()  # no table before every run is in

    # the run folders lost (a new checkout): the teacher is trained again with the first seed's config, and a
    # teacher that does not reach the ledger's accuracy is said to differ; a run another call holds is left to it
    shutil.rmtree(tmp_path / "runs" / "t4" / "teacher-pIED-s0")
    ledger.write_text(json.dumps({**saved, "teacher_val": 1.0}))
    busy = tmp_path / "runs" / "t4" / "pRF-s1"
    busy.mkdir()
    with open(busy / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        second = call()
    assert second.returncode == 0, second.stderr[-2000:]
    assert "+RF, seed 1: trained by another call now (its folder is locked); skipped" in second.stdout
    assert "teacher runs/t4/teacher-pIED-s0/best.safetensors is gone" in second.stdout
    assert second.stdout.count("-> runs/t4/teacher-") == 1 and "-> runs/t4/teacher-pIED-s0" in second.stdout
    assert "its distilled runs have a different teacher" in second.stdout
    assert "1 of 8 runs still to do (next: +RF, seed 1)" in second.stdout
    assert json.loads(ledger.read_text())["teacher_val"] != 1.0
    shutil.rmtree(busy)  # the other call's folder (no state: this test's stand-in)

    third = call()
    assert third.returncode == 0, third.stderr[-2000:]
    assert third.stdout.count("training bestformer_tiny") == 1  # the ledger's seven runs are not trained again
    assert "-> runs/t4/teacher-" not in third.stdout  # nor the shared teacher
    table = json.loads((tmp_path / "ablation_digits_t4.json").read_text())
    assert (tmp_path / "ablation_digits_t4.png").read_bytes()[:4] == b"\x89PNG"
    assert {n: sorted(r["seed"] for r in runs) for n, runs in table["runs"].items()} == \
        {n: [0, 1] for n in ("baseline", "+RF", "+IED", "+RF +IED")}
    assert table["against_baseline"] == json.loads(json.dumps(against_baseline(table["runs"], "test")))
    assert third.stdout.strip().splitlines()[-1].startswith("ablation digits (test top-1, mean of 2 seeds)")

    other = call("--set", "lr=0.5")  # other options: refused, never mixed into the same table
    assert other.returncode != 0 and "holds runs of other options" in other.stderr
    # the table is of the seeds asked for, whatever else the ledger holds
    first_seed = call("--seeds", "1")
    assert first_seed.returncode == 0, first_seed.stderr[-2000:]
    assert "training" not in first_seed.stdout and "mean of 1 seeds" in first_seed.stdout
    one = json.loads((tmp_path / "ablation_digits_t4.json").read_text())
    assert {n: [r["seed"] for r in runs] for n, runs in one["runs"].items()} == {n: [0] for n in one["runs"]}
    assert all(v["verdict"] is None for v in one["against_baseline"].values())
    # a ledger elsewhere with the same name and other options would read these run folders back: refused
    (tmp_path / "elsewhere").mkdir()
    moved = subprocess.run([*cmd[:-1], str(tmp_path / "elsewhere" / "t4.json"), "--set", "lr=0.5"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")})
    assert moved.returncode != 0 and "runs/t4 holds runs of other options" in moved.stderr
    assert "training" not in moved.stdout
    # --runs without a ledger would throw the finished runs away
    lost = call("--runs", "1", "--results", "")
    assert lost.returncode == 2 and "--runs needs --results" in lost.stderr
    # a seed twice (a hand-edited ledger) would be averaged in the table but paired once: refused
    dup = json.loads(ledger.read_text())
    dup["runs"]["baseline"].append(dict(dup["runs"]["baseline"][0]))
    ledger.write_text(json.dumps(dup))
    twice = call()
    assert twice.returncode != 0 and "baseline holds a seed twice" in twice.stderr and "training" not in twice.stdout


def test_two_calls_at_once_keep_both_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each finished run is merged into the ledger as the file is then (another call may have added runs since this
    one read it), and the teacher another call recorded is kept; a held run lock is seen from another descriptor."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "t4").mkdir(parents=True)
    ledger, identity = tmp_path / "t4.json", {"dataset": "digits"}
    a = {"seed": 0, "val": 70.0, "test": None, "minutes": 1.0}
    runs, teacher = record(ledger, identity, {"teacher_checkpoint": "t.safetensors", "teacher_val": 80.0}, "+RF", a)
    assert runs["+RF"] == [a] and teacher == {"teacher_checkpoint": "t.safetensors", "teacher_val": 80.0}
    b = {"seed": 0, "val": 71.0, "test": None, "minutes": 1.0}
    runs, teacher = record(ledger, identity, {}, "+IED", b)  # a call that read the ledger before a's run
    assert runs["+RF"] == [a] and runs["+IED"] == [b] and teacher["teacher_val"] == 80.0
    assert record(ledger, identity, {}, "+RF", {**a, "val": 1.0})[0]["+RF"] == [a]  # a seed is never added twice
    assert json.loads(ledger.read_text())["runs"]["+IED"] == [b]
    with pytest.raises(SystemExit, match="holds runs of other options"):
        record(ledger, {"dataset": "mnist"}, {}, "+RF", a)

    folder = tmp_path / "runs" / "t4" / "pRF-s1"
    assert not in_use(folder)  # no folder
    folder.mkdir()
    (folder / ".lock").write_text("")
    assert not in_use(folder)  # a lock file nobody holds (a run that ended)
    with open(folder / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert in_use(folder)
    assert not in_use(folder)


def test_a_teacher_another_call_took_first_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Two calls that both find the shared teacher missing: the one whose teacher run is refused (the other took
    its folder between the check and the lock) skips the distilled runs instead of crashing."""
    from bestformer.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    argv = ["ablation.py", "digits", "--seeds", "1", "--limit", "32", "--set", "epochs=1", "--results",
            str(tmp_path / "t4.json")]
    monkeypatch.setattr(sys, "argv", [*argv, "--runs", "0"])
    ablation.main()  # records the options beside the run folders, trains nothing
    identity = json.loads((tmp_path / "runs" / "t4" / "ledger_identity.json").read_text())
    done = [{"seed": 0, "val": 50.0, "test": 50.0, "minutes": 0.1}]
    (tmp_path / "t4.json").write_text(json.dumps({"identity": identity, "runs": {"baseline": done, "+RF": done}}))
    taken: set[str] = set()

    def teacher_taken(cfg: object) -> tuple[str, float]:
        taken.add("teacher-pIED-s0")
        raise ConfigError("run folder runs/t4/teacher-pIED-s0 is in use by another run (pid 1 on host)")

    monkeypatch.setattr(ablation, "train_teacher", teacher_taken)
    monkeypatch.setattr(ablation, "in_use", lambda folder: folder.name in taken)
    monkeypatch.setattr(sys, "argv", argv)
    ablation.main()
    out = capsys.readouterr().out
    assert "+IED, seed 0: another call took the shared teacher first; skipped" in out
    assert "+RF +IED, seed 0: the shared teacher is trained by another call now; skipped" in out
    assert "2 of 4 runs still to do (next: +IED, seed 0)" in out


def test_the_docs_state_table4_as_measured() -> None:
    # the README and docs/training.md quote the committed result; a rerun that changes it must change them too
    result = json.loads((ROOT / "benchmarks/results/ablation_cifar10_table4_runs.json").read_text())
    readme, training = ((ROOT / name).read_text() for name in ("README.md", "docs/training.md"))
    assert len(result["runs"]) == 4 and all(len(runs) == 3 for runs in result["runs"].values())
    for variant, stats in result["summary"].items():
        mean, std = stats["val"]
        assert f"{mean:.2f} ± {std:.2f}" in readme and f"**{mean:.2f} ± {std:.2f}**" in training, variant
        for run in result["runs"][variant]:
            assert f"{run['val']:.2f} %" in training, (variant, run)
    assert {a["verdict"] for a in result["against_baseline"].values()} == {"within"}  # what the docs conclude
    assert "none of RF, IED or both beats the baseline by more than the seed spread" in readme
    assert "None of RF, IED or both improves on the baseline by more than the seed spread" in training

"""hw-dq demo end to end (small): trains VQ and DQ, attacks them on PyTorch and on the simulated FPGA."""

from __future__ import annotations

import pytest

from hw_dq.experiments.demo import run_demo

N, N_HW = 64, 16


@pytest.mark.slow  # 2-4 min on 2 shared cores
def test_demo_end_to_end_small(tmp_path, capsys):
    summary = run_demo(tmp_path / "demo", epochs=1, n_eval=N, progress=False, n_hw=N_HW)
    rows = {r["variant"]: r for r in summary["rows"]}
    assert list(rows) == ["VQ", "DQ"]
    slack = 2 / N  # two images: ART's PGD starts at a random point
    for r in rows.values():
        # the attacks did something, and in the order they must: PGD at least as strong as FGSM,
        # robust accuracy falls with eps and never exceeds clean accuracy
        assert r["pgd@8"] <= r["fgsm@8"] + slack and r["pgd@8"] <= r["pgd@2"] + slack
        assert max(r[f"{a}@{e:g}"] for a in ("fgsm", "pgd") for e in (2.0, 4.0, 8.0)) <= r["clean_acc"]
        # the masking checks ran to a verdict, and the verdict is the one their statuses imply
        statuses = {c["status"] for c in r["sanity_checks"]}
        assert "pass" in statuses or "warn" in statuses
        assert r["sanity"] == ("warn" if "warn" in statuses else "pass")
        # the FPGA flow ran: a FINN build and attacks on its bit-exact simulation
        assert r["fpga_fps"] > 0 and r["fpga_fits"] and r["hw_n"] == N_HW
        assert (tmp_path / "demo" / r["variant"].lower() / "build" / "Pynq-Z1" / "dataflow_model.onnx").is_file()
        assert r["hw_disagreement"] <= 1 / N_HW  # the accelerator classifies as PyTorch does (one tie at most)
        # robust counts an image right clean and attacked, so it cannot exceed the accelerator's clean accuracy
        assert r["hw_square@8"] <= r["hw_clean"] and r["hw_transfer-pgd@8"] <= r["hw_clean"]
    assert rows["DQ"]["beta"] > 0 == rows["VQ"]["beta"]  # (one epoch is too short to compare their norms)
    out = capsys.readouterr().out
    assert "| VQ | w2a2 |" in out and "| DQ | w2a2 |" in out
    assert (tmp_path / "demo" / "summary.md").read_text().strip() in out
    # running it again reuses the finished runs
    again = run_demo(tmp_path / "demo", epochs=1, n_eval=N, progress=False, fpga=False)
    assert again["rows"][0]["clean_acc"] == summary["rows"][0]["clean_acc"]

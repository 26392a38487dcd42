from __future__ import annotations

from hw_dq.experiments.demo import run_demo


def test_demo_end_to_end_small(tmp_path, capsys):
    summary = run_demo(tmp_path / "demo", epochs=1, n_eval=64, progress=False, n_hw=16)
    names = [r["variant"] for r in summary["rows"]]
    assert names == ["VQ", "DQ"]
    for r in summary["rows"]:
        assert 0.0 <= r["clean_acc"] <= 1.0
        assert all(0.0 <= r[f"fgsm@{e:g}"] <= 1.0 for e in (2.0, 4.0, 8.0))
    assert (tmp_path / "demo" / "vq" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "summary.md").is_file()
    for r in summary["rows"]:  # the FPGA flow ran: a FINN build and attacks on its simulation
        assert r["fpga_fps"] > 0 and r["fpga_fits"]
        assert (tmp_path / "demo" / r["variant"].lower() / "build" / "Pynq-Z1" / "dataflow_model.onnx").is_file()
        assert 0.0 <= r["hw_transfer-pgd@8"] <= 1.0 and 0.0 <= r["hw_square@8"] <= 1.0
        assert "pgd@8" in r and r["sanity"] in ("pass", "warn", "incomplete")
    assert "| VQ | w2a2 |" in capsys.readouterr().out
    # running it again reuses the finished runs
    again = run_demo(tmp_path / "demo", epochs=1, n_eval=64, progress=False, fpga=False)
    assert again["rows"][0]["clean_acc"] == summary["rows"][0]["clean_acc"]

"""Certified-training results of the fifteenth session: each README figure ties to its file, each claim holds.

Reruns, all-images training with 8-bit ends, the float twin (``certify --on sw``) and the best w2a2 certificate
beside seven attacks; the helpers are those of ``tests/test_readme.py``.
"""

from __future__ import annotations

import json

from tests.test_readme import (
    RESULTS,
    _best_committed_certificate,
    _cert,
    _load,
    _pct,
    _results_says,
    _says,
    _sound_beside_seven_attacks,
    _two_se,
)

D = "ibp_tiny_cpu"


def test_the_shipped_config_reruns_bit_for_bit() -> None:
    """``hw-dq train --config certified_cpu`` on the same machine gives the committed run again: every epoch's
    figures but its wall time, and the same images certified at every eps; so does its full-eps fine-tune."""
    for run in ("w2a2-x4-12-e8", "w2a2-x4-12-e8-ft1-50k"):
        old, new = (RESULTS / D / run, RESULTS / D / run / "rerun")
        assert _load(f"{D}/{run}/config.json")["train"] == _load(f"{D}/{run}/rerun/config.json")["train"]
        a, b = ([json.loads(v) for v in (p / "metrics.jsonl").read_text().splitlines()] for p in (old, new))
        assert len(a) == len(b) >= 1
        assert [{k: v for k, v in r.items() if k != "time_s"} for r in a] == [
            {k: v for k, v in r.items() if k != "time_s"} for r in b
        ]
        ca, cb = (_load(f"{D}/{run}/{sub}certified-hw.json") for sub in ("", "rerun/"))
        assert [e["robust_mask"] for e in ca["evaluations"]] == [e["robust_mask"] for e in cb["evaluations"]]
    _results_says(D, "bit for bit")


def test_float_bounds_certify_a_subset_of_the_accelerators_images() -> None:
    """``certify --on sw`` on a quantized run: never an image the integer certificate rejects, and at most
    0.2 points fewer (the float bounds are widened before every quantizer; the integer ones are exact)."""
    for run in ("w2a2-x4-12-e8", "w2a2-x4-12-e8-ft1-50k"):
        hw, sw = (_load(f"{D}/{run}/certified-{t}.json") for t in ("hw", "sw"))
        assert sw["target"] == "sw-certified" and hw["target"] == "hw-certified"
        assert sw["n_examples"] == hw["n_examples"] == 1000 and sw["clean_acc"] == hw["clean_acc"]
        for a, b in zip(hw["evaluations"], sw["evaluations"], strict=True):
            assert a["eps"] == b["eps"]
            assert not any(s == "1" and h == "0" for h, s in zip(a["robust_mask"], b["robust_mask"], strict=True))
            assert 0 <= a["robust_mask"].count("1") - b["robust_mask"].count("1") <= 2
    _results_says(D, "never one the accelerator's certificate rejects")


def test_8_bit_ends_on_all_images_give_the_best_w2a2_certificate() -> None:
    """The all-images w2a2 run with 8-bit ends beats its all-2-bit twin beyond two standard errors at every eps,
    certifies at least as much as the all-images w4a4 run at 2, 4 and 8/255, and is the w2a2 best at 2/255."""
    cfg = _load(f"{D}/w2a2-x4-50k-6-e8/config.json")["train"]
    base = _load(f"{D}/w2a2-x4-50k-6/config.json")["train"]
    # the earlier run also saved a mid-epoch checkpoint every 100 steps, which does not change training
    assert {k for k in cfg if cfg[k] != base.get(k)} == {"end_bits", "checkpoint_every"} and cfg["end_bits"] == 8
    new, old = _load(f"{D}/w2a2-x4-50k-6-e8/certified-hw.json"), _load(f"{D}/w2a2-x4-50k-6/certified-hw.json")
    w4 = _cert(_load(f"{D}/w4a4-x4-50k-6/certified-hw.json"))
    c, c0, n = _cert(new), _cert(old), new["n_examples"]
    for e in (1.0, 2.0, 4.0, 8.0):
        assert c[e] - c0[e] > _two_se(c[e], c0[e], n)
    assert all(c[e] >= w4[e] for e in (2.0, 4.0, 8.0))
    assert c[2.0] == _best_committed_certificate(2.0, wbits=2, n=1000)
    assert c[4.0] == _best_committed_certificate(4.0, n=1000)
    ft = _cert(_load(f"{D}/w2a2-x4-50k-6-e8-ft1/certified-hw.json"))
    assert all(abs(ft[e] - c[e]) < _two_se(ft[e], c[e], n) for e in c)  # one more full-eps epoch: no change
    _says(f"{_pct(c[2.0])} at 2/255, the most any hw-dq w2a2 accelerator certifies there, {_pct(c[4.0])} at 4/255 "
          "(the most of any hw-dq accelerator)")  # fmt: skip
    _results_says(D, f"{_pct(new['clean_acc'])} | {' | '.join(_pct(c[e]) for e in (1.0, 2.0, 4.0, 8.0))} |")


def test_the_float_twin_certifies_more_than_the_w4a4_accelerator() -> None:
    """The float twin of ``w4a4-x4-12`` (only the bit widths differ) certifies more at 2 and 4/255, beyond two
    standard errors, and still under 40% at 2/255; its per-image worst case over six attacks lies at or above
    its certificate, and no attack breaks a certified image."""
    from hw_dq.robust.evaluate import worst_case
    from hw_dq.robust.results import certificate_violations

    cfg, base = (_load(f"{D}/{r}/config.json")["train"] for r in ("fp-x4-12", "w4a4-x4-12"))
    assert {k for k in cfg if cfg[k] != base.get(k)} == {"wbits", "abits"} and cfg["wbits"] is None
    fp, w4 = _load(f"{D}/fp-x4-12/certified-sw.json"), _load(f"{D}/w4a4-x4-12/certified-hw.json")
    c, q, n = _cert(fp), _cert(w4), fp["n_examples"]
    assert fp["target"] == "sw-certified" and n == w4["n_examples"] == 1000
    for e in (2.0, 4.0):
        assert c[e] - q[e] > _two_se(c[e], q[e], n)
    assert c[2.0] < 0.40
    cert500, att = _load(f"{D}/fp-x4-12/certified-sw-500.json"), _load(f"{D}/fp-x4-12/robustness.json")
    c500 = _cert(cert500)
    for e in (2.0, 8.0):
        w = worst_case(att["evaluations"], e)
        assert w["n_examples"] == 500 and len(w["attacks"]) == 6 and c500[e] <= w["robust_acc"]
        assert certificate_violations(cert500, att, e) == []
    _results_says(D, f"{_pct(fp['clean_acc'])} | {' | '.join(_pct(c[e]) for e in (1.0, 2.0, 4.0, 8.0))} |",
                  f"is {_pct(worst_case(att['evaluations'], 2.0)['robust_acc'])} at 2/255 and "
                  f"{_pct(worst_case(att['evaluations'], 8.0)['robust_acc'])} at 8/255 (certified on the same images: "
                  f"{_pct(c500[2.0])} and {_pct(c500[8.0])}")  # fmt: skip


def test_the_best_w2a2_certificates_are_sound_beside_seven_attacks() -> None:
    """The 12-epoch full-eps fine-tune and the all-images run: no attack breaks a certified image, the README's
    rows are the files', and Square on the accelerator leaves less than every gradient attack."""
    for run in ("w2a2-x4-12-e8-ft1-50k", "w2a2-x4-50k-6-e8"):
        c, worst, _ = _sound_beside_seven_attacks(f"{D}/{run}")
        clean = _load(f"{D}/{run}/certified-hw-500.json")["clean_acc"]
        cells = [_pct(v) for v in (clean, worst[2.0]["robust_acc"], c[2.0], worst[8.0]["robust_acc"], c[8.0])]
        _results_says(D, f"(`{run}/`) | {' | '.join(cells)} |")
        for e in (2.0, 8.0):  # Square on the accelerator is the strongest of the seven
            per = worst[e]["per_attack"]
            assert per["square"] == min(per.values()) < min(v for k, v in per.items() if k != "square")
    # after the loop: the all-images run
    _says(f"seven attacks leave it {_pct(worst[2.0]['robust_acc'])} at 2/255 against a certified {_pct(c[2.0])} "
          f"and break no certified image: its robustness there is known to within "
          f"{100 * (worst[2.0]['robust_acc'] - c[2.0]):.1f} points")  # fmt: skip


def test_the_all_images_float_twin_certifies_more_at_2_and_less_at_8() -> None:
    """The float twin of ``w4a4-x4-50k-6`` (only the bit widths differ): more certified at 2/255 than the w4a4
    and the 8-bit-end w2a2 accelerators beyond two standard errors, less at 8/255 than the w2a2 one, under 40%."""
    cfg, base = (_load(f"{D}/{r}/config.json")["train"] for r in ("fp-x4-50k-6", "w4a4-x4-50k-6"))
    assert {k for k in cfg if cfg[k] != base.get(k)} == {"wbits", "abits"} and cfg["wbits"] is None
    fp = _load(f"{D}/fp-x4-50k-6/certified-sw.json")
    c, n = _cert(fp), fp["n_examples"]
    w4, w2 = (_cert(_load(f"{D}/{r}/certified-hw.json")) for r in ("w4a4-x4-50k-6", "w2a2-x4-50k-6-e8"))
    for q in (w4, w2):
        assert c[2.0] - q[2.0] > _two_se(c[2.0], q[2.0], n)
    assert w2[8.0] - c[8.0] > _two_se(c[8.0], w2[8.0], n) and c[2.0] < 0.40
    _results_says(D, f"certifies {_pct(fp['clean_acc'])} clean, "
                  f"{' / '.join(f'{100 * c[e]:.1f}' for e in (1.0, 2.0, 4.0, 8.0))}% at 1 / 2 / 4 / 8/255")  # fmt: skip
    _says(f"certifies {_pct(c[2.0])} at 2/255 against the w4a4 accelerator's {_pct(w4[2.0])}")

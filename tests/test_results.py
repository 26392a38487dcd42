"""The results schema: validation, loading, tabulating."""

from __future__ import annotations

import copy
import json

import pytest

from hw_dq.robust.results import SCHEMA, SchemaError, headline, load, tabulate, validate


def example() -> dict:
    ev = [
        {"attack": a, "kind": k, "norm": "Linf", "eps": e, "robust_acc": acc, "n_examples": 100, "seed": 0,
         "wall_s": 1.5, "max_perturbation": e / 255, "params": {"steps": 10}, "breakdown": {}}
        for a, k, e, acc in [("fgsm", "white", 8.0, 0.3), ("pgd", "white", 8.0, 0.2), ("square", "black", 8.0, 0.25),
                             ("pgd", "white", 2.0, 0.5)]
    ]  # fmt: skip
    return {
        "schema": SCHEMA, "name": "robustness", "created": "2025-01-01T00:00:00Z", "hw_dq_version": "0.1.0",
        "run_dir": "runs/x", "model": "cnv", "width": 0.5, "mode": "DQ", "wbits": 2, "abits": 2, "beta": 3e-3,
        "lipschitz_target": "bn_folded", "adv_train": "none", "adv_eps": None, "defense": None,
        "dataset": "cifar10[:100]", "split": "test", "n_examples": 100, "seed": 0, "threat_model": "Linf",
        "eps_units": "1/255", "clean_acc": 0.6, "evaluations": ev, "headline": headline(ev),
        "sanity": {"verdict": "pass", "checks": [{"name": "x", "status": "pass", "evidence": "y"}]},
    }  # fmt: skip


def test_valid_example_and_headline_is_lowest_at_8():
    r = validate(example())
    assert r["headline"] == {"eps": 8.0, "robust_acc": 0.2, "attack": "pgd"}


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda r: r.pop("clean_acc"), "clean_acc"),
        (lambda r: r.update(clean_acc=1.5), "fraction"),
        (lambda r: r.update(schema="other/v0"), "schema"),
        (lambda r: r.update(mode="XQ"), "mode"),
        (lambda r: r.update(n_examples="100"), "n_examples"),
        (lambda r: r["evaluations"][0].pop("wall_s"), "wall_s"),
        (lambda r: r["evaluations"][1].update(kind="grey"), "kind"),
        (lambda r: r["evaluations"][1].update(robust_acc=-0.1), "fraction"),
        (lambda r: r["sanity"].update(verdict="ok"), "verdict"),
        (lambda r: r["sanity"]["checks"].append({"name": "z", "status": "fail", "evidence": ""}), "status"),
    ],
)
def test_invalid_results_are_rejected(mutate, needle):
    r = copy.deepcopy(example())
    mutate(r)
    with pytest.raises(SchemaError, match=needle):
        validate(r)


def test_load_directory_and_tabulate(tmp_path):
    (tmp_path / "a" / "attacks").mkdir(parents=True)
    (tmp_path / "a" / "attacks" / "robustness.json").write_text(json.dumps(example()))
    (tmp_path / "a" / "config.json").write_text("{}")  # not a results file: ignored
    other = example()
    other.update(mode="VQ", beta=0.0, defense="bits:4")
    (tmp_path / "b.json").write_text(json.dumps(other))
    rs = load([tmp_path / "a", tmp_path / "b.json"])
    assert [r["mode"] for r in rs] == ["DQ", "VQ"]
    text = tabulate(rs)
    row = "| cnv | DQ | w2a2 | 0.003 | none | - | PyTorch | 100 | 60.0 | 30.0 | 50.0 | 20.0 | 25.0 | 20.0 (pgd) | pass"
    assert row in text
    assert "bits:4" in text


def test_load_rejects_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SchemaError, match="not valid JSON"):
        load([tmp_path / "bad.json"])
    with pytest.raises(Exception, match="no such"):
        load([tmp_path / "missing.json"])


def test_worst_case_is_per_image_and_becomes_the_headline():
    from hw_dq.robust.evaluate import headline as worst_headline
    from hw_dq.robust.evaluate import worst_case

    r = example()
    masks = {"fgsm": "1100110011", "pgd": "1010101010", "square": "1111000011"}
    ev = [dict(e, n_examples=10, robust_mask=masks[e["attack"]], robust_acc=masks[e["attack"]].count("1") / 10)
          for e in r["evaluations"] if e["eps"] == 8.0]  # fmt: skip
    w = worst_case(ev, 8.0)
    # survives all three only at positions 0 and 8: 20%, below every attack's own number (40%..60%)
    assert w["robust_acc"] == 0.2 and w["attacks"] == ["fgsm", "pgd", "square"]
    assert w["per_attack"] == {"fgsm": 0.6, "pgd": 0.5, "square": 0.6}
    assert worst_headline(ev)["robust_acc"] == 0.2 < min(e["robust_acc"] for e in ev)
    r.update(evaluations=ev, n_examples=10, headline=worst_headline(ev), worst_case=[w])
    validate(r)
    bad = copy.deepcopy(r)
    bad["evaluations"][0]["robust_mask"] = "11"
    with pytest.raises(SchemaError, match="robust_mask"):
        validate(bad)


def test_worst_case_names_the_attacks_it_cannot_combine_image_by_image():
    from hw_dq.robust.evaluate import worst_case
    from hw_dq.robust.results import describe

    ev = [
        {"attack": "pgd", "eps": 8.0, "robust_acc": 0.5, "robust_mask": "1010101010"},
        {"attack": "square", "eps": 8.0, "robust_acc": 0.6, "robust_mask": "1111000011"},
        {"attack": "hsj", "eps": 8.0, "robust_acc": 0.0, "robust_mask": "0000"},  # another image set
    ]
    w = worst_case(ev, 8.0)
    # the ten-image set has two attacks: it is the one combined, and the four-image attack is named
    assert w["n_examples"] == 10 and w["attacks"] == ["pgd", "square"] and w["robust_acc"] == 0.3
    assert w["excluded"] == [{"attack": "hsj", "n_examples": 4}]
    r = example()
    r.update(worst_case=[w])
    assert "not combined (other image count): hsj (n=4)" in describe(r)


def test_certificate_violations_are_the_certified_images_an_attack_broke():
    from hw_dq.robust.results import certificate_violations

    def result(masks: dict[str, str], n: int = 10, seed: int = 0) -> dict:
        ev = [{"attack": a, "norm": "Linf", "eps": 2.0, "robust_acc": m.count("1") / n, "robust_mask": m}
              for a, m in masks.items()]  # fmt: skip
        return {"n_examples": n, "seed": seed, "evaluations": ev}

    cert = result({"interval-certificate": "1100100000"})
    attacked = result({"pgd": "1110101010", "square": "1101100011"})
    assert certificate_violations(cert, attacked, 2.0) == []  # 0, 1 and 4 survive both attacks
    broken = result({"pgd": "1110001010", "square": "1011100011"})
    assert certificate_violations(cert, broken, 2.0) == [1, 4]  # square broke 1, pgd broke 4
    with pytest.raises(SchemaError, match="same --n and --seed"):
        certificate_violations(cert, result({"pgd": "1" * 12}, n=12), 2.0)
    with pytest.raises(SchemaError, match="no per-image flags at eps 8"):
        certificate_violations(cert, attacked, 8.0)

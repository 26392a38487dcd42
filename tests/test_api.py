"""The Python API: the README's example runs as written; ``import hw_dq`` stays cheap; errors are HwDqError."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hw_dq.errors import ConfigError
from tests.conftest import ROOT


def readme_example() -> str:
    """The first python block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Python API section has no python code block"
    return blocks[0]


def test_readme_example_runs(tmp_path: Path) -> None:
    code = readme_example()
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"clean (\d+\.\d)%, FGSM 8/255 (\d+\.\d)%", proc.stdout)
    assert m, proc.stdout
    clean, fgsm = float(m.group(1)), float(m.group(2))
    assert fgsm <= clean  # an attack never raises accuracy
    run = tmp_path / "runs" / "api-example"  # the example writes under runs/ of the current folder
    assert (run / "model.safetensors").is_file() and (run / "attacks" / "robustness.json").is_file()


def test_import_is_cheap_and_lazy() -> None:
    code = (
        "import sys, hw_dq; assert 'torch' not in sys.modules, 'import hw_dq imported torch';"
        "import hw_dq.api as api; assert 'torch' not in sys.modules, 'import hw_dq.api imported torch';"
        "assert hw_dq.attack is api.attack and hw_dq.export is api.export and hw_dq.simulate is api.simulate;"
        "assert 'attack' in dir(hw_dq)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import hw_dq

    with pytest.raises(AttributeError):
        hw_dq.no_such_function  # noqa: B018


def test_package_reexports_exactly_the_api_but_train() -> None:
    """``hw_dq``'s lazy names are written out (importing ``api`` to derive them would undo the lazy
    import); this keeps the two lists from drifting apart."""
    import hw_dq
    import hw_dq.api as api

    assert set(hw_dq._API) == set(api.__all__) - {"train"}
    assert all(getattr(hw_dq, name) is getattr(api, name) for name in hw_dq._API)


def test_api_functions_are_documented_and_typed() -> None:
    import inspect

    from hw_dq import api

    for name in api.__all__:
        fn = getattr(api, name)
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, name
        if inspect.isfunction(fn):
            sig = inspect.signature(fn)
            assert sig.return_annotation is not inspect.Signature.empty, name
            untyped = [p for p in sig.parameters.values() if p.annotation is inspect.Parameter.empty]
            assert not untyped, (name, untyped)


def test_api_user_errors_are_hwdq_errors(tmp_path: Path) -> None:
    from hw_dq import api

    with pytest.raises(ConfigError, match="does not take defense"):
        api.attack(tmp_path, attacks=["square"], on="hw", defense="bits:4")
    with pytest.raises(ConfigError, match="unknown target"):
        api.attack(tmp_path, on="fpga")
    with pytest.raises(ConfigError, match="needs rates"):
        api.faults(tmp_path)
    with pytest.raises(ConfigError, match="unknown config key|unknown option"):
        api.train(tmp_path / "r", no_such_option=1)


def test_the_sweep_is_in_the_api_and_refuses_a_bad_spec(tmp_path) -> None:
    import hw_dq
    from hw_dq import api
    from hw_dq.errors import ConfigError

    assert hw_dq.sweep is api.sweep and hw_dq.sweep_report is api.sweep_report
    bad = tmp_path / "spec.json"
    bad.write_text('{"no_such_key": 1}')
    with pytest.raises(ConfigError, match="no_such_key"):
        api.sweep(bad, tmp_path / "sweep")
    assert not (tmp_path / "sweep" / "study.db").exists()

"""``python -m agentforge.phases.<name>``: every phase runs alone with the same command line."""

import json
import runpy
import sys
import warnings

import pytest

from agentforge.pipeline import default_phases


def _cli(module_name: str, argv: list[str]):
    """What ``python -m module_name *argv`` does, in this process."""
    saved = sys.argv
    sys.argv = [module_name, *argv]
    try:
        with warnings.catch_warnings():  # runpy warns that the module is already imported
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module(module_name, run_name="__main__")
    finally:
        sys.argv = saved


@pytest.mark.parametrize("spec", default_phases(), ids=lambda s: s.name)
def test_help_names_the_phase_and_its_inputs(spec, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli(spec.run.__module__, ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"python -m agentforge.phases.{spec.name}" in text
    for name in spec.needs:
        assert f"--{name}" in text


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--set", "no_such_setting=1"], "cognate: unknown setting 'no_such_setting'"),
        (["--set", "trunk_steps"], "expected KEY=VALUE"),
        (["--set", "trunk_steps=[1"], "not valid YAML"),
        (["--set", "trunk_steps=long"], "cognate.trunk_steps: expected an int in [1, 10000000], got 'long'"),
        (["--set", "cognate.trunk_steps=0"], "cognate.trunk_steps: expected an int in [1, 10000000], got 0"),
        (["--set", "data.seq_len=4"], "data.seq_len: expected an int in [8, 8192], got 4"),
        (["--preset", "huge"], "invalid choice: 'huge'"),
    ],
)
def test_bad_settings_exit_2_before_anything_is_written(bad, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli("agentforge.phases.cognate", ["--out", str(tmp_path / "out"), *bad])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_finished_phase_reruns_from_its_directory_and_prints_its_metrics(cognate_micro, capsys):
    from agentforge.phases import cognate

    out, result = cognate_micro
    assert cognate.main(["--preset", "micro", "--out", str(out)]) == 0
    text = "\n" + capsys.readouterr().out  # progress lines, then the metrics as JSON
    printed = json.loads(text[text.rindex("\n{\n") + 1 :])
    assert printed.keys() == result.metrics.keys()

"""The agentforge command line: --help on every command (no reST markup shown); bad input ends with
one line on stderr, exit code 2 and nothing written; a failure while working with one line and exit
code 1; a missing optional package names its extra; a closed pipe ends quietly; the kernels import
with torch alone; and status, models and report on a finished run (of the small test phases, run
in-process)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentforge import cli, pipeline, rundir
from agentforge.artifacts import CorruptArtifact
from agentforge.report import write_report
from pipeline_helpers import ENV, TEST_PHASES, agentforge, tree

pytestmark = pytest.mark.usefixtures("one_thread")


def main(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def test_phases(monkeypatch):
    """The commands see the test pipeline (seedling -> polish) instead of the real one."""
    monkeypatch.setattr(pipeline, "default_phases", lambda: list(TEST_PHASES))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    pipeline.execute(
        pipeline.prepare(out=run_dir, preset="micro", phases=TEST_PHASES),
        progress=False,
        say=lambda _: None,
        on_change=write_report,
    )
    return run_dir


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: agentforge {command}")
    assert "``" not in out  # the module docstrings' reST literals are shown as `literal`


def test_help_shows_literals_in_single_backticks(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert "`agentforge generate TARGET --prompt TEXT`: open a model with `agentforge.load`" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_python_dash_m_runs_the_command_line():
    proc = agentforge("status")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split()[:3] == ["01", "cognate", "a"]
    assert "08  compression" in proc.stdout


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line, nothing written


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "micro", "--set", "cognate.trunk_stepz=3"], "cognate: unknown setting 'trunk_stepz'; allowed: "),
        (
            ["--preset", "micro", "--set", "cognate.trunk_steps=many"],
            "cognate.trunk_steps: expected an int in [1, 10000000], got 'many'",
        ),
        (
            ["--preset", "micro", "--set", "cognate.vocab_size=1000000000"],
            "cognate.vocab_size: expected an int in [258, 65536], got 1000000000",
        ),
        (
            ["--preset", "micro", "--set", "cognate.batch_size=0"],
            "cognate.batch_size: expected an int in [1, 65536], got 0",
        ),
        (
            ["--preset", "micro", "--set", "cognate.model_preset=bogus"],
            "cognate.model_preset: expected one of micro, tiny, small, got 'bogus'",
        ),
        (["--preset", "huge"], "unknown preset 'huge'; allowed: micro, tiny, small"),
        (["--set", "quietstep.steps=3"], "--set quietstep.steps=3: unknown config key 'quietstep'; allowed: "),
        (["--from", "cognat"], "--from: unknown phase 'cognat'; phases: cognate, evomerge, quietstar,"),
        (["--from", "evomerge", "--to", "cognate"], "--from evomerge comes after --to cognate"),
    ],
)
def test_a_bad_config_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code, stdout, stderr = main(capsys, "run", "--out", out, *args)
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"agentforge run: error: {message}") and stderr.count("\n") == 1
    assert not out.exists()


def test_a_bad_config_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("preset: micro\ncognate:\n  trunk_steps: 1.5\n")
    code, _, stderr = main(capsys, "run", "--out", tmp_path / "run", "--config", path)
    assert (code, stderr) == (
        2,
        "agentforge run: error: cognate.trunk_steps: expected an int in [1, 10000000], got 1.5\n",
    )
    assert not (tmp_path / "run").exists()


def test_a_missing_input_artifact_is_one_line_and_writes_nothing(tmp_path, capsys, test_phases):
    code, _, stderr = main(capsys, "run", "--out", tmp_path / "run", "--preset", "micro", "--from", "polish")
    assert code == 2 and stderr.count("\n") == 1
    assert stderr.startswith(
        f"agentforge run: error: polish needs seedling.model, but {tmp_path / 'run'} "
        "holds no completed seedling phase; run seedling first"
    )
    assert not (tmp_path / "run").exists()


def test_a_run_directory_held_by_another_run_is_refused_untouched(finished_run, capsys, test_phases):
    with rundir.RunLock(finished_run):  # this test process plays the other run
        before = tree(finished_run)
        code, _, stderr = main(capsys, "run", "--resume", finished_run)
        status = main(capsys, "status", finished_run)[1]
        after = tree(finished_run)
    assert code == 2
    assert stderr == f"agentforge run: error: {finished_run} is held by another run (pid {os.getpid()})\n"
    assert f"running (pid {os.getpid()})" in status.splitlines()[0]
    assert after == before


def test_a_new_run_refuses_a_directory_that_holds_one(finished_run, capsys, test_phases):
    code, _, stderr = main(capsys, "run", "--out", finished_run)
    assert code == 2 and stderr == (
        f"agentforge run: error: {finished_run} already holds a run; continue it with "
        f"--resume {finished_run}, or choose another --out\n"
    )
    code, _, stderr = main(capsys, "run", "--resume", finished_run.parent / "nothing")
    assert code == 2 and "no run there" in stderr


# ---------------------------------------------------------------------------------------------
# failures while working: exit 1, one line; --debug shows the traceback


def test_a_failure_is_one_line_with_exit_code_1_and_debug_shows_the_traceback(finished_run, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(finished_run / "02-polish" / "model", model)
    (model / "config.json").write_text("{}")
    code, _, stderr = main(capsys, "generate", model, "--prompt", "hi")
    assert code == 1 and stderr.count("\n") == 1
    assert stderr.startswith(
        f"agentforge generate: error: CorruptArtifact: {model}: config.json has changed since it was written"
    ) and stderr.endswith("(--debug shows the traceback)\n")
    with pytest.raises(CorruptArtifact):
        cli.main(["generate", str(model), "--prompt", "hi", "--debug"])


def test_generate_refuses_a_model_without_a_tokenizer_and_an_unknown_model(finished_run, capsys, test_phases):
    code, _, stderr = main(capsys, "generate", finished_run / "polish", "--prompt", "hi")
    assert code == 2 and stderr.endswith("the model has no tokenizer, so it cannot read a prompt\n")
    code, _, stderr = main(capsys, "generate", finished_run / "polish", "--artifact", "other", "--prompt", "hi")
    assert (code, stderr) == (
        2,
        f"agentforge generate: error: {finished_run / '02-polish'}: choose the artifact to "
        "load with artifact=... (it holds: model)\n",
    )


# ---------------------------------------------------------------------------------------------
# status, models, report


def test_status_lists_each_phase_of_a_run(finished_run, capsys, test_phases):
    code, out, _ = main(capsys, "status", finished_run)
    lines = out.splitlines()
    assert code == 0 and lines[0].endswith(f"in {finished_run}: completed")
    assert lines[1].startswith("preset micro, seed 0; created ")
    assert lines[3].split()[:3] == ["01", "seedling", "completed"]
    assert lines[4].split()[:3] == ["02", "polish", "completed"] and lines[4].split()[-2:] == [
        "seedling.model",
        "model",
    ]
    assert len(lines) == 5


def test_models_lists_the_registry(finished_run, capsys, test_phases):
    code, out, _ = main(capsys, "models", finished_run)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["model", "parameters", "bytes", "sha256", "parents", "path"]
    assert [line.split()[0] for line in lines[1:]] == ["seedling/model", "polish/model"]
    assert lines[2].split()[4:] == ["seedling/model", "02-polish/model"]
    code, out, _ = main(capsys, "models", finished_run, "--json")
    assert [m["id"] for m in json.loads(out)] == ["seedling/model", "polish/model"]


def test_report_regenerates_the_page(finished_run, capsys, test_phases):
    (finished_run / "report.html").unlink()
    code, out, _ = main(capsys, "report", finished_run)
    assert code == 0 and out == f"{finished_run / 'report.html'}\n"
    assert (finished_run / "report.html").stat().st_size > 10_000


def test_online_wandb_without_a_key_fails_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B login
    code, _, stderr = main(capsys, "run", "--out", tmp_path / "run", "--preset", "micro", "--wandb", "online")
    assert code == 2 and stderr == (
        "agentforge run: error: W&B mode online needs an API key: run `wandb login` or set "
        "WANDB_API_KEY (or use --wandb offline)\n"
    )
    assert not (tmp_path / "run").exists()


def test_status_verify_lists_every_mismatch(finished_run, tmp_path, capsys, test_phases):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    assert main(capsys, "status", run_dir, "--verify")[0] == 0
    summary = run_dir / "02-polish" / "summary.json"
    summary.write_text(summary.read_text().replace("final_loss", "final_lost"))  # an edited report
    seedling = run_dir / "01-seedling" / "phase.json"
    record = json.loads(seedling.read_text())
    record["files"]["model/config.json"] = "0" * 64  # a record edited to match other weights
    seedling.write_text(json.dumps(record))
    code, out, _ = main(capsys, "status", run_dir, "--verify")
    assert code == 1
    assert "01-seedling: model/config.json has changed since it was written" in out
    assert "02-polish: summary.json has changed since it was written" in out
    assert "02-polish: its input model (seedling.model) is not the artifact it consumed any more" in out


# ---------------------------------------------------------------------------------------------
# the environment: optional packages, pipes


def with_blocked(packages, *code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Python code run in a subprocess where importing any of ``packages`` fails as if it were not
    installed (``sys.modules[name] = None`` makes the import raise ModuleNotFoundError)."""
    block = f"import sys\nfor name in {sorted(packages)!r}:\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", block + "\n".join(code)], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def command_with_blocked(packages, *args: str) -> subprocess.CompletedProcess:
    """``python -m agentforge ARGS`` with ``packages`` not importable."""
    return with_blocked(
        packages,
        "import runpy",
        f"sys.argv = ['agentforge', *{list(map(str, args))!r}]",
        "runpy.run_module('agentforge', run_name='__main__')",
    )


@pytest.mark.parametrize(
    "package, args",
    [
        ("transformers", ["run", "--preset", "micro", "--print-config", "--out", "NEW"]),
        ("yaml", ["status"]),
        ("transformers", ["chat", "RUN/02-polish", "--message", "hi"]),
    ],
)
def test_a_missing_optional_package_names_its_extra(package, args, finished_run, tmp_path):
    proc = command_with_blocked(
        [package], *[a.replace("NEW", str(tmp_path / "run")).replace("RUN", str(finished_run)) for a in args]
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (
        f"agentforge {args[0]} needs the pipeline extra ({package} is not installed): "
        "pip install 'agentforge-ternary[pipeline]'\n"
    )
    assert not (tmp_path / "run").exists()


def test_the_extras_named_are_pyprojects():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == cli.DISTRIBUTION
    import_names = {"pyyaml": "yaml"}  # the distributions whose import name is not their own
    listed = {}
    for extra in ("pipeline", "smol"):
        for requirement in pyproject["project"]["optional-dependencies"][extra]:
            name = requirement.split("=")[0].split(">")[0].split("<")[0].split("[")[0].strip().lower()
            listed[import_names.get(name, name.replace("-", "_"))] = extra
    assert listed == cli.EXTRA_OF


def test_the_kernels_import_and_run_with_torch_alone():
    """`import agentforge`, `agentforge.ops` and `agentforge.nn` import nothing beyond torch (no numpy
    either: torch does not require it); BitLinear trains and runs packed; `agentforge bench` runs."""
    blocked = [*cli.EXTRA_OF, "numpy", "pytest", "hypothesis"]
    proc = with_blocked(
        blocked,
        """
import torch, agentforge, agentforge.ops, agentforge.nn
from agentforge.nn import BitLinear, convert_to_bitnet, pack_bitnet
model = convert_to_bitnet(torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 32)))
model(torch.randn(4, 64)).pow(2).mean().backward()
assert all(p.grad is not None for p in model.parameters())
pack_bitnet(model)
with torch.no_grad():
    y = model(torch.randn(4, 64))
assert y.shape == (4, 32) and torch.isfinite(y).all() and isinstance(model[0], BitLinear)
print("ok", agentforge.extension_loaded())
""",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok True\n"
    proc = command_with_blocked(blocked, "bench", "--shapes", "128x128", "--m", "1", "--reps", "1", "--no-per-core")
    assert proc.returncode == 0, proc.stderr
    assert "128x128" in proc.stdout


def closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """``python -m agentforge ARGS`` writing to a pipe whose reader has already gone, as in
    ``agentforge status | head`` once head has exited."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "agentforge", *map(str, args)],
            stdout=write,
            stderr=subprocess.PIPE,
            env=ENV,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write)


@pytest.mark.parametrize(
    "args, codes",
    [(["status"], {141}), (["models", "--json", "RUN"], {141}), (["--help"], {0, 141})],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_a_closed_pipe_ends_the_command_quietly(args, codes, finished_run):
    """Exit code 141 as SIGPIPE ends a POSIX tool, and no traceback; argparse's --help ignores the
    failed write itself (exit 0)."""
    proc = closed_pipe(*[finished_run if a == "RUN" else a for a in args])
    assert proc.returncode in codes and proc.stderr == ""


def test_a_pipe_read_to_its_end_exits_0(finished_run):
    proc = subprocess.run(
        f"{sys.executable} -m agentforge models --json {finished_run} | cat > /dev/null; echo ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (proc.stdout, proc.stderr) == ("0\n", "")

"""Options generated from the config dataclasses (cli/options.py) for `ola precompute` and `ola probe`."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from typer.testing import CliRunner

from olavlm.cli.app import app


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_help_lists_every_config_field():
    from olavlm.pipeline.precompute import PrecomputeConfig
    from olavlm.trainer.eval.probe import ProbeConfig

    for command, cls, skip in (
        ("precompute", PrecomputeConfig, {"corpus", "cache", "overrides"}),
        ("probe", ProbeConfig, set()),
    ):
        text = invoke(command, "--help").output
        for f in dataclasses.fields(cls):
            if f.name not in skip:
                assert f"--{f.name.replace('_', '-')}" in text, (command, f.name)


def test_type_errors_name_the_option(tmp_path):
    result = invoke(
        "probe", str(tmp_path), "--data", "d", "--cache", "c", "--out", str(tmp_path), "--steps", "abc"
    )
    assert result.exit_code == 2 and "--steps" in result.output and "'abc'" in result.output
    result = invoke("precompute", str(tmp_path), str(tmp_path / "c"), "--batch-size", "1.5")
    assert result.exit_code == 2 and "--batch-size" in result.output


def test_ola_help_imports_neither_torch_nor_the_pipeline():
    script = (
        "import sys\nfrom typer.main import get_command\nfrom olavlm.cli.app import app\nget_command(app)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'numpy')"
        " or m.startswith(('olavlm.pipeline', 'olavlm.trainer'))))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_only_the_projects_own_errors_become_one_line():
    import pytest
    import typer

    from olavlm.cli.errors import user_errors
    from olavlm.schemas.errors import ConfigError

    with pytest.raises(typer.Exit) as exit_:
        with user_errors():
            raise ConfigError("train.steps: expected an integer")
    assert exit_.value.exit_code == 2
    with pytest.raises(ValueError, match="a bug"):  # anything else keeps its traceback
        with user_errors():
            raise ValueError("a bug")


def test_user_errors_of_the_data_path_and_storage_are_ola_errors():
    import pickle

    from olavlm.schemas.errors import DataError, OlaError, UnsafeNameError
    from olavlm.trainer.data.join import DataError as JoinDataError
    from olavlm.trainer.data.text import TextError

    assert JoinDataError is DataError  # re-exported where it was
    assert issubclass(TextError, OlaError) and issubclass(UnsafeNameError, OlaError)
    error = pickle.loads(pickle.dumps(DataError("bad_json", "k1", "s0", "no json member")))
    assert isinstance(error, OlaError) and (error.reason, error.key, error.shard) == ("bad_json", "k1", "s0")
    assert str(error) == "no json member (key 'k1', shard 's0')"


def test_fixed_choices_are_listed_and_checked():
    text = invoke("train", "--help").output
    assert "[pt|vpt|ift]" in text and "[error|skip]" in text and "[''|crop|pad]" in text
    result = invoke("train", "--stage", "sft", "--print-config")
    assert result.exit_code == 2 and "--stage" in result.output and "'sft'" in result.output


def test_help_paragraphs_reflow_to_the_terminal_width():
    """A docstring's line breaks are not kept: they would break lines mid-sentence at any other width."""
    from olavlm.cli.app import groups
    from olavlm.cli.groups import reflow_help

    assert (
        reflow_help("One\ntwo.\n\n- a\n  b\n- c\n\n    code\n    more")
        == "One two.\n\n- a b\n- c\n\n    code\n    more"
    )
    for group in (app, groups.corpus, groups.cache, groups.bench):
        for info in group.registered_commands:
            for paragraph in (info.help or "").split("\n\n"):
                assert "\n" not in paragraph, (info.name, paragraph)
    # A lazily built command (its options come from a config class) too, rendered wide:
    text = invoke("probe", "--help").output
    assert "train a resampler probe to predict the teacher's cached target from that layer's hidden" in text

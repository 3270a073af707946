"""Every flag of every diffseg-* command has a description and shows its default in --help."""

from __future__ import annotations

import re

import pytest

from napari_diffseg import checkpoint, cli, evaluate, sample, synthetic, train

COMMANDS = {
    "diffseg-sample": (sample.main, sample.build_parser),
    "diffseg-eval": (evaluate.main, evaluate.build_parser),
    "diffseg-phantoms": (synthetic.main, synthetic.build_parser),
    "diffseg-train": (train.main, train.build_parser),
}


def help_entries(text: str) -> dict[str, tuple[str, str]]:
    """option -> (invocation, description) from argparse's help layout.

    An entry starts with two spaces and a dash; the description follows after two or more
    spaces on that line or on the next, more indented, lines."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            invocation, _, description = line[2:].partition("  ")
            current = invocation.split()[0].rstrip(",")
            entries[current] = [invocation.strip(), description.strip()]
        elif current and re.match(r"^\s{4,}\S", line):
            entries[current][1] = f"{entries[current][1]} {line.strip()}".strip()
        else:
            current = None
    return {option: (invocation, description) for option, (invocation, description) in entries.items()}


def command_help(main, monkeypatch, capsys) -> str:
    monkeypatch.setenv("COLUMNS", "250")  # argparse wraps at the terminal width: one line per flag
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_has_a_description_and_its_default(command, monkeypatch, capsys):
    main, build_parser = COMMANDS[command]
    text = command_help(main, monkeypatch, capsys)
    entries = help_entries(text)
    parser = build_parser()
    assert f"usage: {command}" in text
    assert len(entries) >= 5, text
    undescribed, no_default = [], []
    for option, (invocation, description) in entries.items():
        if option == "-h":
            continue
        if not description:
            undescribed.append(option)
        default = parser.get_default(option.lstrip("-").replace("-", "_"))
        switch = invocation == option  # takes no value: a store_true whose default False says nothing
        if default is not None and not (switch and default is False) and "default" not in description.lower():
            no_default.append(option)
    assert not undescribed, f"{command}: flags without a description: {undescribed}"
    assert not no_default, f"{command}: flags whose default is not shown: {no_default}"
    assert "(default: None)" not in text  # "None" tells the user nothing


def test_defaults_shown_are_the_real_ones(monkeypatch, capsys):
    entries = help_entries(command_help(sample.main, monkeypatch, capsys))
    assert entries["--num_ensemble"][1].endswith("(default: 5)")
    assert entries["--out_dir"][1].endswith("(default: results)")
    # diffseg-sample reads model flags only for a reference checkpoint: None unless given,
    # then the flags JSON's or the reference's defaults, which the help names.
    assert entries["--num_channels"][1].endswith(f"else {checkpoint.MODEL_FLAG_DEFAULTS['num_channels']})")
    assert "default" not in entries["--save_samples"][1]
    entries = help_entries(command_help(evaluate.main, monkeypatch, capsys))
    assert entries["--ensemble_sizes"][1].endswith("(default: 1,2,5,10)")
    assert entries["--max_cases"][1] == "evaluate at most this many labelled cases"


def test_model_flags_all_described():
    assert set(cli.MODEL_FLAG_HELP) == set(checkpoint.MODEL_FLAG_DEFAULTS)
    parser = cli.make_parser("x", "x")
    cli.add_model_flags(parser)
    text = parser.format_help()
    assert "--learn_sigma BOOL" in text and "(default: False)" in text
    assert "(default: '')" in text  # channel_mult: an empty string is shown as such

"""The CLI parser and formatting helpers, and Queue's input checks that need no database:
no fork, no disk."""

from __future__ import annotations

import pytest

from supervisor import Queue, cli, config
from supervisor.errors import InputError


@pytest.fixture
def cfg(tmp_path):
    return config.load(None, env={}).with_database(tmp_path / "never.db")


@pytest.mark.parametrize("argv", [
    ["--db", "a.db", "--config", "c.toml", "list"],
    ["list", "--db", "a.db", "--config", "c.toml"],
    ["--db", "other.db", "list", "--db", "a.db", "--config", "c.toml"],
])
def test_global_options_before_or_after_the_command(argv):
    args = cli.build_parser().parse_args(argv)
    assert (args.command, args.db, args.config) == ("list", "a.db", "c.toml")


def test_global_options_are_optional():
    args = cli.build_parser().parse_args(["status"])
    assert getattr(args, "db", None) is None and getattr(args, "config", None) is None


def test_durations_are_accepted_for_time_options():
    args = cli.build_parser().parse_args(["enqueue", "t", "--delay", "5m", "--timeout", "90"])
    assert (args.delay, args.timeout) == (300.0, 90.0)
    assert cli.build_parser().parse_args(["prune", "--older-than", "7d"]).older_than == 604800


def test_usage_errors_are_one_line(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taskvisor: error: ") and err.count("\n") == 1


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "enqueue" in capsys.readouterr().out


def test_commands_are_a_registry():
    assert {"enqueue", "list", "show", "status", "wait", "cancel", "retry", "prune", "migrate",
            "check-config", "run", "demo", "send-event", "limits", "schedules", "watch",
            "logs"} == set(cli.COMMANDS)


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (59.4, "59s"), (61, "1m"), (7200, "2h"),
                                           (3 * 86400, "3d")])
def test_age(seconds, text):
    assert cli._age(seconds) == text
    assert cli._age(seconds, signed=True) == f"{text} ago"
    assert cli._age(-seconds, signed=True) == f"in {text}"


def test_truncate_makes_one_short_line():
    assert cli._truncate("a\nb  c", 10) == "a b c"
    assert cli._truncate("x" * 20, 10) == "x" * 9 + "…"


def test_queue_checks_input_before_opening_the_database(cfg):
    q = Queue(cfg)
    with pytest.raises(InputError):
        q.enqueue("t", ["not", "an", "object"])
    with pytest.raises(InputError):
        q.list(status="bogus")
    assert not cfg.supervisor.database.exists()


def test_data_nested_too_deeply_for_json_is_an_input_error(cfg):
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    q = Queue(cfg)
    with pytest.raises(InputError, match="payload is not JSON-serialisable: nested too deeply"):
        q.enqueue("t", {"x": deep})
    with pytest.raises(InputError, match="event data is not JSON-serialisable: nested too deeply"):
        q.send_event("e", deep)
    assert not cfg.supervisor.database.exists()

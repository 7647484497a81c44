"""The operations files in config/: systemd unit, launchd plist, Prometheus alert rules and
the Grafana dashboard. Static checks only (no external tools): the files parse, carry the
settings the design asks for, agree with the CLI and the config, and name only metrics
and label values that taskvisor exports. tests/e2e/test_ops_tools.py runs promtool and
systemd-analyze on the same files."""

from __future__ import annotations

import dataclasses
import json
import plistlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"
UNIT = CONFIG / "taskvisor.service"
PLIST = CONFIG / "com.taskvisor.supervisor.plist"
ALERTS = CONFIG / "prometheus-alerts.yml"
ALERT_TESTS = CONFIG / "prometheus-alerts.test.yml"
DASHBOARD = CONFIG / "grafana-dashboard.json"

# The metrics contract (issue 4, "Metrics"). Labels are closed sets.
HISTOGRAMS = {
    "taskvisor_task_duration_seconds",
    "taskvisor_task_queue_wait_seconds",
    "taskvisor_task_peak_rss_bytes",
}
TASKVISOR_METRICS = HISTOGRAMS | {
    "taskvisor_tasks",
    "taskvisor_oldest_queued_task_timestamp_seconds",
    "taskvisor_tasks_enqueued_total",
    "taskvisor_task_attempts_total",
    "taskvisor_workers_busy",
    "taskvisor_pool_size",
    "taskvisor_memory_reserved_bytes",
    "taskvisor_leases_expired_total",
    "taskvisor_forkserver_restarts_total",
    "taskvisor_supervisor_last_loop_timestamp_seconds",
    "taskvisor_build_info",
}
# prometheus_client's ProcessCollector (Linux).
PROCESS_METRICS = {
    "process_cpu_seconds_total", "process_resident_memory_bytes",
    "process_virtual_memory_bytes", "process_start_time_seconds", "process_open_fds",
    "process_max_fds",
}
LABELS = {"status", "type", "outcome", "version", "le",
          "job", "instance"}  # the last two are added by Prometheus
STATUSES = {"blocked", "queued", "running", "succeeded", "failed", "cancelled"}
OUTCOMES = {"succeeded", "error", "timeout", "memory_limit", "crashed", "lost", "cancelled",
            "interrupted", "rescheduled"}
REQUIRED_ALERTS = {
    "TaskvisorDown", "TaskvisorTargetMissing", "TaskvisorLoopStalled",
    "TaskvisorBacklogGrowing", "TaskvisorOldestQueuedTaskTooOld",
    "TaskvisorFailureRatioHigh", "TaskvisorTasksCrashing", "TaskvisorForkserverCrashLoop",
}

UNIT_CONFIG = "/etc/taskvisor/taskvisor.toml"
PLIST_CONFIG = "/usr/local/etc/taskvisor/taskvisor.toml"


# ---------------------------------------------------------------- helpers

def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit syntax: [Section], Key=Value, '#'/';' comments, '\\' continuations;
    a key may repeat, so every value is kept in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=Value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key)
    assert values, f"{key}= is missing"
    return values[-1]


def systemd_seconds(text: str) -> float:
    """'60', '60s', '1min', '1min 30s', '500ms' -> seconds."""
    units = {"": 1, "s": 1, "sec": 1, "ms": 0.001, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), text
    return sum(float(n) * units[u] for n, u in parts)


def plist() -> dict:
    with PLIST.open("rb") as f:
        return plistlib.load(f)


def drain_seconds() -> float:
    """shutdown_grace_s + kill_grace_s as the config defaults them (30 + 5 when the config
    module cannot be imported)."""
    try:
        from supervisor.config import SupervisorConfig
    except ImportError:
        return 35.0
    fields = {f.name: f.default for f in dataclasses.fields(SupervisorConfig)}
    return float(fields["shutdown_grace_s"]) + float(fields["kill_grace_s"])


def metric_names(text: str) -> set[str]:
    """Every taskvisor_*/process_* name in the text, histogram suffixes folded back."""
    names = set()
    for name in re.findall(r"(?<![\w.])((?:taskvisor|process)_[a-z_]+)", text):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
                name = name[: -len(suffix)]
        names.add(name)
    return names


def check_promql_vocabulary(text: str, where: str) -> None:
    """Metric names, grouping labels and status/outcome values are all known."""
    unknown = metric_names(text) - TASKVISOR_METRICS - PROCESS_METRICS
    assert not unknown, f"{where}: unknown metrics {sorted(unknown)}"
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        labels = {g.strip() for g in group.split(",") if g.strip()}
        assert labels <= LABELS, f"{where}: unknown labels {sorted(labels - LABELS)}"
    for label, known in (("status", STATUSES), ("outcome", OUTCOMES)):
        for value in re.findall(label + r'\s*(?:=|!=|=~|!~)\s*"([^"]*)"', text):
            values = set(value.split("|"))
            assert values <= known, f"{where}: unknown {label} {sorted(values - known)}"


def check_cli_accepts(argv: list[str]) -> None:
    """The CLI's own parser accepts `argv` as the `run` command with that config."""
    from supervisor.cli import build_parser
    try:
        ns = build_parser().parse_args(argv)
    except (SystemExit, Exception) as e:  # argparse exits; supervisor.cli raises UsageError
        pytest.fail(f"the CLI rejects {argv}: {type(e).__name__}: {e}")
    assert ns.command == argv[0], f"subcommand {argv[0]!r} not recorded in {vars(ns)}"
    assert str(ns.config) == argv[-1], f"config path {argv[-1]!r} not in {vars(ns)}"


def console_script() -> str:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (name,) = data["project"]["scripts"]
    return name


def check_env_overrides(env: dict[str, str], where: str) -> None:
    """TASKVISOR_* variables set by the service files are valid config overrides."""
    from supervisor import config
    overrides = {k: v for k, v in env.items() if k.startswith("TASKVISOR_")}
    cfg = config.load(None, env=overrides)  # raises ConfigError naming a bad variable
    if "TASKVISOR_SUPERVISOR__DATABASE" in overrides:
        assert str(cfg.supervisor.database) == overrides["TASKVISOR_SUPERVISOR__DATABASE"], where


# ---------------------------------------------------------------- systemd unit

def test_unit_has_the_required_settings():
    u = unit()
    assert set(u) == {"Unit", "Service", "Install"}
    s = u["Service"]
    assert one(s, "Type") == "notify"
    assert one(s, "NotifyAccess") == "main"
    assert 10 <= systemd_seconds(one(s, "WatchdogSec")) <= 120
    assert shlex.split(one(s, "ExecReload")) in (
        ["/bin/kill", "-HUP", "$MAINPID"], ["/usr/bin/kill", "-HUP", "$MAINPID"])
    assert one(s, "KillMode") == "mixed"
    assert one(s, "KillSignal") in ("SIGTERM", "TERM")
    assert one(s, "Restart") == "on-failure"
    assert one(s, "OOMPolicy") == "continue"
    assert one(s, "StateDirectory") == "taskvisor"
    assert one(s, "User") == "taskvisor"
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes")):
        assert one(s, key) == value, key
    # JIT compilers in ML libraries need writable+executable memory.
    assert "MemoryDenyWriteExecute" not in s
    assert one(u["Install"], "WantedBy") == "multi-user.target"


def test_unit_stop_timeout_outlasts_the_drain():
    s = unit()["Service"]
    drain = drain_seconds()
    assert systemd_seconds(one(s, "TimeoutStopSec")) > drain + 10, (
        f"TimeoutStopSec must leave the {drain:g} s drain (shutdown_grace_s + kill_grace_s) "
        "time to finish before systemd SIGKILLs the tasks")


def test_unit_runs_the_supervisor_from_the_cli():
    argv = shlex.split(one(unit()["Service"], "ExecStart"))
    assert Path(argv[0]).name == console_script() == "taskvisor"
    assert Path(argv[0]).is_absolute()
    # a virtualenv's console script (system pip is refused by Debian), as the README installs it
    assert Path(argv[0]).parts[-3:] == ("venv", "bin", "taskvisor"), argv[0]
    assert f"{Path(argv[0]).parent.parent}/bin/pip install" in (ROOT / "README.md").read_text()
    assert argv[1:] == ["run", "--config", UNIT_CONFIG]
    check_cli_accepts(argv[1:])


def test_unit_keeps_the_database_in_the_state_directory():
    s = unit()["Service"]
    env = dict(shlex.split(v)[0].split("=", 1) for v in s.get("Environment", []))
    state = "/var/lib/" + one(s, "StateDirectory")
    assert env["TASKVISOR_SUPERVISOR__DATABASE"].startswith(state + "/")
    assert one(s, "WorkingDirectory") == state
    check_env_overrides(env, "taskvisor.service")


# ---------------------------------------------------------------- launchd plist

def test_plist_program_arguments_match_the_cli():
    p = plist()
    assert p["Label"] == "com.taskvisor.supervisor" == PLIST.stem
    args = p["ProgramArguments"]
    assert args == [args[0], "run", "--config", PLIST_CONFIG]
    assert Path(args[0]).is_absolute() and Path(args[0]).name == console_script()
    assert Path(args[0]).parts[-3:] == ("venv", "bin", "taskvisor"), args[0]
    assert "Program" not in p or p["Program"] == args[0]
    check_cli_accepts(args[1:])


def test_plist_lifecycle():
    p = plist()
    assert p["RunAtLoad"] is True
    # Restart on a crash or a non-zero exit, never after the clean exit 0 of a drain.
    assert p["KeepAlive"] == {"SuccessfulExit": False, "Crashed": True}
    assert p["ExitTimeOut"] > drain_seconds() + 10
    assert p.get("ProcessType", "Standard") in ("Standard", "Background", "Adaptive")


def test_plist_paths_and_environment():
    p = plist()
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert p[key].startswith("/usr/local/var/log/taskvisor/"), key
    assert p["StandardOutPath"] != p["StandardErrorPath"]
    assert Path(p["WorkingDirectory"]).is_absolute()
    env = p["EnvironmentVariables"]
    assert all(isinstance(v, str) for v in env.values())  # launchd wants strings
    assert env["TASKVISOR_LOG__FORMAT"] == "json"
    assert env["TASKVISOR_SUPERVISOR__DATABASE"].startswith(p["WorkingDirectory"] + "/")
    assert "/usr/local/bin" in env["PATH"].split(":")
    check_env_overrides(env, PLIST.name)


# ---------------------------------------------------------------- Prometheus alerts

def test_alert_rules_use_only_exported_metrics_and_labels():
    # The whole file: expressions, and the metric names quoted in the runbook hints.
    check_promql_vocabulary(ALERTS.read_text(encoding="utf-8"), ALERTS.name)


def test_alert_rules_structure():
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    rules = [r for g in doc["groups"] for r in g["rules"]]
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert set(names) == REQUIRED_ALERTS
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert set(r["annotations"]) >= {"summary", "description"}, r["alert"]
        assert 'job="taskvisor"' in r["expr"], f"{r['alert']} must select job=\"taskvisor\""
        check_promql_vocabulary(r["expr"], r["alert"])


def test_every_alert_has_a_firing_and_a_quiet_fixture():
    doc = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    assert doc["rule_files"] == [ALERTS.name]
    fires, quiet = set(), set()
    for test in doc["tests"]:
        check_promql_vocabulary("\n".join(s["series"] for s in test["input_series"]),
                                ALERT_TESTS.name)
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fires == REQUIRED_ALERTS, f"never fired: {sorted(REQUIRED_ALERTS - fires)}"
    assert quiet == REQUIRED_ALERTS, f"never checked quiet: {sorted(REQUIRED_ALERTS - quiet)}"


# ---------------------------------------------------------------- Grafana dashboard

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows nest their panels
    return out


def test_dashboard_identity_and_datasource_variable():
    d = dashboard()
    assert d["uid"] == "taskvisor-main"
    assert d["title"] and 36 <= d["schemaVersion"] <= 41
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for p in panels(d):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}", v["name"]


def test_dashboard_layout():
    ps = panels(dashboard())
    ids = [p["id"] for p in ps]
    assert len(ids) == len(set(ids))
    for p in ps:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        assert p["title"]


def test_dashboard_uses_only_exported_metrics_and_covers_them():
    d = dashboard()
    exprs = [t["expr"] for p in panels(d) for t in p.get("targets", [])]
    exprs += [v["definition"] for v in d["templating"]["list"] if v["type"] == "query"]
    text = "\n".join(exprs)
    check_promql_vocabulary(text, DASHBOARD.name)
    used = metric_names(text)
    missing = TASKVISOR_METRICS - used
    assert not missing, f"no panel shows {sorted(missing)}"
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= used
    # Every rate-like window follows Grafana's interval.
    for window in re.findall(r"\[([^\]]+)\]", "\n".join(exprs)):
        assert window in ("$__rate_interval", "1h"), window

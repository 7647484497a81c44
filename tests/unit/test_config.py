"""supervisor.config: loading, checking, environment overrides, dump and find."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from supervisor import config
from supervisor.config import (
    Config, Defaults, HttpConfig, LlmConfig, LogConfig, SupervisorConfig, TypeConfig,
)
from supervisor.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "taskvisor.toml"


def write(tmp_path: Path, text: str, name: str = "taskvisor.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def errors_of(path, env=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load(path, env={} if env is None else env)
    return info.value.errors


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None, env={})
    assert cfg.path is None
    assert cfg.supervisor == SupervisorConfig(database=tmp_path / "taskvisor.db")
    assert (cfg.defaults, cfg.http, cfg.log, cfg.llm) == (
        Defaults(), HttpConfig(), LogConfig(), LlmConfig())
    assert dict(cfg.types) == {}


def test_example_file_loads_and_matches_the_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(EXAMPLE, env={})
    assert cfg.path == EXAMPLE
    assert cfg.supervisor.database == EXAMPLE.parent / "taskvisor.db"
    defaults = config.load(None, env={})
    assert dataclasses.replace(cfg, path=None).with_database(defaults.supervisor.database) \
        == defaults


def test_example_file_documents_every_key():
    text = EXAMPLE.read_text()
    for section, specs in config._SECTIONS.items():
        assert f"[{section}]" in text
        for key in specs:
            assert f"\n{key} = " in text or f"\n# {key} = " in text, (section, key)
    for key in config._TYPE_FIELDS:
        assert f"\n# {key} = " in text, key


def test_specs_match_the_dataclasses():
    for section, cls in config._SECTION_CLASSES.items():
        assert list(config._SECTIONS[section]) == [f.name for f in dataclasses.fields(cls)]
    assert list(config._TYPE_FIELDS) == [f.name for f in dataclasses.fields(TypeConfig)]


def test_full_file_with_types(tmp_path):
    path = write(tmp_path, """
[supervisor]
database = "data/q.db"
pool_size = 8
preload = "myapp.tasks"
lease_s = "1m"
synchronous = "full"
memory_budget_mb = 4096
[defaults]
timeout_s = "none"
memory_mb = 512
backoff_initial_s = 2
[types."llm.chat"]
handler = "myapp.tasks:chat"
concurrency = 2
timeout_s = "10m"
[types.embed]
priority = -3
[http]
listen = "[::1]:0"
token_file = "~/tv.token"
[log]
level = "debug"
format = "JSON"
[llm]
base_url = "https://api.example.com/v1"
model = "m"
api_key_env = "MY_KEY"
""")
    cfg = config.load(path, env={})
    s = cfg.supervisor
    assert s.database == tmp_path / "data" / "q.db"
    assert (s.pool_size, s.preload, s.lease_s, s.synchronous, s.memory_budget_mb) == (
        8, ("myapp.tasks",), 60.0, "FULL", 4096)
    assert cfg.defaults.timeout_s is None and cfg.defaults.memory_mb == 512
    assert isinstance(cfg.defaults.backoff_initial_s, float)
    assert cfg.types["llm.chat"] == TypeConfig(handler="myapp.tasks:chat", concurrency=2,
                                               timeout_s=600.0)
    assert cfg.types["embed"].priority == -3
    assert cfg.http == HttpConfig(listen="[::1]:0", token_file=Path.home() / "tv.token")
    assert cfg.log == LogConfig(level="DEBUG", format="json")
    assert cfg.llm.api_key_env == "MY_KEY"


def test_unknown_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path, "[supervisor]\npool_sise = 3\n")
    assert errors_of(path) == [
        f"{path}: [supervisor] pool_sise: unknown key (did you mean pool_size?)"]


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    path = write(tmp_path, "timeout_s = 5\n[supervisor]\nmax_attempts = 3\n"
                           "[defaults]\nconcurrency = 2\n")
    errors = errors_of(path)
    assert any("timeout_s" in e and "[defaults] timeout_s" in e for e in errors)
    assert any("[supervisor] max_attempts" in e and "did you mean [defaults] max_attempts" in e
               for e in errors)
    assert any('did you mean [types."NAME"] concurrency' in e for e in errors)


def test_unknown_section_suggests(tmp_path):
    path = write(tmp_path, "[supervsior]\npool_size = 2\n")
    assert errors_of(path) == [
        f"{path}: [supervsior]: unknown section (did you mean [supervisor]?)"]


def test_wrong_type_names_key_expected_and_got(tmp_path):
    path = write(tmp_path, '[supervisor]\npool_size = "8"\n')
    (error,) = errors_of(path)
    assert error.startswith(f"{path}: [supervisor] pool_size: ")
    assert 'expected an integer, got string "8"' in error


@pytest.mark.parametrize("key", ["pool_size", "lease_s"])
def test_bool_is_not_a_number(tmp_path, key):
    path = write(tmp_path, f"[supervisor]\n{key} = true\n")
    (error,) = errors_of(path)
    assert f"[supervisor] {key}: expected" in error and "got boolean true" in error


def test_int_accepted_for_float(tmp_path):
    cfg = config.load(write(tmp_path, "[supervisor]\nlease_s = 7\n"), env={})
    assert cfg.supervisor.lease_s == 7.0 and isinstance(cfg.supervisor.lease_s, float)


@pytest.mark.parametrize("line, fragment", [
    ("[supervisor]\npool_size = 0", "pool_size: must be from 1 to 1000000, got 0"),
    ("[supervisor]\nlease_s = 0", "lease_s: must be from 2 to 86400 s, got 0.0 (the minimum is 2 s"),
    ("[supervisor]\nkill_grace_s = -1", "kill_grace_s: must be from 0 to 3600 s, got -1.0"),
    ("[supervisor]\nmemory_budget_mb = 0", 'must be from 1 to 1073741824 or "auto", got 0'),
    ("[supervisor]\nsynchronous = \"OFF\"", 'expected one of NORMAL, FULL, got "OFF"'),
    ("[defaults]\nmax_attempts = 0", "max_attempts: must be from 1 to 1000000, got 0"),
    ("[defaults]\nbackoff_initial_s = 10\nbackoff_max_s = 5", "backoff_max_s (5) is less"),
    ('[types."x"]\nconcurrency = 0', '[types."x"] concurrency: must be from 1 to 1000000, got 0'),
    ('[types."x"]\ntimeout_s = "none"', "invalid duration 'none'"),
    ("[http]\nlisten = \"localhost:70000\"", 'got "localhost:70000"'),
    ("[http]\nlisten = \"9464\"", 'expected "host:port"'),
    ("[log]\nlevel = \"LOUD\"", "expected one of DEBUG, INFO, WARNING, ERROR"),
    ("[llm]\nbase_url = \"api.example.com\"", "expected an http:// or https:// URL"),
    ("[llm]\napi_key_env = \"sk-secret\"", "never put the key itself"),
    ("[supervisor]\npreload = [\"ok\", \"not a module\"]", "is not a module name"),
    ("[supervisor]\nlease_s = \"10 minutes\"", "invalid duration '10 minutes'"),
])
def test_out_of_range_and_bad_values(tmp_path, line, fragment):
    path = write(tmp_path, line + "\n")
    (error,) = errors_of(path)
    assert error.startswith(f"{path}: ") and fragment in error, error
    assert "sk-secret" not in error


@pytest.mark.parametrize("handler", ["myapp", "myapp:", ":run", "my app:run", "a.b:c d", "1a:b"])
def test_bad_handler(tmp_path, handler):
    path = write(tmp_path, f'[types."t"]\nhandler = "{handler}"\n')
    (error,) = errors_of(path)
    assert '[types."t"] handler: expected "package.module:function"' in error


def test_handler_is_only_checked_not_imported(tmp_path):
    path = write(tmp_path, '[types."t"]\nhandler = "no_such_module_xyz.sub:fn"\n')
    assert config.load(path, env={}).types["t"].handler == "no_such_module_xyz.sub:fn"


def test_unquoted_dotted_type_name_gets_a_hint(tmp_path):
    path = write(tmp_path, "[types.llm.chat]\nconcurrency = 1\n")
    (error,) = errors_of(path)
    assert '[types."llm.chat"]' in error


def test_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, "[supervisor\npool_size = 1\n")
    (error,) = errors_of(path)
    assert error.startswith(f"{path}: TOML syntax error: ")


def test_unreadable_file(tmp_path):
    (error,) = errors_of(tmp_path)
    assert error.startswith(f"{tmp_path}: cannot read config file")


def test_every_error_is_reported_at_once(tmp_path):
    path = write(tmp_path, """
[supervisor]
pool_sise = 2
lease_s = -1
[defaults]
max_attempts = false
[types."a"]
handler = "nope"
[bogus]
""")
    errors = errors_of(path, env={"TASKVISOR_LOG__LEVL": "DEBUG"})
    assert len(errors) == 6, errors
    assert all(e.startswith(f"{path}: ") for e in errors[:5])
    assert errors[5].startswith("environment: TASKVISOR_LOG__LEVL")


def test_env_overrides(tmp_path):
    path = write(tmp_path, "[supervisor]\npool_size = 2\n[http]\nlisten = \"0.0.0.0:1\"\n")
    cfg = config.load(path, env={
        "TASKVISOR_SUPERVISOR__POOL_SIZE": "8",
        "TASKVISOR_SUPERVISOR__PRELOAD": '["a", "b.c"]',
        "TASKVISOR_SUPERVISOR__LEASE_S": "2m",
        "TASKVISOR_DEFAULTS__TIMEOUT_S": "1.5",
        "TASKVISOR_HTTP__LISTEN": "",
        "TASKVISOR_LOG__LEVEL": '"warning"',
        "TASKVISOR_LLM__MODEL": "gpt-x",
        "TASKVISOR_CONFIG": "/ignored/here",
        "UNRELATED": "x",
    })
    assert cfg.supervisor.pool_size == 8
    assert cfg.supervisor.preload == ("a", "b.c")
    assert cfg.supervisor.lease_s == 120.0
    assert cfg.defaults.timeout_s == 1.5
    assert cfg.http.listen == ""
    assert cfg.log.level == "WARNING"
    assert cfg.llm.model == "gpt-x"


def test_env_overrides_apply_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None, env={"TASKVISOR_SUPERVISOR__DATABASE": "sub/x.db"})
    assert cfg.supervisor.database == tmp_path / "sub" / "x.db"


@pytest.mark.parametrize("var, fragment", [
    ("TASKVISOR_SUPERVISOR__POOL_SISE", "did you mean TASKVISOR_SUPERVISOR__POOL_SIZE?"),
    ("TASKVISOR_SUPERVISR__POOL_SIZE", "did you mean TASKVISOR_SUPERVISOR__POOL_SIZE?"),
    ("TASKVISOR_TYPES__X", "cannot come from the environment"),
    ("TASKVISOR_SUPERVISOR_POOL_SIZE", "did you mean TASKVISOR_SUPERVISOR__POOL_SIZE?"),
])
def test_unknown_env_variable(var, fragment):
    (error,) = errors_of(None, env={var: "3"})
    assert error.startswith(f"environment: {var}: ") and fragment in error, error


def test_bad_env_value_names_the_variable():
    (error,) = errors_of(None, env={"TASKVISOR_SUPERVISOR__POOL_SIZE": "many"})
    assert error == ("environment: TASKVISOR_SUPERVISOR__POOL_SIZE: "
                     'expected an integer, got string "many"')


def test_env_value_parsing():
    assert config._env_value("8") == 8
    assert config._env_value("true") is True
    assert config._env_value('"x"') == "x"
    assert config._env_value("") == ""
    assert config._env_value("127.0.0.1:9464") == "127.0.0.1:9464"
    assert config._env_value("1\n[other]\nk = 2") == "1\n[other]\nk = 2"


def test_relative_paths_follow_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", '[supervisor]\ndatabase = "../var/q.db"\n'
                                   '[http]\ntoken_file = "tok"\n')
    cfg = config.load(Path("etc/taskvisor.toml"), env={})
    assert cfg.path == path
    assert cfg.supervisor.database == tmp_path / "var" / "q.db"
    assert cfg.http.token_file == tmp_path / "etc" / "tok"
    bare = config.load(write(tmp_path / "etc", "", "empty.toml"), env={})
    assert bare.supervisor.database == tmp_path / "etc" / "taskvisor.db"


def test_with_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None, env={})
    other = cfg.with_database("x/y.db")
    assert other.supervisor.database == tmp_path / "x" / "y.db"
    assert other.supervisor.pool_size == cfg.supervisor.pool_size
    assert cfg.supervisor.database == tmp_path / "taskvisor.db"


def test_find_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config.find(None, env={}) is None
    local = write(tmp_path, "")
    assert config.find(None, env={}) == local
    named = write(tmp_path, "", "named.toml")
    assert config.find(None, env={"TASKVISOR_CONFIG": str(named)}) == named
    explicit = write(tmp_path, "", "explicit.toml")
    assert config.find("explicit.toml", env={"TASKVISOR_CONFIG": str(named)}) == explicit
    with pytest.raises(ConfigError, match="config file .*missing.toml does not exist"):
        config.find("missing.toml", env={})
    with pytest.raises(ConfigError, match="gone.toml .*TASKVISOR_CONFIG.* does not exist"):
        config.find(None, env={"TASKVISOR_CONFIG": "gone.toml"})


def test_dump_round_trips(tmp_path):
    path = write(tmp_path, """
[supervisor]
pool_size = 3
preload = ["a.b", "c"]
memory_budget_mb = 100
[defaults]
timeout_s = "none"
memory_mb = 64
[types."llm.chat"]
handler = "m.n:f"
concurrency = 1
[types."we\\"ird name"]
cpu_s = 1.5
[http]
listen = ""
token_file = "/t/tok"
[llm]
base_url = "http://x"
""")
    cfg = config.load(path, env={"TASKVISOR_LOG__FORMAT": "json"})
    again = config.load(write(tmp_path, config.dump(cfg), "dumped.toml"), env={})
    assert dataclasses.replace(again, path=cfg.path) == cfg
    defaults = config.load(None, env={})
    dumped = config.load(write(tmp_path, config.dump(defaults), "d.toml"), env={})
    assert dataclasses.replace(dumped, path=None) == defaults


@pytest.mark.parametrize("text, seconds", [
    ("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("7d", 604800.0),
    ("1w", 604800.0), ("1.5h", 5400.0), (" 10 S ", 10.0), ("250ms", 0.25), (".5s", 0.5),
])
def test_parse_duration(text, seconds):
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "-5s", "5x", "1e3", "5 m s", "nan", "inf"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="invalid duration"):
        config.parse_duration(text)


def test_setting_falls_back_to_defaults():
    cfg = Config(path=None, supervisor=SupervisorConfig(database=Path("/q.db")),
                 defaults=Defaults(max_attempts=4),
                 types={"a": TypeConfig(timeout_s=9.0, concurrency=2), "b": TypeConfig()},
                 http=HttpConfig(), log=LogConfig(), llm=LlmConfig())
    assert cfg.setting("a", "timeout_s") == 9.0
    assert cfg.setting("a", "max_attempts") == 4
    assert cfg.setting("unknown.type", "timeout_s") == 3600.0
    with pytest.raises(KeyError):
        cfg.setting("a", "concurrency")
    assert cfg.concurrency_caps() == {"a": 2}
    with pytest.raises(TypeError):
        cfg.types["c"] = TypeConfig()  # type: ignore[index]
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_llm_relay_is_a_boolean_on_by_default(tmp_path):
    assert config.load(None, env={}).llm.relay is True
    assert config.load(write(tmp_path, "[llm]\nrelay = false\n"), env={}).llm.relay is False
    assert config.load(None, env={"TASKVISOR_LLM__RELAY": "false"}).llm.relay is False
    (bad,) = errors_of(write(tmp_path, '[llm]\nrelay = "no"\n'))
    assert "[llm] relay" in bad and "true or false" in bad, bad
    # the variable that names the relay's socket to task processes is not a config key
    assert config.load(None, env={"TASKVISOR_LLM_RELAY_SOCKET": "/run/x.sock"}).llm.relay is True
    text = config.dump(config.load(write(tmp_path, "[llm]\nrelay = false\n"), env={}))
    assert "relay = false" in text

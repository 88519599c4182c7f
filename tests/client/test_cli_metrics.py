"""tunnel-client's --metrics-port, --metrics-interface and --log-format, as parsed
from the command line and the agent TOML file (no reactor, no sockets)."""

import pytest

from client.cli import _metrics_address, _settings, build_parser
from client.errors import ConfigurationError


def settings(argv, tmp_path=None, toml=None):
    if toml is not None:
        path = tmp_path / "agent.toml"
        path.write_text(toml)
        argv = [*argv, "--config", str(path)]
    return _settings(build_parser().parse_args(["forward", "22", "--relay", "r:1", "--token", "t", *argv]))


def test_a_bare_port_binds_loopback_and_host_port_binds_that_host():
    """`9100` is 127.0.0.1:9100 (or --metrics-interface); HOST:PORT and [IPv6]:PORT name the host."""
    assert _metrics_address("9100", None) == ("127.0.0.1", 9100)
    assert _metrics_address(9100, "0.0.0.0") == ("0.0.0.0", 9100)
    assert _metrics_address("10.0.0.5:9100", None) == ("10.0.0.5", 9100)
    assert _metrics_address("[::1]:9100", None) == ("::1", 9100)
    assert _metrics_address("0", None) == ("127.0.0.1", 0)
    assert _metrics_address(None, None) is None


@pytest.mark.parametrize("bad", ["http", "127.0.0.1:x", "70000", ":9100"])
def test_a_bad_metrics_port_is_a_configuration_error(bad):
    """Anything but [HOST:]PORT with PORT in 0-65535 is refused with a message naming the option."""
    with pytest.raises(ConfigurationError, match="--metrics-port"):
        _metrics_address(bad, None)


def test_the_command_line_and_the_toml_file_set_metrics_and_log_format(tmp_path):
    """metrics_port, metrics_interface and log_format come from the file unless the command line says otherwise."""
    assert settings([])["metrics"] is None and settings([])["log_format"] == "text"
    from_file = settings([], tmp_path, 'metrics_port = 9100\nmetrics_interface = "::1"\nlog_format = "json"\n')
    assert from_file["metrics"] == ("::1", 9100) and from_file["log_format"] == "json"
    both = settings(["--metrics-port", "127.0.0.1:9200", "--log-format", "text"], tmp_path,
                    'metrics_port = 9100\nlog_format = "json"\n')
    assert both["metrics"] == ("127.0.0.1", 9200) and both["log_format"] == "text"
    with pytest.raises(ConfigurationError, match="log_format"):
        settings([], tmp_path, 'log_format = "xml"\n')

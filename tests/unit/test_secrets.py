"""Secrets never leak: not in error messages, not in logs, not in the repr of a settings object."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adapters._aws import AwsOptions, AwsUnavailable, endpoint_of
from adapters.kafka import KafkaBroker
from adapters.kafka_config import KafkaSettings
from asyncflow.errors import (
    BrokerUnavailable,
    ConfigError,
    RedactingFilter,
    redact_text,
    redact_url,
)
from tests.unit.cli_helpers import one_error_line, run_worker

SECRET = "Hunter2pw"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"kafka://alice:{SECRET}@k:9092", "kafka://alice:***@k:9092"),
        (f"kafka://alice:{SECRET}@k1:9092,k2:9092?client_id=a", "kafka://alice:***@k1:9092,k2:9092?client_id=a"),
        (f"alice:{SECRET}@k:9092", "alice:***@k:9092"),
        (f"kafka://k?sasl_plain_password={SECRET}&acks=1", "kafka://k?sasl_plain_password=***&acks=1"),
        (f"k:9092?ssl_password={SECRET}", "k:9092?ssl_password=***"),
        (f"https://u:{SECRET}@h/p?token={SECRET}#x", "https://u:***@h/p?token=***#x"),
        ("kafka://k:9092?client_id=a", "kafka://k:9092?client_id=a"),
        ("http://user@host:1", "http://user@host:1"),
    ],
)
def test_redact_url_hides_userinfo_passwords_and_secret_options(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_any_url_in_a_text_is_redacted_and_the_rest_left_alone() -> None:
    text = f"bad URL 'kafka://a:{SECRET}@h:1' (was alice:{SECRET}@h:1); field 't': 12:30 at x=1"
    assert redact_text(text) == "bad URL 'kafka://a:***@h:1' (was alice:***@h:1); field 't': 12:30 at x=1"


def test_no_asyncflow_error_message_shows_a_password() -> None:
    errors = [
        ConfigError(f"broker URL 'alice:{SECRET}@host:9092' has no scheme"),
        BrokerUnavailable(f"kafka://alice:{SECRET}@127.0.0.1:1", "refused"),
        AwsUnavailable("kinesis", f"http://key:{SECRET}@127.0.0.1:1", "refused"),
    ]
    for error in errors:
        assert SECRET not in str(error) and "***" in str(error)
    assert SECRET not in errors[1].url


def test_a_log_record_carrying_a_url_is_redacted_at_every_level() -> None:
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
        record = logging.LogRecord(
            "aiokafka", level, __file__, 1, "connecting to %s", (f"kafka://u:{SECRET}@h",), None
        )
        assert RedactingFilter().filter(record)
        assert record.getMessage() == "connecting to kafka://u:***@h"


def test_kafka_url_userinfo_is_the_sasl_login_and_never_shown() -> None:
    url = f"kafka://alice:{SECRET}@127.0.0.1:1?security_protocol=SASL_SSL&ssl_password={SECRET}"
    broker = KafkaBroker(url, {})
    assert (broker.settings.sasl_plain_username, broker.settings.sasl_plain_password) == (
        "alice",
        SECRET,
    )
    assert SECRET not in broker.url
    assert SECRET not in repr(broker.settings)
    assert "sasl_plain_password='***'" in repr(broker.settings)
    assert "ssl_password='***'" in repr(broker.settings)


def test_a_bad_kafka_url_with_a_password_is_quoted_without_it() -> None:
    with pytest.raises(ConfigError) as info:
        KafkaSettings.parse(f"kafka://alice:{SECRET}@host:port")
    assert SECRET not in str(info.value) and "alice:***@host:port" in str(info.value)


def test_aws_options_and_endpoints_do_not_show_credentials() -> None:
    options = AwsOptions(
        endpoint_url=f"http://u:{SECRET}@127.0.0.1:5000",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key=SECRET,
        aws_session_token=SECRET,
    )
    assert SECRET not in repr(options)
    assert "aws_secret_access_key='***'" in repr(options)
    assert "aws_session_token='***'" in repr(options)

    class Client:
        class meta:  # the shape of a botocore client
            endpoint_url = f"http://u:{SECRET}@127.0.0.1:5000"

    assert endpoint_of(Client()) == "http://u:***@127.0.0.1:5000"


@pytest.mark.parametrize(
    "broker",
    [
        f"kafka://alice:{SECRET}@127.0.0.1:1?security_protocol=SASL_PLAINTEXT&connect_timeout_ms=5000",
        f"kafka://alice:{SECRET}@127.0.0.1:1",
        f"alice:{SECRET}@127.0.0.1:1",
        f"kafka://alice:{SECRET}@127.0.0.1:1?security_protocol=SASL_PLAINTEXT&no_such_option=1",
    ],
)
def test_the_worker_never_prints_the_broker_password_even_in_debug_logs(
    tmp_path: Path, broker: str
) -> None:
    result = run_worker(tmp_path, "tiny:app", "--broker", broker, "--log-level", "debug")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("asyncflow: error: ")
    assert SECRET not in result.stderr + result.stdout


def test_an_unreachable_broker_names_the_redacted_url(tmp_path: Path) -> None:
    broker = f"kafka://alice:{SECRET}@127.0.0.1:1?security_protocol=SASL_PLAINTEXT"
    line = one_error_line(run_worker(tmp_path, "tiny:app", "--broker", broker))
    assert line.startswith("asyncflow: error: cannot reach broker kafka://alice:***@127.0.0.1:1?")

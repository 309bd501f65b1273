"""Kafka URLs and options: what is accepted, and errors that say what to write instead."""

from __future__ import annotations

import ssl

import pytest

from adapters.kafka import URL_FORM, KafkaBroker, KafkaSettings
from asyncflow.errors import ConfigError
from asyncflow.protocols import Broker


def test_url_lists_bootstrap_servers_and_query_options() -> None:
    s = KafkaSettings.parse("kafka://k1:9093,k2,[::1]:9094?client_id=etl&linger_ms=5")
    assert s.bootstrap_servers == ["k1:9093", "k2:9092", "[::1]:9094"]
    assert s.client_id == "etl"
    assert s.linger_ms == 5


def test_option_mapping_wins_over_the_query_string() -> None:
    s = KafkaSettings.parse("kafka://k?max_poll_records=10", {"max_poll_records": "20"})
    assert s.max_poll_records == 20


def test_defaults_suit_production_kafka() -> None:
    s = KafkaSettings.parse("kafka://k:9092")
    assert s.enable_idempotence and s.acks == -1
    assert s.auto_offset_reset == "earliest" and s.create_topics
    args = s.consumer_args("g")
    assert args["enable_auto_commit"] is False and args["group_id"] == "g"


@pytest.mark.parametrize(
    "url",
    [
        "http://k:9092",
        "kafka://",
        "kafka://k:notaport",
        "kafka://k:70000",
        "kafka://k:9092/path",
        "k:9092",
        "kafka://a:b:c",
    ],
)
def test_bad_url_names_the_accepted_form(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        KafkaBroker(url, {})
    assert URL_FORM in str(info.value)


def test_unknown_option_lists_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match="unknown Kafka option 'sesion_timeout_ms'.*session_timeout_ms"
    ):
        KafkaBroker("kafka://k", {"sesion_timeout_ms": "3000"})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"enable_idempotence": "maybe"}, "not a boolean"),
        ({"session_timeout_ms": "soon"}, "not an integer"),
        ({"auto_offset_reset": "middle"}, "earliest, latest"),
        ({"acks": "2"}, "0, 1, all"),
        ({"acks": "1", "enable_idempotence": "true"}, "acks must be 'all'"),
        ({"session_timeout_ms": "3000", "heartbeat_interval_ms": "3000"}, "below session"),
        ({"security_protocol": "SASL_SSL"}, "sasl_plain_username"),
        ({"sasl_plain_username": "u"}, "security_protocol=SASL"),
    ],
)
def test_bad_option_values_are_config_errors(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KafkaBroker("kafka://k", options)


def test_acks_below_all_turns_idempotence_off_like_the_java_client() -> None:
    assert KafkaSettings.parse("kafka://k", {"acks": "1"}).enable_idempotence is False


def test_ssl_builds_a_verifying_context() -> None:
    s = KafkaSettings.parse("kafka://k?security_protocol=SSL")
    context = s.client_args()["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigError, match="TLS files"):
        KafkaSettings.parse("kafka://k?security_protocol=SSL&ssl_cafile=/nonexistent").ssl_context()


def test_sasl_credentials_reach_the_clients_and_are_hidden_in_the_url() -> None:
    url = "kafka://k?security_protocol=SASL_SSL&sasl_mechanism=SCRAM-SHA-512"
    broker = KafkaBroker(url + "&sasl_plain_username=u&sasl_plain_password=s3cret", {})
    args = broker.settings.client_args()
    assert (args["sasl_mechanism"], args["sasl_plain_password"]) == ("SCRAM-SHA-512", "s3cret")
    assert "s3cret" not in broker.url


def test_kafka_broker_is_a_broker_factory() -> None:
    broker = KafkaBroker("kafka://localhost:9092", {"enable_idempotence": "false"})
    assert isinstance(broker, Broker)
    assert broker.sink().max_batch == 10_000

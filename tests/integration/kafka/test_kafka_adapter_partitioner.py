"""Keyed records go to the partition Kafka's Java client would choose (no broker needed)."""

from __future__ import annotations

import pytest

from adapters.kafka import kafka_partition

# Apache Kafka's own vectors for Utils.murmur2 (clients/.../utils/UtilsTest.java, testMurmur2),
# plus short keys checked against the Java client by Akka's Murmur2Spec.
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
    b"1": -1993445489,
    b"12": 126087238,
    b"123": -267702483,
    b"1234": -1614185708,
    b"12345": -1188365604,
}


@pytest.mark.parametrize("partitions", [1, 3, 4, 12, 100])
def test_keyed_partition_matches_the_java_client(partitions: int) -> None:
    for key, java_hash in JAVA_MURMUR2.items():
        to_positive = java_hash & 0x7FFFFFFF  # Utils.toPositive
        assert kafka_partition(key, partitions) == to_positive % partitions, key

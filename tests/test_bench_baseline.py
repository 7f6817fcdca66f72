"""The MQTT baseline benchmark runs end to end and counts every byte (no timing threshold)."""

import pytest

from bench.mqtt_baseline import run


@pytest.mark.mosquitto
def test_baseline_receives_every_byte(mosquitto):
    result = run(total_mib=2, message_size=256 * 1024, broker_url=mosquitto.url)
    assert result.messages == 8 and result.total_bytes == 2 * 2**20
    assert result.mb_per_s > 0

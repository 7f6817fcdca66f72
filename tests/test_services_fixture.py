"""The fixtures themselves work: the broker restarts on its port, the PG schema is isolated."""

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy

from tests.support.services import wait_for_port


def test_mosquitto_stops_and_restarts_on_same_port(mosquitto):
    port = mosquitto.port
    mosquitto.stop()
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", port, timeout=0.5)
    mosquitto.start()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    assert client.connect("127.0.0.1", port) == mqtt.MQTT_ERR_SUCCESS
    client.disconnect()


def test_pg_url_uses_a_private_schema(pg_url):
    engine = sqlalchemy.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("create table probe (x int)"))
        schema = conn.execute(sqlalchemy.text("select current_schema()")).scalar_one()
    engine.dispose()
    assert schema.startswith("t_")

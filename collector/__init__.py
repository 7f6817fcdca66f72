"""Central collector: MQTT ingest of signed segments, storage, database, inspection CLI."""

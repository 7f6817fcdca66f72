"""[upload] max_kbps on real parts: the uploader against a real mosquitto and a real collector (in-process
CollectorService, SQLite, filesystem storage). A capped upload takes at least as long as the cap implies and
still ends with every record stored; an unlimited one is never held back; a capped wait ends on stop()."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.admin import enroll
from collector.config import MqttConfig
from collector.db import make_engine, session_factory, upgrade
from collector.ingest import Ingest
from collector.service import CollectorService
from edge_agent.config import EdgeConfig, load_config
from edge_agent.ratecap import BURST_SECONDS, bytes_per_second
from edge_agent.spool import Journal, Sealer
from edge_agent.uploader import Uploader
from exam_contract.signing import load_private_key, public_key_b64
from tests.collector.conftest import TEST_LIMITS
from tests.edge.conftest import AGENT, write_config
from tests.support.pipeline import wait_until

pytestmark = [pytest.mark.ffmpeg, pytest.mark.mosquitto]
CAM = "t101-front"
CHUNK = 64 * 1024


@pytest.fixture
def collector(tmp_path: Path, mosquitto) -> Iterator[None]:
    """A real collector answering on the test broker, with the agent of `write_config(tmp_path)` enrolled."""
    write_config(tmp_path)  # makes tmp_path/agent.key, which the edge config below reuses
    engine = make_engine(f"sqlite:///{tmp_path / 'collector.db'}")
    upgrade(engine)
    enroll(session_factory(engine), AGENT, "JL2201001-01",
           public_key_b64(load_private_key(tmp_path / "agent.key")), "JL2201001")
    settings = MqttConfig(url=mosquitto.url, host="127.0.0.1", port=mosquitto.port, tls=False,
                          client_id=f"collector-{uuid.uuid4().hex[:6]}")
    service = CollectorService(settings, Ingest(engine, tmp_path / "storage", limits=TEST_LIMITS))
    service.start()
    assert service.connected.wait(10)
    yield
    service.shutdown()
    engine.dispose()


def capped_config(root: Path, broker_url: str, max_kbps: int) -> EdgeConfig:
    path = write_config(root, broker_url=broker_url)
    path.write_text(path.read_text() + f"\n[upload]\nmax_kbps = {max_kbps}\n")
    return load_config(path)


def seal_copies(config: EdgeConfig, journal: Journal, sample: Path, copies: int) -> int:
    """Seals `copies` segments of the sample; returns their bytes."""
    sealer = Sealer(config, journal, load_private_key(config.agent.key_file))
    for index in range(copies):
        target = config.agent.recording_dir / CAM / f"20261126T080000000000-{index:06d}.ts"
        shutil.copyfile(sample, target)
        sealer.seal_file(CAM, target)
    return sum(r.size for r in journal.records(CAM))


@pytest.mark.parametrize("max_kbps", [2000, 0])
def test_capped_upload_takes_what_the_cap_implies_and_everything_is_stored(tmp_path: Path, mosquitto, collector,
                                                                           sample_ts: Path, max_kbps: int) -> None:
    config = capped_config(tmp_path, mosquitto.url, max_kbps)
    journal = Journal(config.agent.journal_path)
    total = seal_copies(config, journal, sample_ts, 2)
    assert total > 2_000_000
    uploader = Uploader(config, journal, chunk_size=CHUNK)
    uploader.connect()
    started = time.monotonic()
    uploader.start()
    first_stored_while_sending = False
    try:
        def done() -> bool:
            nonlocal first_stored_while_sending
            states = [r.state for r in journal.records(CAM)]
            first_stored_while_sending |= states == ["stored", "pending"]
            return states == ["stored", "stored"]

        wait_until(done, 60, interval=0.1, what="every record stored")
        elapsed = time.monotonic() - started
        rate = uploader.upload_rate()
    finally:
        uploader.stop()
        journal.close()
    assert rate.cap.kbps == max_kbps and rate.cap.changes_at is None
    assert rate.bytes_per_second > 0   # the meter saw what was published
    if max_kbps:
        cap = bytes_per_second(max_kbps)
        burst = max(cap * BURST_SECONDS, CHUNK)
        # the file bytes alone (inits and fins come on top) need this long at the cap after the first burst
        assert elapsed >= (total - burst) / cap
        assert uploader.cap_holds > 0
        # and the measured rate is what the cap allows: the cap over the time, plus one burst
        assert rate.bytes_per_second <= cap + burst / elapsed
        # the collector's reply for the first record was handled while the cap held back the second
        assert first_stored_while_sending
    else:
        assert uploader.cap_holds == 0


def test_a_capped_wait_ends_on_stop(tmp_path: Path, mosquitto, sample_ts: Path) -> None:
    """At 8 kbit/s (1000 bytes/s) the second chunk waits over a minute; stop() must end the uploader's thread
    within its join anyway (a sleep through the wait would leave it alive)."""
    config = capped_config(tmp_path, mosquitto.url, 8)
    journal = Journal(config.agent.journal_path)
    seal_copies(config, journal, sample_ts, 1)
    uploader = Uploader(config, journal, chunk_size=CHUNK)
    uploader.connect()
    uploader.start()
    thread = uploader._thread
    assert thread is not None
    try:
        # the init and the first chunk go (the first after under a second), then the second waits ~65 s: the
        # stop below does not merely outlast the wait
        wait_until(lambda: uploader._cap_wait > 30, 20, interval=0.1, what="the cap holding the second chunk back")
    finally:
        uploader.stop()
        journal.close()
    assert not thread.is_alive()
    assert [r.state for r in Journal(config.agent.journal_path).records(CAM)] == ["pending"]

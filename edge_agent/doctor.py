"""`exam-edge doctor`: the venue machine's setup checked one line at a time, each failure with its fix."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from exam_contract import exitcodes
from exam_contract.doctor import (DOCTOR_TIMEOUT, Check, check_clock, check_folder, check_key_file, check_login,
                                  check_tls, check_tools)
from exam_contract.protocol import ChainHeads, ChainRequest, ProtocolError
from exam_contract.tomlconfig import ConfigError
from exam_contract.topics import chain_request_topic, chain_topic

from .config import EdgeConfig, load_config
from .status import agent_running, read_local_status

CLOCK_LIMIT_SECONDS = 2.0   # the agent flags segments as not synced beyond this


def run_doctor(config_path: Path, timeout: float = DOCTOR_TIMEOUT) -> list[Check]:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [Check.failed("config", str(exc))]
    agent = config.agent
    checks = [
        Check.passed("config", f"{config_path}: agent {agent.id}, institution {agent.institution}, venue "
                               f"{agent.venue}, {len(config.cameras)} camera(s)"),
        check_key_file(agent.key_file, "agent"),
        check_folder(agent.data_dir, "data_dir", agent.min_free_mb * 2**20),
        check_tools("ffmpeg", "ffprobe"),
    ]
    if not config.cameras:
        checks.append(Check.failed("cameras", f"{config_path} has no [[camera]] table: add one (id, room, room_kind, "
                                              "source), then `exam-edge probe`"))
    if config.mqtt.tls:
        checks.append(check_tls(config.mqtt, timeout))
    if agent_running(config):
        # The broker binds the client id to the account: a second login would take the running agent's session.
        local = read_local_status(config)
        seen = f"; it last reported at {local.time:%Y-%m-%d %H:%M:%S} UTC" if local else ""
        checks.append(Check.skip("broker login", f"exam-edge run holds the agent's broker session{seen}; stop it "
                                                 "to check the login and the clock"))
        return checks
    checks.extend(_broker_and_clock(config, timeout))
    return checks


def _broker_and_clock(config: EdgeConfig, timeout: float) -> list[Check]:
    agent_id = config.agent.id
    login, session = check_login(config.mqtt, agent_id, default_username=agent_id,
                                 subscribe=[chain_topic(agent_id)], timeout=timeout)
    if session is None:
        return [login]
    try:
        offset = _collector_offset(session, agent_id, timeout)
    finally:
        session.close()
    return [login, check_clock(offset, CLOCK_LIMIT_SECONDS, "the collector")]


def _collector_offset(session, agent_id: str, timeout: float) -> float | None:  # noqa: ANN001
    """The collector's clock minus ours, from a chain question about no camera (answered with its time)."""
    nonce = uuid.uuid4().hex
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sent = time.time()
        session.client.publish(chain_request_topic(agent_id), ChainRequest(nonce, ()).encode(), qos=1)
        wait_until = min(deadline, time.monotonic() + 3.0)  # the collector answers one question per 2 s
        while time.monotonic() < wait_until:
            session.arrived.wait(0.2)
            session.arrived.clear()
            for topic, payload, received in session.messages:
                try:
                    answer = ChainHeads.decode(payload)
                except ProtocolError:
                    continue
                if topic == chain_topic(agent_id) and answer.nonce == nonce:
                    midpoint = datetime.fromtimestamp((sent + received) / 2, timezone.utc)
                    return (answer.collector_time - midpoint).total_seconds()
    return None


__all__ = ["run_doctor", "exitcodes"]

"""Edge test helpers: configs on disk, a short real MPEG-TS sample, an in-process agent."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from exam_contract.signing import generate_private_key, load_private_key
from tests.support.services import lavfi_source

AGENT = "jl2201001-01-a"


@dataclass
class Cam:
    id: str = "t101-front"
    room: str = "T101"
    room_kind: str = "theory"
    source: str = lavfi_source()


def write_config(root: Path, broker_url: str = "mqtt://127.0.0.1:1", cameras: tuple[Cam, ...] = (Cam(),),
                 segment_seconds: int = 10, extra_agent: str = "", make_key: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    key = root / "agent.key"
    if make_key and not key.exists():
        generate_private_key(key)
    text = (f'[agent]\nid = "{AGENT}"\ninstitution = "JL2201001"\nvenue = "JL2201001-01"\n'
            f'data_dir = "{root / "data"}"\nkey_file = "{key}"\n{extra_agent}\n'
            f'[mqtt]\nurl = "{broker_url}"\nusername = "{AGENT}"\n\n'
            f'[recording]\nsegment_seconds = {segment_seconds}\n')
    for cam in cameras:
        text += (f'\n[[camera]]\nid = "{cam.id}"\nroom = "{cam.room}"\nroom_kind = "{cam.room_kind}"\n'
                 f'source = "{cam.source}"\n')
    path = root / "edge.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def sample_ts(tmp_path_factory: pytest.TempPathFactory, ffmpeg_available: None) -> Path:
    """A 4 s H.264 MPEG-TS file (made as fast as ffmpeg can, not live)."""
    path = tmp_path_factory.mktemp("sample") / "sample.ts"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=640x480:rate=25", "-t", "4", "-c:v", "libx264", "-preset", "ultrafast",
                    "-pix_fmt", "yuv420p", "-f", "mpegts", str(path)], check=True)
    return path


@pytest.fixture
def agent_key(tmp_path: Path):
    path = tmp_path / "agent.key"
    generate_private_key(path)
    return load_private_key(path)


@pytest.fixture
def edge_root(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "edge"

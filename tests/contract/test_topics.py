"""Topic builders and parse_segment_topic."""

import pytest

from exam_contract.topics import (COLLECTOR_SUBSCRIPTION, DEFAULT_CHUNK_SIZE, DEFAULT_MAX_PACKET_SIZE, SegmentTopic,
                                  TopicError, chunk_topic, fin_topic, init_topic, parse_segment_topic, reply_topic,
                                  status_topic)


def test_builders_match_product_table():
    assert init_topic("demo-venue-a", "t101-cam1-3") == "exam/v1/demo-venue-a/seg/t101-cam1-3/init"
    assert chunk_topic("demo-venue-a", "t101-cam1-3", 12) == "exam/v1/demo-venue-a/seg/t101-cam1-3/chunk/12"
    assert fin_topic("demo-venue-a", "t101-cam1-3") == "exam/v1/demo-venue-a/seg/t101-cam1-3/fin"
    assert reply_topic("demo-venue-a") == "exam/v1/demo-venue-a/reply"
    assert status_topic("demo-venue-a") == "exam/v1/demo-venue-a/status"


def test_collector_subscription_is_shared():
    assert COLLECTOR_SUBSCRIPTION == "$share/collectors/exam/v1/+/seg/#"


def test_chunk_size_fits_the_default_packet_size():
    assert DEFAULT_CHUNK_SIZE == 256 * 1024 < DEFAULT_MAX_PACKET_SIZE


@pytest.mark.parametrize("topic, expected", [
    (init_topic("a1", "cam-1"), SegmentTopic("a1", "cam-1", "init")),
    (fin_topic("a1", "cam-1"), SegmentTopic("a1", "cam-1", "fin")),
    (chunk_topic("a1", "cam-1", 0), SegmentTopic("a1", "cam-1", "chunk", 0)),
    (chunk_topic("a1", "cam-1", 4095), SegmentTopic("a1", "cam-1", "chunk", 4095)),
])
def test_parse_round_trips_builders(topic, expected):
    assert parse_segment_topic(topic) == expected


@pytest.mark.parametrize("topic", [
    "exam/v1/a1/reply",
    "exam/v1/a1/status",
    "exam/v2/a1/seg/cam-1/init",
    "other/v1/a1/seg/cam-1/init",
    "exam/v1/a1/seg/cam-1",
    "exam/v1//seg/cam-1/init",
    "exam/v1/a1/seg//init",
    "exam/v1/a1/seg/cam-1/start",
    "exam/v1/a1/seg/cam-1/init/extra",
    "exam/v1/a1/seg/cam-1/chunk",
    "exam/v1/a1/seg/cam-1/chunk/",
    "exam/v1/a1/seg/cam-1/chunk/-1",
    "exam/v1/a1/seg/cam-1/chunk/x",
    "exam/v1/a1/seg/cam-1/chunk/1/2",
    "",
])
def test_parse_refuses_other_topics(topic):
    with pytest.raises(TopicError):
        parse_segment_topic(topic)



@pytest.mark.parametrize("index", ["²", "٣"])
def test_parse_refuses_non_ascii_digits(index):
    with pytest.raises(TopicError):
        parse_segment_topic(f"exam/v1/a1/seg/cam-1/chunk/{index}")

"""The embedded broker (demo fallback without Mosquitto) with a real paho client."""

from __future__ import annotations

import json
import time

from moleflow.devtools.minibroker import MiniBroker, topic_matches

from tests.daemon_helpers import Listener, free_port


def test_topic_filters():
    assert topic_matches("a/+/c", "a/b/c") and topic_matches("a/#", "a/b/c")
    assert topic_matches("#", "x") and not topic_matches("a/+", "a/b/c")
    assert not topic_matches("a/b", "a/c")


def test_publish_retained_qos1_and_last_will():
    import paho.mqtt.client as mqtt
    broker = MiniBroker("127.0.0.1", free_port())
    broker.start()
    try:
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub")
        pub.will_set("dev/status", json.dumps({"state": "offline"}), qos=1, retain=True)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        pub.publish("dev/status", json.dumps({"state": "online"}), qos=1,
                    retain=True).wait_for_publish(5)
        late = Listener(broker.port, "dev/#")  # subscribes after the retained message
        assert late.wait_for("status", 1)[0]["state"] == "online"
        info = pub.publish("dev/cam/alarm", json.dumps({"frame": "1"}), qos=1)
        info.wait_for_publish(5)  # PUBACK came back
        assert late.wait_for("cam/alarm", 1)[0]["frame"] == "1"
        pub.socket().close()  # dies without DISCONNECT: the broker sends the will
        deadline = time.time() + 10
        while time.time() < deadline and late.json("status")[-1]["state"] != "offline":
            time.sleep(0.05)
        assert late.json("status")[-1]["state"] == "offline"
        pub.loop_stop()
        late.close()
    finally:
        broker.stop()

"""A small embedded MQTT 3.1.1 broker, for the demo on machines without Mosquitto.

Enough of the protocol for the daemon and a listener on one machine: CONNECT (with last will,
user name ignored), PUBLISH QoS 0/1 in (QoS 1 acknowledged), delivery at QoS 0, retained
messages, SUBSCRIBE / UNSUBSCRIBE with ``+`` and ``#``, PINGREQ, DISCONNECT. No sessions, no
persistence, no authentication: production uses a real broker (Mosquitto).
"""

from __future__ import annotations

import asyncio
import struct
import threading


def topic_matches(pattern: str, topic: str) -> bool:
    p, t = pattern.split("/"), topic.split("/")
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(p) == len(t)


def _encode_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(data: bytes, i: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("!H", data, i)
    return data[i + 2:i + 2 + n], i + 2 + n


def publish_packet(topic: str, payload: bytes, retain: bool = False) -> bytes:
    body = struct.pack("!H", len(topic.encode())) + topic.encode() + payload
    return bytes([0x30 | int(retain)]) + _encode_length(len(body)) + body


class _Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.subs: set[str] = set()
        self.will: tuple[str, bytes, bool] | None = None


class MiniBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host, self.port = host, port
        self.clients: set[_Client] = set()
        self.retained: dict[str, bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._server = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="minibroker", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("embedded MQTT broker did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self._ready.set()
        await self._stopped.wait()
        self._server.close()
        for c in list(self.clients):
            c.writer.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ----- protocol --------------------------------------------------------------------------
    async def _read_packet(self, reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
        first = (await reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first >> 4, first & 0x0F, await reader.readexactly(length)

    def _deliver(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        packet = publish_packet(topic, payload)
        for c in list(self.clients):
            if any(topic_matches(s, topic) for s in c.subs):
                c.writer.write(packet)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(writer)
        clean = False
        try:
            kind, _, body = await self._read_packet(reader)
            if kind != 1:
                return
            _, i = _string(body, 0)
            flags = body[i + 1]
            i += 4
            _, i = _string(body, i)  # client id
            if flags & 0x04:
                topic, i = _string(body, i)
                message, i = _string(body, i)
                client.will = (topic.decode(), message, bool(flags & 0x20))
            writer.write(b"\x20\x02\x00\x00")
            self.clients.add(client)
            while True:
                kind, flags, body = await self._read_packet(reader)
                if kind == 3:  # PUBLISH
                    topic, i = _string(body, 0)
                    qos = (flags >> 1) & 3
                    if qos:
                        (mid,) = struct.unpack_from("!H", body, i)
                        i += 2
                        writer.write(b"\x40\x02" + struct.pack("!H", mid))
                    self._deliver(topic.decode(), body[i:], bool(flags & 1))
                elif kind == 8:  # SUBSCRIBE
                    (mid,) = struct.unpack_from("!H", body, 0)
                    i, granted = 2, []
                    while i < len(body):
                        pattern, i = _string(body, i)
                        i += 1
                        client.subs.add(pattern.decode())
                        granted.append(0)
                    writer.write(bytes([0x90, 2 + len(granted)]) + struct.pack("!H", mid)
                                 + bytes(granted))
                    for topic, payload in list(self.retained.items()):
                        if any(topic_matches(p, topic) for p in client.subs):
                            writer.write(publish_packet(topic, payload, retain=True))
                elif kind == 10:  # UNSUBSCRIBE
                    (mid,) = struct.unpack_from("!H", body, 0)
                    i = 2
                    while i < len(body):
                        pattern, i = _string(body, i)
                        client.subs.discard(pattern.decode())
                    writer.write(b"\xb0\x02" + struct.pack("!H", mid))
                elif kind == 12:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    clean = True
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, struct.error, IndexError,
                asyncio.CancelledError):
            pass
        finally:
            self.clients.discard(client)
            if not clean and client.will is not None:
                self._deliver(*client.will)
            writer.close()

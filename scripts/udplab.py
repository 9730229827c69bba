#!/usr/bin/env python3
"""UDP for the labs, with Python's socket module alone.

  udplab.py echo HOST PORT
      a UDP echo server: each datagram goes back to its sender.
  udplab.py socks PROXY_HOST:PORT DEST_IP DEST_PORT N
      two SOCKS5 UDP associations (RFC 1928, section 7: UDP ASSOCIATE on a
      TCP connection, then datagrams with its header) send N datagrams
      each to DEST through the proxy.
  udplab.py plain HOST PORT N
      two sockets send N datagrams each straight to HOST:PORT (a UDP
      gateway).

The clients keep at most WINDOW datagrams unanswered per association, so
that loss means loss, not a burst into a full buffer. Each datagram names
its association and sequence number; an echo that names another
association, or that no datagram of this one sent, is counted wrong. They
print one JSON line, {"sent", "received", "wrong", "bytes_sent",
"bytes_received"}, and exit 1 if anything came back wrong, or less than
MIN_SHARE of what was sent (UDP may lose some; the tunnel must not lose
much on a lab link).
"""
import ipaddress
import json
import select
import socket
import struct
import sys
import time

WINDOW = 32
MIN_SHARE = 0.9
WAIT = 2.0  # seconds a window waits for an echo before giving up on it


def echo(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((host, int(port)))
    while True:
        b, a = s.recvfrom(65535)
        s.sendto(b, a)


def associate(proxy):
    """A UDP ASSOCIATE: the control connection and the relay's address."""
    host, port = proxy.rsplit(":", 1)
    c = socket.create_connection((host, int(port)), timeout=10)
    c.sendall(b"\x05\x01\x00")
    if c.recv(2) != b"\x05\x00":
        sys.exit("udplab: the proxy refused the no-authentication method")
    c.sendall(b"\x05\x03\x00\x01" + bytes(4) + bytes(2))
    rep = b""
    while len(rep) < 10:
        chunk = c.recv(10 - len(rep))
        if not chunk:
            sys.exit("udplab: the proxy closed the UDP ASSOCIATE")
        rep += chunk
    if rep[1] != 0 or rep[3] != 1:
        sys.exit(f"udplab: UDP ASSOCIATE failed: reply {rep[1]}")
    relay = (socket.inet_ntoa(rep[4:8]), struct.unpack("!H", rep[8:10])[0])
    return c, relay


def run(socks, n, wrap, unwrap):
    """Drives the associations in socks (socket, key, destination) each
    sending n datagrams, with wrap and unwrap adding and taking headers."""
    sent = received = wrong = bytes_sent = bytes_received = 0
    state = {key: {"next": 0, "out": set(), "seen": set()} for _, key, _ in socks}
    by_fd = {s.fileno(): (s, key) for s, key, _ in socks}
    deadline = time.time() + WAIT
    while True:
        busy = False
        for s, key, dest in socks:
            st = state[key]
            while st["next"] < n and len(st["out"]) < WINDOW:
                body = f"{key} {st['next']:06d} ".encode() + b"x" * 40
                s.sendto(wrap(body), dest)
                st["out"].add(st["next"])
                st["next"] += 1
                sent += 1
                bytes_sent += len(body)
                deadline = time.time() + WAIT
            busy = busy or st["next"] < n or st["out"]
        if not busy:
            break
        ready, _, _ = select.select(list(by_fd), [], [], 0.2)
        for fd in ready:
            s, key = by_fd[fd]
            b = unwrap(s.recv(65535))
            if b is None:
                wrong += 1
                continue
            parts = b.split(b" ", 2)
            st = state[key]
            try:
                seq = int(parts[1])
            except (IndexError, ValueError):
                wrong += 1
                continue
            if parts[0].decode(errors="replace") != key or seq >= st["next"] or seq in st["seen"]:
                wrong += 1
                continue
            st["seen"].add(seq)
            st["out"].discard(seq)
            received += 1
            bytes_received += len(b)
        if time.time() > deadline:  # the window's echoes are lost: go on
            for st in state.values():
                st["out"].clear()
            deadline = time.time() + WAIT
    out = {"sent": sent, "received": received, "wrong": wrong, "bytes_sent": bytes_sent, "bytes_received": bytes_received}
    print(json.dumps(out))
    return 0 if wrong == 0 and received >= MIN_SHARE * sent else 1


def main(argv):
    if len(argv) >= 3 and argv[0] == "echo":
        echo(argv[1], argv[2])
    elif len(argv) == 5 and argv[0] == "socks":
        dest_ip, dest_port, n = argv[2], int(argv[3]), int(argv[4])
        hdr = b"\x00\x00\x00\x01" + ipaddress.IPv4Address(dest_ip).packed + struct.pack("!H", dest_port)
        ctls, socks = [], []
        for k in range(2):
            c, relay = associate(argv[1])
            ctls.append(c)  # an association lives as long as its TCP connection
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind(("127.0.0.1", 0))
            socks.append((u, f"assoc{k}", relay))

        def unwrap(b):
            # The answer's header must name the destination it came from.
            return b[len(hdr):] if b.startswith(hdr) else None

        return run(socks, n, lambda body: hdr + body, unwrap)
    elif len(argv) == 4 and argv[0] == "plain":
        dest = (argv[1], int(argv[2]))
        socks = []
        for k in range(2):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind(("0.0.0.0", 0))
            socks.append((u, f"client{k}", dest))
        return run(socks, int(argv[3]), lambda body: body, lambda b: b)
    else:
        sys.exit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

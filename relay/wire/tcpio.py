"""Helpers for the Twisted TCP transports under splices, TLS layers and links.

`write_now` is the latency fix measured in docs/performance.md: Twisted's
``transport.write`` only queues, and the bytes leave on the next reactor turn,
after an ``epoll_ctl`` to watch for writability, another ``epoll_wait`` and a
second ``epoll_ctl`` to stop watching. Every hop of a tunnel paid that per
write; a 1-byte round trip crosses four such hops. When nothing is queued the
kernel almost always takes the bytes at once, so we hand them to ``send()``
straight away (asyncio's transports do the same) and queue only what it did
not take, in order, behind Twisted's usual buffering and backpressure.

What these helpers read or replace inside Twisted's transports (the write
queue, ``doRead``) is in `relay.wire.twisted_internals`, with its tests.
"""

import threading

from relay.wire.twisted_internals import idle_socket, reads_replaceable, replace_do_read

LISTEN_BACKLOG = 1024  # agents and services on loopback burst; Twisted's 50 drops SYNs
# A TCP close waits for the buffered bytes to go out; a peer that never reads
# would keep the socket for ever. The same deadline as the TLS layer's.
CLOSE_DEADLINE_SECONDS = 5.0


def socket_fd(transport) -> int | None:
    """The file descriptor under a TCP transport or a TLS layer on one, or None."""
    try:
        return transport.getHandle().fileno()
    except (AttributeError, OSError, ValueError):
        return None


def lose_connection(transport, deadline_seconds: float = CLOSE_DEADLINE_SECONDS) -> None:
    """``transport.loseConnection()``, aborted after `deadline_seconds` if its
    buffered bytes have not gone by then. Nothing buffered: no timer at all."""
    idle = idle_socket(transport) is not None
    transport.loseConnection()
    reactor = getattr(transport, "reactor", None)
    if idle or reactor is None or not getattr(transport, "connected", False):
        return
    reactor.callLater(deadline_seconds, _abort_if_open, transport)


def _abort_if_open(transport) -> None:
    if getattr(transport, "connected", False):
        transport.abortConnection()


def set_socket_options(transport, keepalive: bool = False) -> None:
    """TCP_NODELAY always (frames and small writes must not wait for Nagle);
    SO_KEEPALIVE on visitor/service sockets so dead idle peers do not leak."""
    try:
        transport.setTcpNoDelay(True)
        if keepalive:
            transport.setTcpKeepAlive(True)
    except (AttributeError, OSError):
        pass  # not a TCP transport (tests, UNIX sockets)


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, sent at once when the transport is idle."""
    sock = idle_socket(transport) if data else None
    if sock is None:
        transport.write(data)
        return
    try:
        sent = sock.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # Let Twisted's own write path meet the error and close the
        # connection the usual way (connectionLost with the reason).
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])


def write_sequence_now(transport, chunks: list) -> None:
    """``transport.writeSequence(chunks)``, sent at once in one ``sendmsg``
    (no join) when the transport is idle."""
    sock = idle_socket(transport)
    if sock is None:
        transport.writeSequence(chunks)
        return
    try:
        sent = sock.sendmsg(chunks)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        transport.writeSequence(chunks)
        return
    for i, chunk in enumerate(chunks):
        if sent < len(chunk):
            rest = chunks[i:]
            if sent:
                rest[0] = chunk[sent:]
            transport.writeSequence(rest)
            return
        sent -= len(chunk)


# One link read: a 1 MiB recv measured 1.3-1.7x the bulk throughput of
# Twisted's 64 KiB (fewer reactor turns per byte), but recv(1 MiB) allocates
# 1 MiB per call: an mmap, page faults, mremap and munmap that cost a small
# message as much as its whole hop. recv_into one reused buffer has neither cost.
LINK_READ_BYTES = 1024 * 1024
_per_thread = threading.local()  # one buffer per reactor thread (forward() runs its own)


def _link_read_view() -> memoryview:
    view = getattr(_per_thread, "link_read", None)
    if view is None:
        view = _per_thread.link_read = memoryview(bytearray(LINK_READ_BYTES))
    return view


def read_into_shared_buffer(transport, deliver=None) -> None:
    """Make a Twisted TCP transport read up to LINK_READ_BYTES at a time into
    one buffer shared by every such transport of this thread, handing a memoryview of the
    bytes read to `deliver` (default: the transport's protocol).

    Only for receivers that copy what they are given before returning (the
    TLS layer writes it into its BIO at once): the reactor is single-threaded
    and the next read on any link overwrites the buffer. `deliver` lets the
    agent skip the endpoint's and ClientService's wrapping protocols, which
    only forward each read; EOF still goes through the transport's protocol.
    Other transports are left as they are.
    """
    if not reads_replaceable(transport):
        return
    replace_do_read(transport, _link_read_view(), deliver)  # the view: in the transport's reactor thread

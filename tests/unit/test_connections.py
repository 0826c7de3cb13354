"""What an answer leaves on the client's connection (issue #13, item 6) and how long a client may
hold it (issue #14 §2): the stall bound while an answer is sent, the TLS handshake's bound."""

import socket
import ssl
import threading

import pytest
from gevent import GreenletExit

from bloblo.connections import StallLimit, bounded_handshakes
from tests.stack.tls import make_server_tls


class ClientSocket:
    """The client's connection as gunicorn hands it to the app: only its timeout matters here."""

    def __init__(self, timeout: float | None):
        self.timeout = timeout

    def gettimeout(self) -> float | None:
        return self.timeout

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout


def _answer(client_socket, app=None):
    """Run the app behind StallLimit(7 s) as gunicorn would: the body's chunks, the socket's
    timeout while they were sent, and its timeout once the answer was closed."""
    seen = []

    def body():
        seen.append(client_socket.timeout)
        yield b"blob"

    def plain_app(environ, start_response):
        start_response("200 OK", [("Content-Length", "4")])
        return body()

    wrapped = StallLimit(app or plain_app, seconds=7)
    answer = wrapped({"gunicorn.socket": client_socket}, lambda status, headers, exc=None: None)
    chunks = list(answer)
    answer.close()
    return chunks, seen, client_socket.timeout


def test_an_answer_bounds_client_stalls_while_it_is_sent_only():
    client_socket = ClientSocket(None)  # gunicorn's gevent worker: a blocking socket
    chunks, while_sent, afterwards = _answer(client_socket)
    assert (chunks, while_sent) == ([b"blob"], [7])
    assert afterwards is None  # the keep-alive connection is as gunicorn made it


def test_an_answer_gives_the_socket_its_own_timeout_back():
    assert _answer(ClientSocket(7.5))[2] == 7.5


def test_an_app_that_raises_leaves_the_socket_as_it_was():
    def failing(environ, start_response):
        start_response("200 OK", [])
        raise RuntimeError("broken")

    client_socket = ClientSocket(None)
    with pytest.raises(RuntimeError):
        _answer(client_socket, failing)
    assert client_socket.timeout is None


def test_an_answer_closes_its_body_before_the_timeout_comes_back():
    client_socket, order = ClientSocket(None), []

    class Body(list):
        def close(self):
            order.append(("body closed", client_socket.timeout))

    def app(environ, start_response):
        start_response("200 OK", [])
        return Body([b"x"])

    _answer(client_socket, app)
    assert order == [("body closed", 7)]


@pytest.fixture
def server_context(tmp_path):
    tls = make_server_tls(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    return context


def test_a_tls_handshake_that_never_comes_ends_the_connection_quietly(server_context):
    server_end, client_end = socket.socketpair()
    # gevent then ends the connection's greenlet, with no traceback.
    with client_end, pytest.raises(GreenletExit):
        bounded_handshakes(server_context, 0.2).wrap_socket(server_end, server_side=True)
    server_end.close()


def test_a_tls_connection_keeps_its_own_timeout_after_the_handshake(server_context):
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server_end, _ = listener.accept()
    client_context = ssl._create_unverified_context()  # the server's certificate is not the point
    handshake = threading.Thread(target=lambda: client_context.wrap_socket(client).close())
    handshake.start()
    wrapped = bounded_handshakes(server_context, 5).wrap_socket(server_end, server_side=True)
    handshake.join()
    assert wrapped.gettimeout() is None
    assert bounded_handshakes(server_context, 5).verify_mode == server_context.verify_mode
    wrapped.close()
    listener.close()

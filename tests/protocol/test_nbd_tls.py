"""TCP and TLS: FORCEDTLS on a listener with a certificate, real clients (libnbd, nbdinfo,
qemu-img) through a test CA made here with openssl, plain clients refused, and plain text
refused off loopback at start."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from rawclient import (
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TLS_REQD,
    REP_INFO,
    REP_SERVER,
    RawClient,
    info_data,
    meta_data,
    request,
)

Reference = Callable[[str, int, int], bytes]
MiB = 1024 * 1024


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> None:
    """ca-cert.pem, ca-key.pem; server-cert.pem, server-key.pem for 127.0.0.1, ::1, localhost."""
    directory.mkdir(parents=True)
    key = ["-newkey", "rsa:2048", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip
    openssl("req", *key, "-keyout", "server-key.pem", "-out", "server.csr",
            "-subj", "/CN=localhost", cwd=directory)  # fmt: skip
    (directory / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", "server-cert.pem", "-days", "2", "-extfile", "ext.cnf",
            cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def pki() -> Iterator[Path]:
    """A test CA with a server certificate (`pki`), and another CA nobody trusts
    (`pki / "rogue"`)."""
    with tempfile.TemporaryDirectory(prefix="sbk-pki-") as top:
        make_ca(Path(top) / "ca", "shadowblk test CA")
        make_ca(Path(top) / "ca" / "rogue", "rogue CA")
        yield Path(top) / "ca"


def server_tls(pki: Path) -> ssl.SSLContext:
    from shadowblk.provider.nbd.tls import server_context

    return server_context(pki / "server-cert.pem", pki / "server-key.pem")


@pytest.fixture
def tls_server(server_factory: Callable[..., Any], pki: Path) -> Any:
    """The server with a TCP listener on 127.0.0.1 that requires TLS (`.tcp_port`)."""
    return server_factory(tcp=True, tls=server_tls(pki))


class TcpRaw(RawClient):
    def __init__(self, port: int) -> None:  # noqa: D107 - a RawClient over TCP
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)

    def starttls(self, ca: Path) -> None:
        context = ssl.create_default_context(cafile=str(ca / "ca-cert.pem"))
        self.send_option(OPT_STARTTLS)
        assert self.option_reply()[:2] == (OPT_STARTTLS, REP_ACK)
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")


def libnbd_tls(port: int, export: str, pki: Path, mode: int) -> Any:
    h = nbd.NBD()
    h.set_export_name(export)
    h.set_tls(mode)
    h.set_tls_certificates(str(pki))
    h.add_meta_context("base:allocation")
    h.connect_tcp("127.0.0.1", str(port))
    return h


# In-process: the server's TCP listener with TLS.


def test_libnbd_over_tls_reads_and_writes(tls_server: Any, pki: Path, reference: Reference) -> None:
    h = libnbd_tls(tls_server.tcp_port, "vol", pki, nbd.TLS_REQUIRE)
    assert h.get_tls_negotiated()
    assert h.get_structured_replies_negotiated()  # negotiated again after STARTTLS
    assert h.can_meta_context("base:allocation") and h.can_multi_conn()
    h.pwrite(b"\xc3" * 4096, MiB)
    h.flush()
    assert reference("vol", MiB, 4096) == b"\xc3" * 4096
    assert h.pread(3 * MiB, 0) == reference("vol", 0, 3 * MiB)
    h.shutdown()


def test_libnbd_without_tls_is_refused(tls_server: Any, pki: Path) -> None:
    with pytest.raises(nbd.Error):
        libnbd_tls(tls_server.tcp_port, "vol", pki, nbd.TLS_DISABLE)


def test_a_client_trusting_another_ca_is_refused(tls_server: Any, pki: Path) -> None:
    with pytest.raises(nbd.Error):
        libnbd_tls(tls_server.tcp_port, "vol", pki / "rogue", nbd.TLS_REQUIRE)
    h = libnbd_tls(tls_server.tcp_port, "vol@1", pki, nbd.TLS_REQUIRE)  # the server goes on
    assert h.is_read_only()


def test_options_before_starttls_get_tls_reqd(tls_server: Any) -> None:
    client = TcpRaw(tls_server.tcp_port)
    client.start()
    options = [(OPT_LIST, b""), (OPT_INFO, info_data("vol")), (OPT_GO, info_data("vol")),
               (OPT_STRUCTURED_REPLY, b""), (OPT_LIST_META_CONTEXT, meta_data("vol")),
               (12345, b"junk")]  # fmt: skip
    for number, data in options:
        assert client.option_replies(number, data) == [
            (REP_ERR_TLS_REQD, b"TLS is required: send NBD_OPT_STARTTLS")
        ]
    assert client.option_replies(OPT_STARTTLS, b"x")[0][0] == REP_ERR_INVALID
    assert client.option_replies(OPT_ABORT) == [(REP_ACK, b"")]
    client.assert_closed()


@pytest.mark.parametrize("flags", [1, 0])
def test_export_name_before_starttls_closes(tls_server: Any, flags: int) -> None:
    client = TcpRaw(tls_server.tcp_port)
    client.start(flags)
    client.send_option(OPT_EXPORT_NAME, b"vol")
    client.assert_closed()
    assert tls_server.statistics()["connections_open"] == 0


def test_starttls_by_hand(tls_server: Any, pki: Path, reference: Reference) -> None:
    client = TcpRaw(tls_server.tcp_port)
    client.start()
    client.starttls(pki)
    replies = client.option_replies(OPT_LIST)
    assert [r for r, _ in replies] == [REP_SERVER, REP_SERVER, REP_ACK]
    assert client.option_replies(OPT_STARTTLS)[0][0] == REP_ERR_INVALID  # already TLS
    replies = client.option_replies(OPT_GO, info_data("vol@1"))
    assert [r for r, _ in replies] == [REP_INFO, REP_INFO, REP_ACK]
    client.sock.sendall(request(0, 4096, 64, handle=7))
    assert client.reply(64) == (0, 7, reference("vol@1", 4096, 64))
    client.sock.sendall(request(2, handle=8))  # NBD_CMD_DISC: close_notify, then the end
    client.assert_closed()


def test_a_broken_tls_handshake_ends_only_that_connection(tls_server: Any, pki: Path) -> None:
    client = TcpRaw(tls_server.tcp_port)
    client.start()
    client.send_option(OPT_STARTTLS)
    assert client.option_reply()[:2] == (OPT_STARTTLS, REP_ACK)
    client.sock.sendall(b"this is not a TLS ClientHello" * 10)
    client.assert_closed()
    assert libnbd_tls(tls_server.tcp_port, "vol", pki, nbd.TLS_REQUIRE).get_tls_negotiated()


def test_structured_replies_and_block_status_over_tls(tls_server: Any, pki: Path) -> None:
    client = TcpRaw(tls_server.tcp_port)
    client.start()
    client.starttls(pki)
    assert client.option_replies(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
    assert client.set_meta("vol", "base:allocation")
    assert client.option_replies(OPT_GO, info_data("vol"))[-1][0] == REP_ACK
    client.sock.sendall(request(7, 0, 512, handle=1))
    assert client.chunks()[0].type == 5  # BLOCK_STATUS over TLS


# A real `shadowblk serve` with a TCP listener.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tls_service(service_factory: Any, short_tmp: Path, pki: Path) -> tuple[Any, int]:
    port = free_port()
    svc = service_factory(short_tmp / "state", "--init-volume", "vol=16M",
                          "--nbd-listen", f"127.0.0.1:{port}",
                          "--tls-cert", str(pki / "server-cert.pem"),
                          "--tls-key", str(pki / "server-key.pem"))  # fmt: skip
    svc.cli.run("create", "vol")
    return svc, port


def run(*argv: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == expect, f"{argv} exited {done.returncode}: {done.stderr}"
    return done


def test_nbdinfo_and_qemu_img_over_tls(service_factory: Any, short_tmp: Path, pki: Path) -> None:
    svc, port = tls_service(service_factory, short_tmp, pki)
    status = svc.cli.json("status")
    assert status["listeners"]["nbd_tcp"] == f"127.0.0.1:{port} (TLS)"
    for export, read_only in [("vol", False), ("vol@1", True)]:
        uri = f"nbds://127.0.0.1:{port}/{export}?tls-certificates={pki}"
        (info,) = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"]
        assert info["export-size"] == 16 * MiB and info["is_read_only"] == read_only
        assert info["can_multi_conn"] and info["can_cache"]
        image = f"driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0"
        out = run("qemu-img", "info", "--output=json", "--object",
                  f"tls-creds-x509,id=tls0,endpoint=client,dir={pki}",
                  "--image-opts", image).stdout  # fmt: skip
        assert json.loads(out)["virtual-size"] == 16 * MiB
    copy = short_tmp / "copy.img"
    image = f"driver=nbd,host=127.0.0.1,port={port},export=vol@1,tls-creds=tls0"
    creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={pki}"
    run("qemu-img", "convert", "-O", "raw", "--object", creds, "--image-opts", image, str(copy))
    assert copy.stat().st_size == 16 * MiB


def test_plain_clients_are_refused_on_the_tls_listener(
    service_factory: Any, short_tmp: Path, pki: Path
) -> None:
    svc, port = tls_service(service_factory, short_tmp, pki)
    run("nbdinfo", f"nbd://127.0.0.1:{port}/vol", expect=1)
    assert svc.log().count("refused: TLS is required") == 3  # STRUCTURED_REPLY, INFO, GO
    run("qemu-img", "info", f"nbd://127.0.0.1:{port}/vol", expect=1)
    assert svc.log().count("refused: TLS is required") > 3
    run("nbdinfo", f"nbds://127.0.0.1:{port}/vol?tls-certificates={pki / 'rogue'}", expect=1)
    run("nbdinfo", f"nbds://127.0.0.1:{port}/vol?tls-certificates={pki}")


def test_plain_tcp_on_loopback(service_factory: Any, short_tmp: Path) -> None:
    port = free_port()
    svc = service_factory(short_tmp / "state", "--init-volume", "vol=16M",
                          "--nbd-listen", f"127.0.0.1:{port}")  # fmt: skip
    assert svc.cli.json("status")["listeners"]["nbd_tcp"] == f"127.0.0.1:{port}"
    (info,) = json.loads(run("nbdinfo", "--json", f"nbd://127.0.0.1:{port}/vol").stdout)["exports"]
    assert info["export-size"] == 16 * MiB
    client = TcpRaw(port)
    client.start()
    assert client.option_replies(OPT_STARTTLS) == [
        (REP_ERR_POLICY, b"TLS is not offered on this listener")
    ]
    client.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "192.0.2.1"])
def test_plain_text_off_loopback_is_refused_at_start(cli: Any, host: str) -> None:
    done = cli.run("serve", "--nbd-listen", f"{host}:{free_port()}", expect=1, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shadowblk: invalid-argument: refusing")
    assert "not a loopback address" in lines[0]
    assert not cli.state_dir.exists()  # refused before anything was opened


@pytest.mark.parametrize(
    "args",
    [
        ["--tls-cert", "{pki}/server-cert.pem"],
        ["--nbd-listen", "127.0.0.1:1", "--tls-key", "{pki}/server-key.pem"],
        ["--tls-cert", "{pki}/server-cert.pem", "--tls-key", "{pki}/server-key.pem"],
        ["--nbd-listen", "127.0.0.1"],
        ["--nbd-listen", "127.0.0.1:0"],
    ],
)
def test_bad_listener_options_are_usage_errors(cli: Any, pki: Path, args: list[str]) -> None:
    done = cli.run("serve", *[a.format(pki=pki) for a in args], expect=2, timeout=60)
    assert done.stderr.startswith("shadowblk: usage:")


def test_a_key_that_does_not_load_is_refused_at_start(cli: Any, pki: Path) -> None:
    done = cli.run("serve", "--nbd-listen", "127.0.0.1:10809",
                   "--tls-cert", str(pki / "server-cert.pem"),
                   "--tls-key", str(pki / "ca-key.pem"), expect=1, timeout=60)  # fmt: skip
    assert done.stderr.startswith("shadowblk: invalid-argument: TLS certificate")

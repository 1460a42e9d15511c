"""The TLS listener's certificates: a CA of this kernel's own and a server
certificate it signs, made at first boot in the state dir and reused after.

Clients on other machines trust the CA file (``state_dir/tls/ca.pem``, public)
and present a token in sys.hello as on the Unix socket; the channel keeps the
token secret and proves the kernel's identity. The CA stays put across boots;
the server certificate is made again from it when it no longer names every
host the kernel answers to, is near its end, or was not signed by this CA, so
a CA file handed out once keeps working.

Keys are EC P-256, written 0600 in a 0700 directory; the server refuses
anything older than TLS 1.2 (and speaks 1.3 to whoever can).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import secrets
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .services import BootError

log = logging.getLogger("llmagentos.kernel")

TLS_DIR = "tls"  # in the state dir
CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept; remade from the CA well before it ends
RENEW_BEFORE = datetime.timedelta(days=30)
WILDCARDS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class Credentials:
    cert: Path
    key: Path
    ca: Path | None  # what clients should trust; None: a certificate brought by the user


def server_names(listen_host: str, also: tuple[str, ...] = ()) -> list[str]:
    """Every name a client may reach this kernel by: the listen host (unless a
    wildcard), loopback, the machine's names and their addresses, and ``also``
    (the address Ray cluster nodes know this machine by)."""
    names = [listen_host] if listen_host not in WILDCARDS else []
    names += list(also)
    host = socket.gethostname()
    names += ["localhost", "127.0.0.1", "::1", host, socket.getfqdn()]
    try:  # the addresses the host name stands for (what cluster nodes often dial)
        names += [str(a[4][0]) for a in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]
    except OSError:
        pass
    return list(dict.fromkeys(n.lower() for n in names if n))


def credentials(state_dir: Path, listen_host: str, cert: Path | None = None,
                key: Path | None = None, also: tuple[str, ...] = ()) -> Credentials:
    """The certificate and key to serve with: the user's own, or this kernel's
    CA and server certificate (made or remade as needed)."""
    if cert is not None and key is not None:
        return Credentials(cert, key, None)
    d = state_dir / TLS_DIR
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    ca_cert, ca_key = _ca(d)
    names = server_names(listen_host, also)
    why = _stale(d, ca_cert, names)
    if why:
        log.info("making a TLS server certificate (%s) for %s", why, ", ".join(names))
        _issue(d, ca_cert, ca_key, names)
    return Credentials(d / SERVER_CERT, d / SERVER_KEY, d / CA_CERT)


def server_context(creds: Credentials) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(creds.cert, creds.key)
    except (OSError, ssl.SSLError) as e:
        raise BootError(f"cannot serve TLS with certificate {creds.cert} and key {creds.key}: "
                        f"{e}") from None
    return ctx


def _ca(d: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = d / CA_CERT, d / CA_KEY
    if not cert_path.exists() and not key_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                             f"LLMAgentOS kernel CA ({socket.gethostname()})")])
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        _write_key(key_path, key)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        log.info("made a TLS CA in %s: clients on other machines trust %s", d, cert_path)
        return cert, key
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise BootError(f"cannot read this kernel's TLS CA in {d} ({e}); remove {d} to make a "
                        "new one (clients then need the new ca.pem)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _pair(key, cert):
        raise BootError(f"{key_path} is not the key of {cert_path}; remove {d} to make a new CA")
    return cert, key


def _stale(d: Path, ca: x509.Certificate, names: list[str]) -> str:
    """Why the server certificate in ``d`` must be made again ("" if it may serve)."""
    try:
        cert = x509.load_pem_x509_certificate((d / SERVER_CERT).read_bytes())
        key = serialization.load_pem_private_key((d / SERVER_KEY).read_bytes(), password=None)
    except FileNotFoundError:
        return "none yet"
    except (OSError, ValueError, TypeError):
        return "the one there is unreadable"
    if not _pair(key, cert):
        return "its key does not match"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "not signed by this CA"
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return "near its end"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subject alternative names"
    have = {str(n).lower() for n in san.get_values_for_type(x509.DNSName)}
    have |= {str(n) for n in san.get_values_for_type(x509.IPAddress)}
    missing = [n for n in names if _san_text(n) not in have]
    return f"new names: {', '.join(missing)}" if missing else ""


def _issue(d: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
           names: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=SERVER_DAYS),
                                 ca.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_key(d / SERVER_KEY, key)
    _write(d / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))


def _pair(key, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private key of ``cert``."""
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _general_name(name: str) -> x509.GeneralName:
    ip = _ip(name)
    return x509.IPAddress(ip) if ip is not None else x509.DNSName(name)


def _san_text(name: str) -> str:
    ip = _ip(name)
    return str(ip) if ip is not None else name


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write(path, key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def _write(path: Path, data: bytes) -> None:
    """Born 0600 under a temporary name, then renamed into place: never readable
    by others, never half written."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)

"""Who is who: key pairs, self-signed certificates, fingerprints, credentials and join tokens.

Every node and every user has its own ECDSA P-256 key and a self-signed certificate,
made on first use and kept owner-only (0600). Its **id** is the SHA-256 fingerprint of
the certificate's DER bytes: kept as 64 hex digits inside pdp, shown to people the way
Syncthing shows device ids (base32 in eight dash-separated groups of seven, each group of
thirteen characters carrying a Luhn mod-32 check character, so a mistyped id is caught).

Files:

* a node's identity: ``<data_dir>/node.pem`` (private key, then certificate);
* a user's credential: one JSON file (``--key-file`` / ``$PDP_KEY_FILE``, default
  ``<user config dir>/pdp/user.cred``) holding the user's name, key and certificate, and
  the fingerprints of the party's nodes it trusts ("pins");
* a join token (``pdp invite`` prints it, ``pdp join`` takes it): ``pdp1-`` + base64url of
  a JSON object with the party's addresses, the node fingerprints to pin, the name and
  kind of the new identity and a one-time secret. The party stores only the secret's
  SHA-256 (:func:`token_hash`).

Nothing here touches the network; :mod:`pdp.net.tls` turns identities into TLS contexts.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pdp.errors import ConfigError

KINDS = ("node", "user")
TOKEN_PREFIX = "pdp1-"
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


# -- ids ----------------------------------------------------------------------------


def fingerprint(cert_der: bytes) -> str:
    """The id of a certificate: SHA-256 of its DER bytes, 64 lowercase hex digits."""
    return hashlib.sha256(cert_der).hexdigest()


def cert_der(cert_pem: str) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem.encode("ascii")).public_bytes(serialization.Encoding.DER)


def pem_fingerprint(cert_pem: str) -> str:
    return fingerprint(cert_der(cert_pem))


def _luhn32(group: str) -> str:
    """Syncthing's Luhn mod 32 check character of a base32 group."""
    factor, total = 1, 0
    for ch in group:
        addend = factor * _B32.index(ch)
        factor = 1 if factor == 2 else 2
        total += addend // 32 + addend % 32
    return _B32[(32 - total % 32) % 32]


def display_id(fp: str) -> str:
    """A fingerprint as people compare it: ``ABCDEFG-HIJKLMN-...`` (8 groups of 7)."""
    b32 = base64.b32encode(bytes.fromhex(fp)).decode("ascii").rstrip("=")  # 52 characters
    with_checks = "".join(b32[i:i + 13] + _luhn32(b32[i:i + 13]) for i in range(0, 52, 13))
    return "-".join(with_checks[i:i + 7] for i in range(0, 56, 7))


def parse_id(text: str) -> str:
    """A fingerprint from either form (64 hex digits, or the dashed form with its checks)."""
    text = text.strip()
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return text.lower()
    chars = text.replace("-", "").replace(" ", "").upper()
    if len(chars) != 56 or any(c not in _B32 for c in chars):
        raise ConfigError(f"{text!r} is not a pdp id (64 hex digits, or 8 groups of 7 as `pdp id` prints)")
    groups = [chars[i:i + 14] for i in range(0, 56, 14)]
    for g in groups:
        if _luhn32(g[:13]) != g[13]:
            raise ConfigError(f"{text!r} is not a valid pdp id: a check character is wrong (a typo?)")
    raw = "".join(g[:13] for g in groups) + "===="
    return base64.b32decode(raw).hex()


# -- key pairs and certificates -------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A key pair with its self-signed certificate (PEM), and the certificate's fingerprint."""

    name: str
    kind: str
    key_pem: str
    cert_pem: str
    fp: str = field(default="")

    def __post_init__(self) -> None:
        if not self.fp:
            object.__setattr__(self, "fp", pem_fingerprint(self.cert_pem))

    @property
    def display(self) -> str:
        return display_id(self.fp)


def new_identity(name: str, kind: str) -> Identity:
    """A fresh ECDSA P-256 key and a self-signed certificate naming ``name`` (valid 100 years)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64]),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"pdp {kind}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=36500))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
    return Identity(name, kind, key_pem, cert.public_bytes(serialization.Encoding.PEM).decode("ascii"))


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (mode 0600 from the start), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read_private(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} ({what}) is readable by other users; run: chmod 600 {path}")
    return text


def node_identity_path(data_dir: Path) -> Path:
    return data_dir / "node.pem"


def load_node_identity(data_dir: Path, name: str, create: bool = True) -> Identity:
    """This node's identity from ``<data_dir>/node.pem``, made on first use."""
    path = node_identity_path(data_dir)
    try:
        text = _read_private(path, "the node identity")
    except FileNotFoundError:
        if not create:
            raise ConfigError(f"no node identity at {path}: run `pdp party init` or `pdp join TOKEN` first") from None
        ident = new_identity(name, "node")
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # the node's private files live here
        write_private(path, ident.key_pem + ident.cert_pem)
        return ident
    key_end = text.index("-----END PRIVATE KEY-----") + len("-----END PRIVATE KEY-----\n")
    return Identity(name, "node", text[:key_end], text[key_end:])


# -- user credentials ----------------------------------------------------------------------------


def default_credential_path() -> Path:
    env = os.environ.get("PDP_KEY_FILE")
    return Path(env) if env else Path(platformdirs.user_config_dir("pdp")) / "user.cred"


@dataclass
class Credential:
    """A user's identity plus the node fingerprints it trusts (learned at join, kept up to date)."""

    identity: Identity
    pins: set[str] = field(default_factory=set)  # fingerprints of the party's nodes
    path: Path | None = None
    addrs: dict[str, str] = field(default_factory=dict)  # node fingerprint -> its address (to refresh pins)

    def learn(self, nodes: dict[str, str]) -> None:
        """The party's current node ids (from a pinned member): trust exactly those."""
        if nodes and (set(nodes) != self.pins or nodes != self.addrs):
            self.pins, self.addrs = set(nodes), dict(nodes)
            self.save()

    @property
    def name(self) -> str:
        return self.identity.name

    def save(self) -> None:
        if self.path is None:
            return
        body = {"version": 1, "name": self.identity.name, "key": self.identity.key_pem,
                "cert": self.identity.cert_pem, "pins": sorted(self.pins), "nodes": self.addrs}
        write_private(self.path, json.dumps(body, indent=1) + "\n")


def load_credential(path: Path | None = None) -> Credential:
    """A user's credential file, with a message that says how to get one."""
    path = path or default_credential_path()
    try:
        body = json.loads(_read_private(path, "the user credential"))
        ident = Identity(str(body["name"]), "user", str(body["key"]), str(body["cert"]))
        pins = {parse_id(p) for p in body.get("pins", [])}
        addrs = {parse_id(fp): str(a) for fp, a in (body.get("nodes") or {}).items()}
    except FileNotFoundError:
        raise ConfigError(f"no pdp credential at {path}: run `pdp join TOKEN` with a token from the party's admin "
                          "(`pdp invite NAME --user`), or `pdp party init` to found a party "
                          "(or pass --key-file / set PDP_KEY_FILE)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a pdp credential file ({exc})") from None
    return Credential(ident, pins, path, addrs)


def new_credential(path: Path | None, name: str, pins: set[str], force: bool = False,
                   addrs: dict[str, str] | None = None) -> Credential:
    path = path or default_credential_path()
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; pass --force to replace it (its old identity stops working "
                          "only when an admin revokes it)")
    cred = Credential(new_identity(name, "user"), set(pins), path, dict(addrs or {}))
    cred.save()
    return cred


# -- join tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    name: str
    kind: str  # "node" | "user"
    addrs: tuple[str, ...]
    pins: tuple[str, ...]  # node fingerprints to pin
    secret: str  # 64 hex digits, used once
    expires: float

    def encode(self) -> str:
        body = {"n": self.name, "k": self.kind, "a": list(self.addrs), "f": list(self.pins), "s": self.secret,
                "e": self.expires}
        raw = json.dumps(body, separators=(",", ":")).encode()
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    @property
    def hash(self) -> str:
        return token_hash(self.secret)


def new_secret() -> str:
    return secrets.token_hex(32)


def token_hash(secret: str) -> str:
    """What the party keeps of a join secret: its SHA-256."""
    return hashlib.sha256(b"pdp-join-v1 " + secret.encode("ascii")).hexdigest()


def parse_token(text: str) -> Token:
    text = text.strip()
    if not text.startswith(TOKEN_PREFIX):
        raise ConfigError("that is not a pdp join token (it starts with `pdp1-`; ask the admin for `pdp invite NAME`)")
    try:
        body64 = text[len(TOKEN_PREFIX):]
        raw = base64.urlsafe_b64decode(body64 + "=" * (-len(body64) % 4))
        body: dict[str, Any] = json.loads(raw)
        token = Token(str(body["n"]), str(body["k"]), tuple(str(a) for a in body["a"]),
                      tuple(parse_id(str(f)) for f in body["f"]), str(body["s"]), float(body["e"]))
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise ConfigError(f"the join token is damaged ({exc}); copy it again, whole") from None
    if token.kind not in KINDS or not token.addrs or not token.pins or len(token.secret) != 64:
        raise ConfigError("the join token is incomplete; copy it again, whole")
    return token


# -- signed requests -----------------------------------------------------------------------------

SIGNED_FOR = 300.0  # seconds a signed request stays valid


def sign(ident: Identity, body: dict[str, Any]) -> dict[str, str]:
    """Sign a request with this identity's key, so the master can check who asked even when a
    member node relays it: ``{"fp", "body" (canonical JSON with a time and a nonce), "sig"}``."""
    full = {**body, "ts": round(time.time(), 3), "nonce": secrets.token_hex(8)}
    text = json.dumps(full, sort_keys=True, separators=(",", ":"))
    key = serialization.load_pem_private_key(ident.key_pem.encode("ascii"), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return {"fp": ident.fp, "body": text, "sig": key.sign(text.encode(), ec.ECDSA(hashes.SHA256())).hex()}


def verify(auth: Any, cert_pem: str, now: float) -> dict[str, Any]:
    """The signed body, if ``auth`` is a valid, fresh signature by ``cert_pem``'s key; else ConfigError."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(auth, dict) or not all(isinstance(auth.get(k), str) for k in ("fp", "body", "sig")):
        raise ConfigError("the request is not signed")
    if len(auth["body"]) > 16384 or len(auth["sig"]) > 512:
        raise ConfigError("the signed request is too large")
    cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
    pub = cert.public_key()
    try:
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(bytes.fromhex(auth["sig"]), auth["body"].encode(), ec.ECDSA(hashes.SHA256()))
        body = json.loads(auth["body"])
    except (InvalidSignature, ValueError, AssertionError):
        raise ConfigError("the request's signature does not verify") from None
    if not isinstance(body, dict) or not isinstance(body.get("ts"), (int, float)) \
            or abs(now - float(body["ts"])) > SIGNED_FOR:
        raise ConfigError("the signed request is stale (check the clocks)")
    return body

"""The files a node keeps in its data dir, and how secrets are written (0600, atomically).

DATA_DIR/meshmail.toml   the config `meshmail init` or `meshmail join` wrote
DATA_DIR/keyring.json    the gossip keys, primary first (0600); kept current as they rotate
DATA_DIR/api-token       this node's admin API token, for the `meshmail` CLI (0600)
DATA_DIR/ca.pem          the cluster CA certificate
DATA_DIR/ca-key.pem      the CA key, on masters only (0600)
DATA_DIR/node.pem        this node's certificate; node-key.pem its key (0600)
DATA_DIR/state/          the replicated state's journal (0700)
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import MeshmailError
from ..core.files import atomic_write
from ..gossip.keyring import KEY_SIZE, decode_key, encode_key

CONFIG = "meshmail.toml"
KEYRING = "keyring.json"
API_TOKEN = "api-token"
CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
NODE_CERT = "node.pem"
NODE_KEY = "node-key.pem"
STATE = "state"
#: Files `meshmail init` and `join` create; their presence means a node lives in the folder.
NODE_FILES = (CONFIG, KEYRING, CA_CERT, NODE_CERT, NODE_KEY)


class FilesError(MeshmailError):
    """A data dir file that cannot be read or written; str() is one line."""


def write_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically, created with `mode` (a secret is never readable by
    others, not even for a moment); raises FilesError."""
    try:
        atomic_write(path, [data], mode=mode)
    except OSError as exc:
        raise FilesError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_file(path: Path, limit: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except OSError as exc:
        raise FilesError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise FilesError(f"{path} is larger than {limit} bytes")
    return data


def save_keyring(data_dir: Path, keys: list[bytes] | tuple[bytes, ...]) -> None:
    document = {"keys": [encode_key(key) for key in keys]}
    write_file(Path(data_dir) / KEYRING, (json.dumps(document, indent=2) + "\n").encode())


def load_keyring(data_dir: Path) -> list[bytes] | None:
    """The keys of DATA_DIR/keyring.json, primary first; None when there is no such file."""
    path = Path(data_dir) / KEYRING
    if not path.exists():
        return None
    try:
        document = json.loads(read_file(path))
        keys = [decode_key(text) for text in document["keys"]]
    except (ValueError, KeyError, TypeError):
        raise FilesError(f'{path}: not a keyring (expected {{"keys": [base64, ...]}})') from None
    if not keys or any(len(key) != KEY_SIZE for key in keys):
        raise FilesError(f"{path}: needs at least one key, each {KEY_SIZE} bytes")
    return keys


def read_api_token(data_dir: Path) -> str | None:
    """The node's API token from DATA_DIR/api-token, or None when there is none."""
    path = Path(data_dir) / API_TOKEN
    if not path.exists():
        return None
    return read_file(path, 1024).decode("ascii", "replace").strip()

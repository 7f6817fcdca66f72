"""Ed25519 keys and signatures in docs/protocol.md's encodings."""

import base64
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exam_contract.canonical import canonical_bytes
from exam_contract.signing import (KeyFileError, PublicKeyError, generate_private_key, load_private_key,
                                   parse_public_key, public_key_b64, sign, verify)

from .factories import segment


@pytest.fixture
def key(tmp_path):
    return generate_private_key(tmp_path / "keys" / "agent.key")


def test_generate_writes_pkcs8_pem_mode_0600(tmp_path):
    path = tmp_path / "sub" / "agent.key"
    key = generate_private_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_key_b64(load_private_key(path)) == public_key_b64(key)


def test_generate_refuses_to_overwrite(tmp_path):
    path = tmp_path / "agent.key"
    path.write_bytes(b"keep me")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_private_key(path)
    assert path.read_bytes() == b"keep me"


def test_sign_verify_canonical_manifest(key):
    data = canonical_bytes(segment().to_dict())
    signature = sign(key, data)
    assert len(base64.b64decode(signature, validate=True)) == 64
    assert verify(key.public_key(), data, signature)
    assert verify(parse_public_key(public_key_b64(key)), data, signature)


def test_tampered_byte_fails(key):
    data = bytearray(canonical_bytes(segment().to_dict()))
    signature = sign(key, bytes(data))
    for position in (0, len(data) // 2, len(data) - 1):
        tampered = bytearray(data)
        tampered[position] ^= 0x01
        assert not verify(key.public_key(), bytes(tampered), signature)


def test_tampered_signature_fails(key):
    data = b"segment"
    raw = bytearray(base64.b64decode(sign(key, data)))
    raw[10] ^= 0x80
    assert not verify(key.public_key(), data, base64.b64encode(bytes(raw)).decode())


def test_wrong_key_fails(key):
    other = Ed25519PrivateKey.generate()
    assert not verify(other.public_key(), b"data", sign(key, b"data"))


@pytest.mark.parametrize("signature", ["", "not base64!", base64.b64encode(b"\0" * 63).decode(),
                                       base64.b64encode(b"\0" * 65).decode(), None])
def test_malformed_signature_is_false_not_an_exception(key, signature):
    assert verify(key.public_key(), b"data", signature) is False


def test_public_key_is_base64_of_32_raw_bytes(key):
    text = public_key_b64(key)
    raw = base64.b64decode(text, validate=True)
    assert len(raw) == 32
    assert raw == key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert public_key_b64(key.public_key()) == text


def test_parse_public_key_tolerates_surrounding_whitespace(key):
    assert public_key_b64(parse_public_key(f"  {public_key_b64(key)}\n")) == public_key_b64(key)


@pytest.mark.parametrize("text, message", [
    ("not base64!", "not valid base64"),
    ("QUJD", "3 bytes, expected 32"),
    ("", "0 bytes, expected 32"),
    (base64.b64encode(b"\1" * 33).decode(), "33 bytes, expected 32"),
    (base64.b64encode(b"\1" * 32).decode()[:-1], "not valid base64"),  # broken padding
    ("公钥", "not valid base64"),
])
def test_parse_public_key_errors(text, message):
    with pytest.raises(PublicKeyError, match=message):
        parse_public_key(text)


def test_public_key_error_is_a_value_error():
    assert issubclass(PublicKeyError, ValueError)


def test_load_missing_key_file_names_the_file(tmp_path):
    path = tmp_path / "absent.key"
    with pytest.raises(KeyFileError, match=f"cannot read key file {path}"):
        load_private_key(path)


def test_load_directory_is_a_key_file_error(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_private_key(tmp_path)


@pytest.mark.parametrize("content", [b"", b"hello", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"])
def test_load_non_pem_key_file(tmp_path, content):
    path = tmp_path / "agent.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=f"key file {path} is not an unencrypted PKCS#8 PEM"):
        load_private_key(path)


def test_load_encrypted_key_file(tmp_path):
    path = tmp_path / "agent.key"
    path.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(KeyFileError, match="not an unencrypted PKCS#8 PEM"):
        load_private_key(path)


@pytest.mark.parametrize("make", [lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
                                  lambda: ec.generate_private_key(ec.SECP256R1())], ids=["rsa", "ec"])
def test_load_non_ed25519_key_file(tmp_path, make):
    path = tmp_path / "agent.key"
    path.write_bytes(make().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_private_key(path)


def test_public_pem_is_not_a_private_key(tmp_path):
    path = tmp_path / "agent.pub"
    path.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(KeyFileError):
        load_private_key(path)

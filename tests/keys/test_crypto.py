from __future__ import annotations

import base64
import logging
import os
import uuid

import pytest

from broker.keys.crypto import KeyContext, Keyring, SealedKey, UnsealError, load_keyring
from broker.settings import ConfigurationError, Settings


def kek() -> bytes:
    return os.urandom(32)


def context() -> KeyContext:
    return KeyContext(uuid.uuid4(), uuid.uuid4(), uuid.uuid4())


SECRET = "comfyui-" + "ab" * 32


class TestSealing:
    def test_round_trip(self) -> None:
        keyring = Keyring({"k1": kek()}, "k1")
        where = context()
        sealed = keyring.seal(SECRET, where)
        assert sealed.kek_id == "k1"
        assert SECRET.encode() not in sealed.ciphertext + sealed.wrapped_data_key
        assert keyring.unseal(sealed, where) == SECRET

    def test_each_seal_uses_a_fresh_data_key_and_nonce(self) -> None:
        keyring = Keyring({"k1": kek()}, "k1")
        where = context()
        first, second = keyring.seal(SECRET, where), keyring.seal(SECRET, where)
        assert first.ciphertext != second.ciphertext
        assert first.wrapped_data_key != second.wrapped_data_key

    @pytest.mark.parametrize("moved", ["tenant_id", "user_id", "credential_id"])
    def test_ciphertext_moved_to_another_row_does_not_open(self, moved: str) -> None:
        keyring = Keyring({"k1": kek()}, "k1")
        where = context()
        sealed = keyring.seal(SECRET, where)
        elsewhere = KeyContext(**{**where.__dict__, moved: uuid.uuid4()})
        with pytest.raises(UnsealError):
            keyring.unseal(sealed, elsewhere)

    def test_tampered_ciphertext_does_not_open(self) -> None:
        keyring = Keyring({"k1": kek()}, "k1")
        where = context()
        sealed = keyring.seal(SECRET, where)
        flipped = bytes([sealed.ciphertext[-1] ^ 1])
        damaged = SealedKey(
            sealed.kek_id, sealed.wrapped_data_key, sealed.ciphertext[:-1] + flipped
        )
        with pytest.raises(UnsealError):
            keyring.unseal(damaged, where)

    def test_unknown_kek_id_is_an_unseal_error(self) -> None:
        sealed = Keyring({"k1": kek()}, "k1").seal(SECRET, where := context())
        with pytest.raises(UnsealError, match="k1"):
            Keyring({"k2": kek()}, "k2").unseal(sealed, where)

    def test_a_missing_kek_is_logged_by_its_id(self, caplog: pytest.LogCaptureFixture) -> None:
        sealed = Keyring({"k1": kek()}, "k1").seal(SECRET, where := context())
        with pytest.raises(UnsealError), caplog.at_level(logging.ERROR, "broker.keys"):
            Keyring({"k2": kek()}, "k2").unseal(sealed, where)
        (line,) = [record.getMessage() for record in caplog.records]
        assert "kek_id=k1" in line
        assert "'k1' is not in this process's keyring (it has k2)" in line
        assert str(where.user_id) in line
        assert SECRET not in line

    def test_same_id_with_another_key_does_not_open(self) -> None:
        sealed = Keyring({"k1": kek()}, "k1").seal(SECRET, where := context())
        with pytest.raises(UnsealError):
            Keyring({"k1": kek()}, "k1").unseal(sealed, where)


class TestRewrap:
    def test_rewrap_moves_to_the_new_primary_and_keeps_the_ciphertext(self) -> None:
        old, new = kek(), kek()
        where = context()
        sealed = Keyring({"old": old}, "old").seal(SECRET, where)
        rotated = Keyring({"old": old, "new": new}, "new")
        rewrapped = rotated.rewrap(sealed, where)
        assert rewrapped.kek_id == "new"
        assert rewrapped.ciphertext == sealed.ciphertext
        assert Keyring({"new": new}, "new").unseal(rewrapped, where) == SECRET

    def test_rewrap_refuses_a_seal_that_does_not_open(self) -> None:
        old = kek()
        sealed = Keyring({"old": old}, "old").seal(SECRET, context())
        with pytest.raises(UnsealError):
            Keyring({"old": old, "new": kek()}, "new").rewrap(sealed, context())


class TestKeyringConfiguration:
    def encoded(self) -> str:
        return base64.b64encode(kek()).decode()

    def test_last_entry_is_primary_by_default(self) -> None:
        settings = Settings(ENV="test", KEYRING=f"a:{self.encoded()},b:{self.encoded()}")
        keyring = load_keyring(settings)
        assert keyring.primary_id == "b"
        assert keyring.key_ids == ["a", "b"]

    def test_explicit_primary(self) -> None:
        settings = Settings(
            ENV="test", KEYRING=f"a:{self.encoded()},b:{self.encoded()}", KEYRING_PRIMARY="a"
        )
        assert load_keyring(settings).primary_id == "a"

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("nocolon", "id:base64key"),
            ("a:not base64!", "not valid base64"),
            ("a:" + base64.b64encode(b"short").decode(), "32 bytes"),
        ],
    )
    def test_bad_keyring_is_refused_without_echoing_it(self, value: str, message: str) -> None:
        with pytest.raises(ConfigurationError, match=message) as raised:
            load_keyring(Settings(ENV="test", KEYRING=value))
        assert value not in str(raised.value)

    def test_unknown_primary_is_refused(self) -> None:
        settings = Settings(ENV="test", KEYRING=f"a:{self.encoded()}", KEYRING_PRIMARY="zz")
        with pytest.raises(ConfigurationError, match="zz"):
            load_keyring(settings)

    def test_repr_shows_ids_not_keys(self) -> None:
        key = kek()
        keyring = Keyring({"a": key}, "a")
        assert key.hex() not in repr(keyring)
        assert "a" in repr(keyring)

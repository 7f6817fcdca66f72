"""`exam-collector doctor` against real parts (mosquitto, SQLite, PostgreSQL, SeaweedFS, certificates made with
`cryptography`): passing on a good setup, and failing each check one at a time with its whole line and exit code."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from collector.config import load_config
from collector.db import alembic_config, head_revision, make_engine
from collector.serve_lock import serve_running
from tests.conftest import _unavailable
from tests.support.deploy_broker import DeployBroker, add_password, make_test_ca
from tests.support.deploy_broker import TestCA as BrokerCA
from tests.support.services import free_port, mosquitto_binary, small_filesystem

pytestmark = [pytest.mark.mosquitto]
BIN = Path(sys.executable).parent


def doctor(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "exam-collector"), "--config", str(config), "doctor", "--timeout", "4"],
                          capture_output=True, text=True, timeout=120)


def lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """check name -> its line, from doctor's output."""
    return {line[6:].split(": ", 1)[0]: line for line in result.stdout.splitlines()}


def configure(tmp_path: Path, broker_url: str, database_url: str, upgrade: bool = True) -> Path:
    config = tmp_path / "collector.toml"
    subprocess.run([str(BIN / "exam-collector"), "--config", str(config), "init", "--data-dir",
                    str(tmp_path / "data"), "--broker", broker_url, "--database-url", database_url],
                   check=True, capture_output=True)
    if upgrade:
        subprocess.run([str(BIN / "exam-collector"), "--config", str(config), "db", "upgrade"], check=True,
                       capture_output=True)
    return config


def set_in(config: Path, table: str, *settings: str) -> None:
    """Add `key = value` lines at the top of `[table]`."""
    text = config.read_text()
    header = f"\n[{table}]\n"
    assert header in text
    config.write_text(text.replace(header, header + "".join(f"{line}\n" for line in settings), 1))


def test_a_good_setup_passes(tmp_path: Path, mosquitto, database_url: str) -> None:
    config = configure(tmp_path, mosquitto.url, database_url)
    cfg = load_config(config)
    result = doctor(config)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout
    found = lines(result)
    where = ("SQLite " + str(tmp_path / "collector.db")) if database_url.startswith("sqlite") else \
        "PostgreSQL 127.0.0.1:5432/test"
    assert list(found) == ["config", "collector key file", "database", "schema", f"storage_dir {cfg.storage_dir}",
                           f"broker 127.0.0.1:{mosquitto.port}", f"broker login 127.0.0.1:{mosquitto.port}", "clock"]
    assert found["config"] == (f"ok    config: {config}: database {where}, storage filesystem, broker "
                               f"127.0.0.1:{mosquitto.port}")
    assert found["collector key file"].startswith(f"ok    collector key file: {cfg.key_file} (mode 0600, SHA-256 ")
    assert found["database"] == f"ok    database: {where} answers"
    assert found["schema"] == f"ok    schema: at revision {head_revision()}, the newest"
    storage = found[f"storage_dir {cfg.storage_dir}"]
    assert storage.startswith(("ok    storage_dir ", "WARN  storage_dir ")), storage
    assert storage.startswith(f"ok    storage_dir {cfg.storage_dir}: writable, fsync works, ") or \
        storage.endswith("grow the volume before it fills (stored footage is deleted only by exam-retention enforce)")
    assert found[f"broker 127.0.0.1:{mosquitto.port}"] == \
        f"ok    broker 127.0.0.1:{mosquitto.port}: accepts TCP connections"
    assert found[f"broker login 127.0.0.1:{mosquitto.port}"] == \
        f"ok    broker login 127.0.0.1:{mosquitto.port}: logged in as (anonymous)"
    if database_url.startswith("sqlite"):
        assert found["clock"] == "skip  clock: n/a on SQLite: the database has no clock but this machine's"
    else:
        assert found["clock"].startswith("ok    clock: ")
        assert found["clock"].endswith(" s against the database server (within 2 s)")


def test_a_key_file_others_can_read_fails(tmp_path: Path, mosquitto) -> None:
    config = configure(tmp_path, mosquitto.url, f"sqlite:///{tmp_path / 'c.db'}")
    key = tmp_path / "data" / "collector.key"
    key.chmod(0o640)
    result = doctor(config)
    assert result.returncode == 1
    assert lines(result)["collector key file"] == (f"FAIL  collector key file: {key} has mode 0640, readable by "
                                                   f"others than its owner: chmod 600 {key}")
    assert sum(line.startswith("FAIL") for line in result.stdout.splitlines()) == 1


def test_a_missing_key_file_fails(tmp_path: Path, mosquitto) -> None:
    config = configure(tmp_path, mosquitto.url, f"sqlite:///{tmp_path / 'c.db'}")
    key = tmp_path / "data" / "collector.key"
    key.unlink()
    result = doctor(config)
    assert result.returncode == 1
    assert lines(result)["collector key file"] == (f"FAIL  collector key file: cannot read key file {key}: No such "
                                                   "file or directory: fix the path in the config or create the key")


def test_a_config_typo_is_the_only_line(tmp_path: Path, mosquitto) -> None:
    config = configure(tmp_path, mosquitto.url, f"sqlite:///{tmp_path / 'c.db'}")
    config.write_text(config.read_text().replace("database_url = ", "databse_url = "))
    result = doctor(config)
    assert (result.returncode, result.stdout) == (
        1, "FAIL  config: [collector] databse_url is not a known key; did you mean database_url?\n")


def test_an_unreachable_database_exits_2(tmp_path: Path, mosquitto) -> None:
    port = free_port()
    config = configure(tmp_path, mosquitto.url, f"postgresql+psycopg://postgres@127.0.0.1:{port}/test",
                       upgrade=False)
    result = doctor(config)
    assert result.returncode == 2
    found = lines(result)
    assert found["database"] == (f"FAIL  database: database PostgreSQL 127.0.0.1:{port}/test is unreachable "
                                 "(OperationalError): start it or fix [collector] database_url")
    assert found["clock"] == "skip  clock: not compared: the database did not answer"
    assert "schema" not in found


def test_a_schema_behind_the_code_fails(tmp_path: Path, mosquitto, database_url: str) -> None:
    config = configure(tmp_path, mosquitto.url, database_url)
    engine = make_engine(database_url)
    command.downgrade(alembic_config(engine), "0008_object_storage")
    engine.dispose()
    where = ("SQLite " + str(tmp_path / "collector.db")) if database_url.startswith("sqlite") else \
        "PostgreSQL 127.0.0.1:5432/test"
    result = doctor(config)
    assert result.returncode == 1
    assert lines(result)["schema"] == (f"FAIL  schema: database {where} is at schema revision 0008_object_storage, "
                                       f"not {head_revision()}: run `exam-collector db upgrade`")


def test_a_storage_dir_that_cannot_take_a_file_fails(tmp_path: Path, mosquitto) -> None:
    config = configure(tmp_path, mosquitto.url, f"sqlite:///{tmp_path / 'c.db'}")
    storage = tmp_path / "data" / "storage"
    storage.write_text("a file where the folder should be")
    result = doctor(config)
    assert result.returncode == 1
    assert lines(result)[f"storage_dir {storage}"] == (f"FAIL  storage_dir {storage}: cannot write and fsync a file "
                                                       "there (File exists): fix the path, its owner or the mount")


def test_little_free_space_is_a_warning_not_a_failure(tmp_path: Path, mosquitto) -> None:
    config = configure(tmp_path, mosquitto.url, f"sqlite:///{tmp_path / 'c.db'}")
    storage = tmp_path / "data" / "storage"
    with small_filesystem(storage, 1024):
        result = doctor(config)
    assert result.returncode == 0, result.stdout
    assert lines(result)[f"storage_dir {storage}"] == (
        f"WARN  storage_dir {storage}: writable, fsync works, but only 1 MB free (100 % of the volume; warned below "
        "10 GiB or 10%): grow the volume before it fills (stored footage is deleted only by exam-retention enforce)")


def test_a_broker_that_is_down_exits_2(tmp_path: Path) -> None:
    port = free_port()
    config = configure(tmp_path, f"mqtt://127.0.0.1:{port}", f"sqlite:///{tmp_path / 'c.db'}")
    result = doctor(config)
    assert result.returncode == 2
    found = lines(result)
    assert found[f"broker 127.0.0.1:{port}"] == (f"FAIL  broker 127.0.0.1:{port}: MQTT broker 127.0.0.1:{port} is "
                                                 "unreachable (Connection refused): start it or fix [mqtt] url")
    assert f"broker login 127.0.0.1:{port}" not in found


def test_a_running_serve_is_not_disturbed(tmp_path: Path, mosquitto) -> None:
    """`serve` holds data_dir/serve.lock while it runs: doctor then skips the login (with the production broker's
    use_username_as_clientid it would end serve's session), and says why."""
    config = configure(tmp_path, mosquitto.url, f"sqlite:///{tmp_path / 'c.db'}")
    data_dir = tmp_path / "data"
    serve = subprocess.Popen([str(BIN / "exam-collector"), "--config", str(config), "serve"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60   # a guard against a hang, not a measurement
        while not serve_running(data_dir):
            assert serve.poll() is None, serve.stderr.read() if serve.stderr else ""
            assert time.monotonic() < deadline, "serve never took its lock"
            time.sleep(0.1)
        result = doctor(config)
        assert serve.poll() is None
    finally:
        serve.terminate()
        serve.wait(timeout=60)
    assert result.returncode == 0, result.stdout
    assert lines(result)[f"broker login 127.0.0.1:{mosquitto.port}"] == (
        f"skip  broker login 127.0.0.1:{mosquitto.port}: exam-collector serve is running on this data_dir (it holds "
        f"{data_dir / 'serve.lock'}); logging in as (anonymous) would end its broker session: stop it to check the "
        "login")
    assert not serve_running(data_dir)
    assert lines(doctor(config))[f"broker login 127.0.0.1:{mosquitto.port}"].startswith("ok    ")


# ---------------------------------------------------------------------------- certificates

def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_cert(folder: Path, name: str, *, host: str = "localhost", days: tuple[int, int] = (-1, 30),
               issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
               key: ec.EllipticCurvePrivateKey | None = None) -> tuple[Path, Path, x509.Certificate]:
    """A server certificate for `host`, valid from now+days[0] to now+days[1], signed by `issuer` (self-signed
    without); returns (cert.pem, key.pem, certificate)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = key or _key()
    now = datetime.now(timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[0].subject if issuer else subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now + timedelta(days=days[0])).not_valid_after(now + timedelta(days=days[1]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False))
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path, cert


def test_portal_tls_certificate_checks(tmp_path: Path, mosquitto) -> None:
    config = configure(tmp_path, mosquitto.url, f"sqlite:///{tmp_path / 'c.db'}")
    base = config.read_text()
    tls = tmp_path / "tls"

    def check(cert: Path, key: Path) -> subprocess.CompletedProcess[str]:
        config.write_text(base)
        set_in(config, "http", f'cert_file = "{cert}"', f'key_file = "{key}"')
        return doctor(config)

    good_cert, good_key, cert = write_cert(tls, "good")
    result = check(good_cert, good_key)
    assert result.returncode == 0, result.stdout
    assert lines(result)["portal TLS"] == (f"ok    portal TLS: certificate CN=localhost valid until "
                                           f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, key matches")

    old_cert, old_key, old = write_cert(tls, "expired", days=(-30, -1))
    result = check(old_cert, old_key)
    assert result.returncode == 1
    assert lines(result)["portal TLS"] == (f"FAIL  portal TLS: the certificate in {old_cert} (CN=localhost) expired on "
                                           f"{old.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: renew it, then restart "
                                           "serve")

    result = check(good_cert, old_key)
    assert result.returncode == 1
    assert lines(result)["portal TLS"] == (f"FAIL  portal TLS: [http] key_file = '{old_key}' is not the private key "
                                           f"of the certificate in cert_file = '{good_cert}': give the key the "
                                           "certificate was made for")

    result = check(good_cert, tls / "absent.key")
    assert result.returncode == 1
    assert lines(result)["portal TLS"] == (f"FAIL  portal TLS: [http] key_file = '{tls / 'absent.key'}' does not "
                                           "exist: create it or fix the path")


@pytest.fixture
def tls_broker(tmp_path: Path):
    """deploy/'s mosquitto (TLS, password file, ACL, use_username_as_clientid) with the collector-1 account."""
    for tool in ("openssl", "mosquitto_passwd"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            _unavailable(tool)
    if mosquitto_binary() is None:
        _unavailable("mosquitto")
    started: list[DeployBroker] = []

    def start(ca: BrokerCA, password: str) -> DeployBroker:
        broker = DeployBroker(workdir=tmp_path / f"broker-{len(started)}", ca=ca)
        broker.workdir.mkdir()
        add_password(broker.passwd, "collector-1", password)
        broker.start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


def test_broker_tls_and_login_against_the_production_broker_config(tmp_path: Path, tls_broker) -> None:
    ca = make_test_ca(tmp_path / "ca")
    password = secrets.token_urlsafe(16)
    broker = tls_broker(ca, password)
    config = configure(tmp_path, f"mqtts://localhost:{broker.port}", f"sqlite:///{tmp_path / 'c.db'}")
    (tmp_path / "mqtt.pass").write_text(password + "\n")
    (tmp_path / "wrong.pass").write_text("not the password\n")
    base = config.read_text()

    def with_login(password_file: Path) -> subprocess.CompletedProcess[str]:
        config.write_text(base)
        set_in(config, "mqtt", 'username = "collector-1"', f'password_file = "{password_file}"',
               f'ca_file = "{ca.ca_cert}"')
        return doctor(config)

    result = with_login(tmp_path / "mqtt.pass")
    assert result.returncode == 0, result.stdout
    found = lines(result)
    assert found[f"TLS localhost:{broker.port}"].startswith(f"ok    TLS localhost:{broker.port}: certificate for "
                                                            "localhost accepted, valid until ")
    assert found[f"broker login localhost:{broker.port}"] == \
        f"ok    broker login localhost:{broker.port}: logged in as collector-1"

    result = with_login(tmp_path / "wrong.pass")
    assert result.returncode == 1
    assert lines(result)[f"broker login localhost:{broker.port}"] == (
        f"FAIL  broker login localhost:{broker.port}: MQTT broker localhost:{broker.port} refused the connection "
        "(Not authorized): check [mqtt] username and password_file (or cert_file/key_file)")


@pytest.mark.parametrize("problem, verify_message", [
    ("expired", "certificate has expired"),
    ("other host", "Hostname mismatch, certificate is not valid for 'localhost'."),
])
def test_broker_certificate_expired_or_for_another_host_exits_2(tmp_path: Path, tls_broker, problem: str,
                                                                verify_message: str) -> None:
    ca = make_test_ca(tmp_path / "ca")
    ca_cert = x509.load_pem_x509_certificate(ca.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key((tmp_path / "ca" / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    cert, key, _ = write_cert(tmp_path / "server", "server", issuer=(ca_cert, ca_key),
                              days=(-30, -1) if problem == "expired" else (-1, 30),
                              host="broker.example.cn" if problem == "other host" else "localhost")
    password = secrets.token_urlsafe(16)
    broker = tls_broker(BrokerCA(ca_cert=ca.ca_cert, server_cert=cert, server_key=key), password)
    config = configure(tmp_path, f"mqtts://localhost:{broker.port}", f"sqlite:///{tmp_path / 'c.db'}")
    (tmp_path / "mqtt.pass").write_text(password + "\n")
    set_in(config, "mqtt", 'username = "collector-1"', f'password_file = "{tmp_path / "mqtt.pass"}"',
           f'ca_file = "{ca.ca_cert}"')
    result = doctor(config)
    assert result.returncode == 2, result.stdout
    found = lines(result)
    assert found[f"TLS localhost:{broker.port}"] == (
        f"FAIL  TLS localhost:{broker.port}: the broker's certificate is not accepted ({verify_message}): give the CA "
        "that signed it in [mqtt] ca_file, and a certificate whose subjectAltName names localhost")
    assert f"broker login localhost:{broker.port}" not in found


# ---------------------------------------------------------------------------- object storage

def test_s3_bucket_checked_with_the_store(tmp_path: Path, mosquitto, seaweed) -> None:  # noqa: ANN001
    from collector.footage_store import StorageSetupError, open_store
    from tests.support.seaweed import Bucket

    config = configure(tmp_path, mosquitto.url, f"sqlite:///{tmp_path / 'c.db'}")
    text = config.read_text()
    start, end = text.index("\n[storage]\n"), text.index("\n[ingest]\n")

    def use(bucket: Bucket) -> subprocess.CompletedProcess[str]:
        config.write_text(text[:start] + "\n" + bucket.storage_toml(tmp_path) + "\n" + text[end:])
        return doctor(config)

    locked = Bucket(seaweed, seaweed.new_bucket())
    result = use(locked)
    assert result.returncode == 0, result.stdout
    store = open_store(load_config(config))
    assert lines(result)[f"storage bucket {locked.name}"] == \
        f"ok    storage bucket {locked.name}: {store} answers, Object Lock enabled"

    unlocked = Bucket(seaweed, seaweed.new_bucket(lock=False))
    result = use(unlocked)
    assert result.returncode == 1
    with pytest.raises(StorageSetupError) as refused:
        open_store(load_config(config))
    assert lines(result)[f"storage bucket {unlocked.name}"] == f"FAIL  storage bucket {unlocked.name}: {refused.value}"


def test_doctor_is_in_the_exit_code_contract() -> None:
    """Checks map onto the shared exit codes: 1 fix the config or files, 2 something does not answer."""
    from exam_contract import exitcodes
    from exam_contract.doctor import Check, exit_code

    assert exit_code([Check.passed("a", "x"), Check.warn("b", "y"), Check.skip("c", "z")]) == exitcodes.OK
    assert exit_code([Check.failed("a", "x", exitcodes.UNREACHABLE), Check.failed("b", "y")]) == exitcodes.UNREACHABLE
    assert Check.warn("b", "y").line() == "WARN  b: y"

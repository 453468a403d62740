"""Security of a real in-process sidecar: owner-only channel, loopback by default, TLS,
mutual TLS, and admin calls refused unless a token or an mTLS identity allows them."""

from __future__ import annotations

import stat
from pathlib import Path

import grpc
import pytest

from support import make_pki, start_inprocess_sidecar
from detector.api.liedetector.v1 import detector_pb2 as pb
from detector.api.liedetector.v1 import detector_pb2_grpc as pb_grpc
from detector.sidecar.app import SidecarSettings, load_settings


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), ("server", "admin-client", "reader-client"))


def test_channel_socket_is_owner_only_and_grpc_on_loopback(tmp_path) -> None:
    sidecar = start_inprocess_sidecar(tmp_path)
    try:
        mode = stat.S_IMODE((tmp_path / "ch.sock").stat().st_mode)
        assert mode == 0o600
        assert SidecarSettings().grpc_address.startswith("127.0.0.1:")
    finally:
        sidecar.stop()


def test_admin_calls_are_off_by_default(tmp_path) -> None:
    sidecar = start_inprocess_sidecar(tmp_path)
    try:
        with grpc.insecure_channel(sidecar.settings.grpc_address) as ch:
            stub = pb_grpc.DetectorStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.LoadProbe(pb.LoadProbeRequest(path="/x"), timeout=5,
                               metadata=(("authorization", "Bearer anything"),))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "LIE_DETECTOR_ADMIN_TOKEN" in err.value.details()
            # Reads stay open.
            assert stub.ListProbes(pb.ListProbesRequest(), timeout=5).probes == []
    finally:
        sidecar.stop()


def test_admin_token(tmp_path) -> None:
    sidecar = start_inprocess_sidecar(tmp_path, admin_token="s3cret")
    try:
        with grpc.insecure_channel(sidecar.settings.grpc_address) as ch:
            stub = pb_grpc.DetectorStub(ch)
            for metadata, code in [((), grpc.StatusCode.UNAUTHENTICATED),
                                   ((("authorization", "Bearer nope"),),
                                    grpc.StatusCode.PERMISSION_DENIED),
                                   ((("authorization", "Bearer s3cret"),),
                                    grpc.StatusCode.NOT_FOUND)]:  # allowed: reaches the call
                with pytest.raises(grpc.RpcError) as err:
                    stub.UnloadProbe(pb.UnloadProbeRequest(name="p"), timeout=5,
                                     metadata=metadata)
                assert err.value.code() == code
    finally:
        sidecar.stop()


def test_tls_refuses_plaintext_clients(tmp_path, pki) -> None:
    key, crt = pki["server"]
    sidecar = start_inprocess_sidecar(tmp_path, tls_cert_file=crt, tls_key_file=key)
    try:
        address = sidecar.settings.grpc_address
        creds = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        with grpc.secure_channel(address, creds) as ch:
            assert pb_grpc.DetectorStub(ch).ListProbes(pb.ListProbesRequest(),
                                                       timeout=5).probes == []
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.DetectorStub(ch).ListProbes(pb.ListProbesRequest(), timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        sidecar.stop()


def test_mutual_tls_identity_allows_admin(tmp_path, pki) -> None:
    key, crt = pki["server"]
    sidecar = start_inprocess_sidecar(tmp_path, tls_cert_file=crt, tls_key_file=key,
                                      tls_client_ca_file=pki["ca"],
                                      admin_identities=["admin-client"])
    address = sidecar.settings.grpc_address
    ca = pki["ca"].read_bytes()

    def stub_for(who: str | None):
        if who is None:
            return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))
        k, c = pki[who]
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(
            ca, private_key=k.read_bytes(), certificate_chain=c.read_bytes()))

    try:
        with stub_for("admin-client") as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.DetectorStub(ch).UnloadProbe(pb.UnloadProbeRequest(name="p"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # allowed through
        with stub_for("reader-client") as ch:
            stub = pb_grpc.DetectorStub(ch)
            assert stub.ListProbes(pb.ListProbesRequest(), timeout=5).probes == []
            with pytest.raises(grpc.RpcError) as err:
                stub.UnloadProbe(pb.UnloadProbeRequest(name="p"), timeout=5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with stub_for(None) as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.DetectorStub(ch).ListProbes(pb.ListProbesRequest(), timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # no client cert, no entry
    finally:
        sidecar.stop()


def test_tls_settings_are_checked(tmp_path, pki) -> None:
    from detector.sidecar.app import SettingsError

    key, crt = pki["server"]
    with pytest.raises(SettingsError, match="together"):
        load_settings(None, tls_cert_file=crt)
    with pytest.raises(SettingsError, match="need mutual TLS"):
        load_settings(None, admin_identities=["x"])
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(None, tls_cert_file=tmp_path / "no.crt", tls_key_file=key)


def test_serve_keeps_the_admin_token_out_of_vllms_environment(tmp_path: Path,
                                                              monkeypatch) -> None:
    """The sidecar reads it; vLLM, its workers and whatever they log never see it."""
    from detector.serving.serve import ServeOptions, engine_env

    monkeypatch.setenv("LIE_DETECTOR_ADMIN_TOKEN", "s3cret-admin")
    env = engine_env(ServeOptions(model_dir=tmp_path), [4])
    assert "LIE_DETECTOR_ADMIN_TOKEN" not in env
    assert "s3cret-admin" not in env.values()
    assert env["LIE_DETECTOR_LAYERS"] == "4"


def test_each_serve_gets_a_channel_of_its_own(tmp_path: Path, monkeypatch) -> None:
    """Two `lie-detector serve` on one machine never share a channel (they used to meet on
    the per-user default, and one vLLM published into the other's sidecar)."""
    from detector.serving.serve import ServeOptions, Supervisor, engine_env, sidecar_command

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    first = Supervisor(ServeOptions(model_dir=tmp_path), num_layers=30)
    second = Supervisor(ServeOptions(model_dir=tmp_path), num_layers=30)
    channels = [s.opts.channel for s in (first, second)]
    assert channels[0] != channels[1]
    assert first.opts.channel_key_file.read_text() != second.opts.channel_key_file.read_text()
    for sup, channel in zip((first, second), channels):
        directory = Path(channel.removeprefix("ipc://")).parent
        assert directory.parent == tmp_path
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        env, cmd = engine_env(sup.opts, [4]), sidecar_command(sup.opts)
        assert env["LIE_DETECTOR_CHANNEL"] == channel and channel in cmd
        # Its own channel key too, handed to both processes, readable by its owner only.
        key = sup.opts.channel_key_file
        assert key is not None and stat.S_IMODE(key.stat().st_mode) == 0o600
        assert env["LIE_DETECTOR_CHANNEL_KEY_FILE"] == str(key)
        assert cmd[cmd.index("--channel-key-file") + 1] == str(key)
        sup.shutdown()  # nothing started: only the private directory to remove
        assert not directory.exists()
    explicit = Supervisor(ServeOptions(model_dir=tmp_path, channel="ipc:///x/y.sock"), 30)
    assert explicit.opts.channel == "ipc:///x/y.sock"
    assert explicit.opts.channel_key_file.is_file()
    explicit.shutdown()

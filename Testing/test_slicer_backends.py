"""Backends (status sentences, Test connection, local server process), settings and conversation data."""

from __future__ import annotations

import pytest
from slicer_fakes.fixtures import fake_slicer, wait_until  # noqa: F401


@pytest.fixture
def backends(fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib import backends

    return backends


@pytest.mark.parametrize(
    ("code", "words"),
    [(401, "rejected the token"), (404, "check the URL"), (413, "larger"), (502, "proxy"), (500, "HTTP 500")],
)
def test_status_codes_become_sentences(backends, code, words):
    assert words in backends.describe_status(code)


def test_urls_are_normalised_or_rejected(backends):
    assert backends.normalize_url(" gpu-box:8765/ ") == "http://gpu-box:8765"
    assert backends.normalize_url("https://x.org") == "https://x.org"
    for bad in ("", "ftp://x.org"):
        with pytest.raises(ValueError):
            backends.normalize_url(bad)
    assert backends.is_loopback("http://127.0.0.1:9") and backends.is_loopback("http://localhost")
    assert not backends.is_loopback("http://10.0.0.2:9")


def test_handshake_sentences_against_a_real_server(backends, serve):
    open_server = serve()
    assert backends.handshake(open_server.url, None)[1].startswith(
        "connected: engine scripted, models: scripted-1"
    )
    locked = serve(token="s3cret")
    assert "rejected the token" in backends.handshake(locked.url, "wrong")[1]
    assert backends.handshake(locked.url, "s3cret")[1].startswith("connected")
    assert "no server at" in backends.handshake(f"http://127.0.0.1:{backends.free_port()}", None)[1]
    assert "enter the server URL" in backends.handshake("  ", None)[1]


def test_handshake_refuses_a_server_of_another_api_version(backends, serve, monkeypatch):
    import medmllm.protocol

    server = serve()
    assert backends.handshake(server.url, None)[0] is True
    monkeypatch.setattr(medmllm.protocol, "API_VERSION", "999")  # this module now speaks 999
    ok, sentence = backends.handshake(server.url, None)
    assert not ok and sentence == (
        "the server speaks API version 1, this module 999: update the older of the two"
    )


def test_handshake_sentences_for_what_is_not_a_medmllm_server(backends, monkeypatch):
    class Answer:
        def __init__(self, status, body):
            self.status_code, self._body = status, body

        def json(self):
            if self._body is None:
                raise ValueError("not JSON")
            return self._body

    pages = {"/healthz": Answer(200, {"status": "ok"}), "/v1/models": Answer(200, None)}
    monkeypatch.setattr(backends.requests, "get", lambda url, **kw: pages[url[len("http://h:1") :]])
    not_ours = "something answers there, but it is not a MedMLLM server"
    assert backends.handshake("h:1", None) == (False, not_ours)
    pages["/healthz"] = Answer(200, None)  # an HTML page, say
    assert "not a MedMLLM server" in backends.handshake("h:1", None)[1]
    pages["/healthz"] = Answer(502, None)
    assert "proxy" in backends.handshake("h:1", None)[1]


def test_local_server_command_runs_the_cli_module(backends):
    import os

    server = backends.LocalServer("builtin", ["--store", "/tmp/x"])
    server.token = "-starts-with-a-dash"  # token_urlsafe can do that; argparse would choke on it
    command = server.command()
    assert command[1:4] == ["-m", "medmllm.cli", "serve"] and command[-2:] == ["--store", "/tmp/x"]
    assert all(server.token not in part for part in command), "the token stays out of `ps`"
    env = server.environment()
    assert env["MEDMLLM_TOKEN"] == server.token
    bundle = env["PYTHONPATH"].split(os.pathsep)[0]
    assert os.path.isfile(os.path.join(bundle, "medmllm", "cli", "__main__.py"))


def test_local_server_starts_answers_and_stops(backends, tmp_path):
    server = backends.LocalServer("builtin", ["--store", str(tmp_path / "store")])
    server.start()
    try:
        url = server.wait_ready(60)
        assert url == f"http://127.0.0.1:{server.port}"
        assert backends.handshake(url, server.token)[1].startswith("connected: engine builtin")
        assert "rejected the token" in backends.handshake(url, "not-the-token")[1]
    finally:
        server.stop()
    assert not server.running
    assert all(server.token not in line for line in server.log)
    server.stop()  # twice is harmless


def test_local_server_that_dies_reports_its_log(backends, tmp_path):
    server = backends.LocalServer("no-such-engine", ["--store", str(tmp_path / "store")])
    server.start()
    with pytest.raises(RuntimeError, match="stopped while starting"):
        server.wait_ready(60)
    assert not server.running


def _install_with_real_pip(panel, monkeypatch, packages):
    """Press Install with `packages` missing; pip runs for real with PIP_NO_INDEX (nothing is
    downloaded: a requirement that is not installed fails as it would offline)."""
    from MedMLLMSlicerLib import backends

    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setattr(backends, "SERVER_PACKAGES", packages)
    panel.start_server("builtin", [])
    assert panel.server is None and panel.install_banner.visible
    panel.install_banner.button.click()
    assert not panel.send_button.isEnabled() and not panel.install_banner.button.isEnabled(), (
        "no second click"
    )
    panel.input.setPlainText("q")
    panel.send()
    assert "Installing" in panel.status_label.text() and panel.job is None
    assert wait_until(lambda: not panel.installing, 120), "pip did not finish"


def test_missing_packages_are_listed_not_installed(backends, monkeypatch, fake_slicer):  # noqa: F811
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "uvicorn" else real(name))
    assert backends.missing_server_packages() == ["uvicorn>=0.27,<1"]
    from MedMLLMSlicerLib.chat_panel import ChatPanel

    panel = ChatPanel()
    panel.start_server("builtin", [])
    assert panel.server is None and panel.install_banner.visible and fake_slicer.pip_requests == []
    panel.cleanup()


def test_install_runs_pip_off_the_main_thread_and_reports_its_failure(fake_slicer, monkeypatch):  # noqa: F811
    """pip must not block Slicer, and a failure must reach the user with pip's own last lines."""
    from MedMLLMSlicerLib.chat_panel import ChatPanel

    panel = ChatPanel()
    panel.accept_intended_use()
    _install_with_real_pip(panel, monkeypatch, {"medmllm_no_such_module": "medmllm-no-such-package>=1"})
    assert panel.install_banner.visible and panel.install_banner.button.isEnabled()
    text = panel.install_banner.label.text()
    assert "could not install" in text and "medmllm-no-such-package" in text and "ERROR" in text
    assert panel.send_button.isEnabled()
    _install_with_real_pip(panel, monkeypatch, {"medmllm_no_such_module": "pip"})  # already there: success
    assert not panel.install_banner.visible and "installed" in panel.status_label.text()
    panel.cleanup()


def test_token_is_kept_in_memory_unless_remembered(fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib.settings import Settings

    settings = Settings()
    settings.remote_url = "http://a:1"
    settings.set_token("secret-1", remember=False)
    assert settings.token == "secret-1"
    assert not any("Token" in key and "remember" not in key for key in settings.stored_keys())
    assert Settings().token == ""
    settings.set_token("secret-2", remember=True)
    assert Settings().token == "secret-2"
    settings.set_token("secret-3", remember=False)
    assert Settings().token == "" and Settings().url_history == ["http://a:1"]
    with pytest.raises(ValueError):
        settings.mode = "cloud"


def test_conversation_json_and_safe_html():
    from MedMLLMSlicerLib.conversation import Conversation, Item, Turn, parse_link, render_html

    chat = Conversation(
        turns=[Turn("user", "<script>x</script> **hi**"), Turn("assistant", "ok", [Item("box", "a<b")])]
    )
    assert Conversation.from_json(chat.to_json()) == chat
    page = render_html(chat)
    assert "<script>" not in page and "&lt;script&gt;" in page and "<b>hi</b>" in page
    assert 'href="medmllm:item/1/0"' in page and "a&lt;b" in page
    assert parse_link("medmllm:item/1/0") == (1, 0) and parse_link("http://evil") is None
    assert chat.messages() == [
        {"role": "user", "content": "<script>x</script> **hi**"},
        {"role": "assistant", "content": "ok"},
    ]
    for bad in ("{", '{"format": 7}', "[]"):
        with pytest.raises(ValueError):
            Conversation.from_json(bad)


def test_module_metadata_and_widget(fake_slicer):  # noqa: F811
    import MedMLLMSlicer

    parent = type("Parent", (), {})()
    MedMLLMSlicer.MedMLLMSlicer(parent)
    assert parent.title and parent.categories and parent.contributors and parent.acknowledgementText
    for words in ("M3D-LaMed", "MiniGPT-Med", "MedRegA", "Apache-2.0", "not for diagnosis"):
        assert words in parent.helpText
    widget = MedMLLMSlicer.MedMLLMSlicerWidget()
    widget.setup()
    assert widget.ui.chatHost.layout().indexOf(widget.panel.widget) >= 0
    stopped = []
    widget.panel.server = type("Server", (), {"stop": lambda self: stopped.append(True)})()
    fake_slicer.app.aboutToQuit.emit()
    assert stopped == [True] and widget.panel.server is None, "quitting Slicer stops the local server"
    widget.cleanup()


def test_openai_mode_runs_the_openai_engine_locally(fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib.chat_panel import ChatPanel

    panel = ChatPanel()
    panel.mode_combo.setCurrentIndex(2)
    panel.openai_url_edit.setText("http://vllm:8000/v1")
    panel.openai_model_edit.setText("Lingshu-7B")
    panel.dialect_combo.setCurrentIndex(1)
    assert panel._local_options() == (
        "openai",
        ["--base-url", "http://vllm:8000/v1", "--dialect", "qwen25vl", "--model", "Lingshu-7B"],
    )
    panel.toggle_log()
    assert not panel.log_view.isHidden() and "No local server" in panel.log_view.toPlainText()
    panel.cleanup()


def test_builtin_asks_before_totalsegmentator_may_download(fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib.chat_panel import ChatPanel

    panel = ChatPanel()
    panel.mode_combo.setCurrentIndex(0)
    assert panel._local_options() == ("builtin", [])  # never without the user's tick
    panel.anatomy_check.setChecked(True)
    assert panel._local_options() == ("builtin", ["--option", "anatomy_download=yes"])
    assert ChatPanel().anatomy_check.isChecked(), "the choice is remembered"
    panel.anatomy_check.setChecked(False)
    panel._local_options()
    panel.cleanup()

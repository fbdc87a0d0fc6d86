"""The chat panel: backend choice, volume/ROI selectors, conversation view, input, Send/Stop.

Plain Qt built in code (`import qt`), so it runs in Slicer (PythonQt) and under the PySide6 shim in
tests: callbacks instead of custom signals, worker threads + a queue + QTimer instead of QThread.
Nothing here blocks on the network; nothing here opens a modal dialog (banners instead).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional

import qt
import slicer
from medmllm.engines.registry import engine_names

from MedMLLMSlicerLib import backends, scene_writer
from MedMLLMSlicerLib.conversation import Conversation, Item, Turn, parse_link, render_html
from MedMLLMSlicerLib.parameters import ChatParameters, chat_parameters
from MedMLLMSlicerLib.qtutil import prop
from MedMLLMSlicerLib.settings import DIALECTS, Settings
from MedMLLMSlicerLib.worker import ChatJob, Dispatcher

log = logging.getLogger(__name__)

INTENDED_USE = (
    "<b>Research use only — not for diagnosis.</b> Answers come from experimental language models "
    "(M3D-LaMed, MiniGPT-Med, MedRegA, ...) or from simple built-in tools; they can be wrong, and "
    "boxes and masks are suggestions to check. Each model has its own licence: see the model list "
    "and the module's Help."
)
MODE_LABELS = (
    ("local", "Local (this computer)"),
    ("remote", "Remote server"),
    ("openai", "OpenAI-compatible"),
)
RENDER_MS = 50


def _default_client_factory(base_url: str, token: Optional[str]) -> Any:
    from medmllm.client import MedMLLMClient

    return MedMLLMClient(base_url, token=token)


class _EnterFilter(qt.QObject):
    """Enter sends, Shift+Enter inserts a new line (an event filter: PythonQt has no custom signals)."""

    def __init__(self, on_enter: Callable[[], None]) -> None:
        super().__init__()
        self._on_enter = on_enter

    def eventFilter(self, obj: Any, event: Any) -> bool:
        enter = event.type() == qt.QEvent.KeyPress and event.key() in (qt.Qt.Key_Return, qt.Qt.Key_Enter)
        if enter and not (event.modifiers() & qt.Qt.ShiftModifier):
            self._on_enter()
            return True
        return False


class _Banner:
    """An inline, non-modal question: text, an action button and Cancel (hidden until shown)."""

    def __init__(self, action: str, on_action: Callable[[], None], on_cancel: Callable[[], None]) -> None:
        self.frame = qt.QFrame()
        self.frame.setObjectName("medmllmBanner")  # the style must not reach the QLabel (a QFrame too)
        self.frame.setStyleSheet("#medmllmBanner { background: #fde2e1; border: 1px solid #c0392b; }")
        column = qt.QVBoxLayout(self.frame)  # text above the buttons: long text (pip's) gets the width
        self.label = qt.QLabel("")
        self.label.setWordWrap(True)
        self.label.setTextFormat(qt.Qt.PlainText)  # pip's output and URLs are not HTML
        self.label.setTextInteractionFlags(qt.Qt.TextSelectableByMouse)  # e.g. to copy pip's error
        column.addWidget(self.label)
        row = qt.QHBoxLayout()
        row.addStretch(1)
        self.button = qt.QPushButton(action)
        self.button.clicked.connect(lambda *_: on_action())
        row.addWidget(self.button)
        self.cancel_button = qt.QPushButton("Cancel")
        self.cancel_button.clicked.connect(lambda *_: (self.hide(), on_cancel()))
        row.addWidget(self.cancel_button)
        column.addLayout(row)
        self.frame.setVisible(False)

    def show(self, text: str) -> None:
        self.label.setText(text)
        self.frame.setVisible(True)

    def hide(self) -> None:
        self.frame.setVisible(False)

    @property
    def visible(self) -> bool:
        return not self.frame.isHidden()


class ChatPanel:
    """Owns the widgets and the conversation state; `widget` goes into the module panel."""

    def __init__(
        self, parent: Any = None, client_factory: Optional[Callable[[str, Optional[str]], Any]] = None
    ) -> None:
        self.client_factory = client_factory or _default_client_factory
        self.params: ChatParameters = chat_parameters()
        self.settings = Settings()
        self.dispatcher = Dispatcher()
        self.server: Optional[backends.LocalServer] = None
        self.job: Optional[ChatJob] = None
        self.conversation = Conversation()
        self.scene: Optional[scene_writer.ConversationScene] = None
        self.models: List[Dict[str, Any]] = []
        self._consented: set = set()
        self._checked: set = set()  # servers that passed the version handshake
        self._pending: Optional[Callable[[], None]] = None
        self._dirty = False
        self.installing = False
        self._shown_volume_id: Optional[str] = None  # the volume whose conversation is shown
        self._observers: List[int] = []
        self.widget = qt.QWidget(parent)
        layout = qt.QVBoxLayout(self.widget)
        self._build_intended_use(layout)
        self._build_backend(layout)
        self._build_inputs(layout)
        self._build_chat(layout)
        self._render_timer = qt.QTimer()
        self._render_timer.setInterval(RENDER_MS)
        self._render_timer.timeout.connect(self._render_if_dirty)
        self._render_timer.start()
        self._observe_scene()
        self.refresh_nodes()
        self._update_mode()
        self._set_busy(False)

    # ---- construction -------------------------------------------------------------------------

    def _build_intended_use(self, layout: Any) -> None:
        self.intended_use = qt.QFrame()
        self.intended_use.setStyleSheet("QFrame { background: #fff4d6; border: 1px solid #d9a400; }")
        row = qt.QHBoxLayout(self.intended_use)
        text = qt.QLabel(INTENDED_USE)
        text.setWordWrap(True)
        row.addWidget(text, 1)
        self.accept_button = qt.QPushButton("I understand")
        self.accept_button.clicked.connect(self.accept_intended_use)
        row.addWidget(self.accept_button)
        layout.addWidget(self.intended_use)
        self.intended_use.setVisible(not self.settings.flag("acceptedIntendedUse"))

    def _build_backend(self, layout: Any) -> None:
        box = qt.QGroupBox("Backend")
        form = qt.QFormLayout(box)
        self.mode_combo = qt.QComboBox()
        for key, label in MODE_LABELS:
            self.mode_combo.addItem(label, key)
        self.mode_combo.setCurrentIndex([k for k, _ in MODE_LABELS].index(self.settings.mode))
        self.mode_combo.currentIndexChanged.connect(lambda *_: self._update_mode())
        form.addRow("Backend:", self.mode_combo)
        self.mode_pages = qt.QStackedWidget()
        local = qt.QFormLayout(self._page())
        self.engine_edit = qt.QLineEdit(self.settings.text("localEngine", "builtin"))
        self.engine_edit.setToolTip(
            f"Engine of the local server (builtin needs no weights): {', '.join(engine_names())}"
        )
        local.addRow("Local engine:", self.engine_edit)
        self.anatomy_check = qt.QCheckBox("TotalSegmentator may download its weights once (internet)")
        self.anatomy_check.setToolTip(
            "The built-in engine names every organ with TotalSegmentator (pip install 'medmllm[anatomy]'); "
            "its weights download once from GitHub, only if this is ticked"
        )
        self.anatomy_check.setChecked(self.settings.flag("anatomyDownload"))
        local.addRow("Organs:", self.anatomy_check)
        remote = qt.QFormLayout(self._page())
        self.url_combo = qt.QComboBox()
        self.url_combo.setEditable(True)
        self.url_combo.addItems(self.settings.url_history)
        self.url_combo.setEditText(self.settings.remote_url)
        remote.addRow("Server URL:", self.url_combo)
        self.token_edit = qt.QLineEdit(self.settings.token)
        self.token_edit.setEchoMode(qt.QLineEdit.Password)
        self.remember_check = qt.QCheckBox("remember")
        self.remember_check.setChecked(self.settings.remember_token)
        token_row = qt.QHBoxLayout()
        token_row.addWidget(self.token_edit, 1)
        token_row.addWidget(self.remember_check)
        remote.addRow("Token:", token_row)
        openai = qt.QFormLayout(self._page())
        self.openai_url_edit = qt.QLineEdit(self.settings.text("openaiUrl", "http://127.0.0.1:8000/v1"))
        openai.addRow("Base URL:", self.openai_url_edit)
        self.openai_model_edit = qt.QLineEdit(self.settings.text("openaiModel", ""))
        openai.addRow("Model name:", self.openai_model_edit)
        self.dialect_combo = qt.QComboBox()
        self.dialect_combo.addItems(list(DIALECTS))
        openai.addRow("Dialect:", self.dialect_combo)
        form.addRow(self.mode_pages)
        buttons = qt.QHBoxLayout()
        self.connect_button = qt.QPushButton("Test connection")
        self.connect_button.clicked.connect(self.test_connection)
        self.server_button = qt.QPushButton("Stop local server")
        self.server_button.clicked.connect(self.stop_server)
        self.log_button = qt.QPushButton("Show server log")
        self.log_button.clicked.connect(self.toggle_log)
        for button in (self.connect_button, self.server_button, self.log_button):
            buttons.addWidget(button)
        form.addRow(buttons)
        self.connection_label = qt.QLabel("")
        self.connection_label.setWordWrap(True)
        form.addRow(self.connection_label)
        self.install_banner = _Banner("Install", self.install_packages, self._dismissed)
        self.log_view = qt.QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setVisible(False)
        form.addRow(self.log_view)
        self.model_combo = qt.QComboBox()
        self.model_combo.currentIndexChanged.connect(lambda *_: self._show_model_info())
        form.addRow("Model:", self.model_combo)
        self.model_info = qt.QLabel("")
        self.model_info.setWordWrap(True)
        form.addRow(self.model_info)
        layout.addWidget(box)
        layout.addWidget(self.install_banner.frame)  # not in the form: it would clip wrapped text

    def _build_inputs(self, layout: Any) -> None:
        form = qt.QFormLayout()
        self.volume_combo = qt.QComboBox()
        self.volume_combo.currentIndexChanged.connect(lambda *_: self._volume_changed())
        form.addRow("Volume:", self.volume_combo)
        self.roi_combo = qt.QComboBox()
        self.roi_combo.setToolTip("Ask about region: the question goes out with this ROI")
        self.roi_combo.currentIndexChanged.connect(lambda *_: setattr(self.params, "roi", self._roi_node()))
        form.addRow("Ask about region:", self.roi_combo)
        layout.addLayout(form)

    def _build_chat(self, layout: Any) -> None:
        self.view = qt.QTextBrowser()
        self.view.setOpenLinks(False)
        self.view.anchorClicked.connect(self._link_clicked)
        self.view.setMinimumHeight(220)
        layout.addWidget(self.view, 1)
        self.consent_banner = _Banner("Send", self.confirm_remote, self._dismissed)
        layout.addWidget(self.consent_banner.frame)
        self.input = qt.QPlainTextEdit()
        self.input.setPlaceholderText("Ask about the volume (Enter sends, Shift+Enter: new line)")
        self.input.setMaximumHeight(80)
        self._enter_filter = _EnterFilter(self.send)
        self.input.installEventFilter(self._enter_filter)
        layout.addWidget(self.input)
        row = qt.QHBoxLayout()
        self.send_button = qt.QPushButton("Send")
        self.send_button.clicked.connect(self.send)
        self.stop_button = qt.QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop)
        self.new_button = qt.QPushButton("New conversation")
        self.new_button.clicked.connect(self.new_conversation)
        for button in (self.send_button, self.stop_button, self.new_button):
            row.addWidget(button)
        layout.addLayout(row)
        status = qt.QHBoxLayout()
        self.status_label = qt.QLabel("Ready")
        self.status_label.setWordWrap(True)
        self.progress = qt.QProgressBar()
        self.progress.setMaximumWidth(90)
        self.progress.setTextVisible(False)
        status.addWidget(self.status_label, 1)
        status.addWidget(self.progress)
        layout.addLayout(status)

    def _page(self) -> Any:
        page = qt.QWidget()
        self.mode_pages.addWidget(page)
        return page

    def _dismissed(self) -> None:
        self._pending = None
        self.set_status("Cancelled")

    # ---- scene ----------------------------------------------------------------------------------

    def _observe_scene(self) -> None:
        scene = slicer.mrmlScene
        for event, callback in (
            (scene.NodeAddedEvent, self._scene_changed),
            (scene.NodeRemovedEvent, self._node_removed),
            (scene.StartCloseEvent, self._scene_closing),
            (scene.EndCloseEvent, self._scene_changed),
            (scene.EndImportEvent, self._scene_changed),
        ):
            self._observers.append(scene.AddObserver(event, callback))

    @staticmethod
    def _scene_busy() -> bool:
        """Closing, or importing: Import reads text nodes' storage files only after every
        NodeAddedEvent, so nodes seen during it are incomplete; EndImportEvent refreshes."""
        return bool(slicer.mrmlScene.IsClosing() or slicer.mrmlScene.IsImporting())

    def _scene_changed(self, *_: Any) -> None:
        if not self._scene_busy():
            self.refresh_nodes()

    def _node_removed(self, *_: Any) -> None:
        if self._scene_busy():
            return
        if self.job is not None and self.scene is not None and self.scene.volume is None:
            self._abort("the volume was deleted: the answer was stopped")
        self.refresh_nodes()

    def _scene_closing(self, *_: Any) -> None:
        if self.job is not None:
            self._abort("the scene was closed: the answer was stopped")
        self.scene = None
        self._shown_volume_id = None
        self.conversation = Conversation()
        self._dirty = True

    def refresh_nodes(self) -> None:
        """Refill the volume and ROI selectors from the scene; the choices come from the parameter node."""
        for combo, class_name, none_text, chosen in (
            (self.volume_combo, "vtkMRMLScalarVolumeNode", None, self.params.volume),
            (self.roi_combo, "vtkMRMLMarkupsROINode", "(whole volume)", self.params.roi),
        ):
            nodes = [
                n for n in slicer.util.getNodesByClass(class_name) if not n.IsA("vtkMRMLLabelMapVolumeNode")
            ]
            combo.blockSignals(True)
            combo.clear()
            if none_text:
                combo.addItem(none_text, "")
            for node in nodes:
                combo.addItem(node.GetName(), node.GetID())
            combo.setCurrentIndex(max(0, combo.findData(chosen.GetID())) if chosen is not None else 0)
            combo.blockSignals(False)
        self.params.roi = self._roi_node()
        self._volume_changed()

    def volume_node(self) -> Any:
        node_id = self.volume_combo.itemData(prop(self.volume_combo, "currentIndex"))
        return slicer.mrmlScene.GetNodeByID(node_id) if node_id else None

    def select_volume(self, node: Any) -> None:
        self.volume_combo.setCurrentIndex(self.volume_combo.findData(node.GetID()))

    def select_roi(self, node: Any) -> None:
        self.roi_combo.setCurrentIndex(self.roi_combo.findData(node.GetID() if node else ""))

    def _roi_node(self) -> Any:
        node_id = self.roi_combo.itemData(prop(self.roi_combo, "currentIndex"))
        return slicer.mrmlScene.GetNodeByID(node_id) if node_id else None

    def _volume_changed(self) -> None:
        """Only a change of volume switches conversations (not any node added, which would undo
        "New conversation")."""
        volume = self.volume_node()
        if self.job is not None:
            return
        self.params.volume = volume
        volume_id = volume.GetID() if volume is not None else None
        if volume_id == self._shown_volume_id:
            return
        self._shown_volume_id = volume_id
        if volume is not None:
            self._show_scene(self._stored_conversation(volume))

    def _stored_conversation(self, volume: Any) -> Optional[scene_writer.ConversationScene]:
        """The parameter node's conversation if it is about `volume`, else the volume's latest one."""
        node = self.params.conversation
        if node is not None and node.GetNodeReferenceID(scene_writer.REF_VOLUME) == volume.GetID():
            return scene_writer.ConversationScene(node)
        return scene_writer.ConversationScene.latest(volume)

    def _show_scene(self, conv_scene: Optional[scene_writer.ConversationScene]) -> None:
        self.scene = conv_scene
        self.params.conversation = conv_scene.node if conv_scene is not None else None
        self.conversation = Conversation()
        if self.scene is not None:
            try:
                self.conversation = self.scene.load()
            except ValueError as exc:
                self.set_status(f"Could not restore the stored conversation: {exc}")
        self._dirty = True

    # ---- backend --------------------------------------------------------------------------------

    def mode(self) -> str:
        return self.mode_combo.itemData(prop(self.mode_combo, "currentIndex"))

    def _update_mode(self) -> None:
        mode = self.mode()
        self.settings.mode = mode
        current = [k for k, _ in MODE_LABELS].index(mode)
        self.mode_pages.setCurrentIndex(current)
        for index in range(prop(self.mode_pages, "count")):
            policy = qt.QSizePolicy.Preferred if index == current else qt.QSizePolicy.Ignored
            self.mode_pages.widget(index).setSizePolicy(policy, policy)
        self.mode_pages.adjustSize()
        self.server_button.setVisible(mode != "remote")
        self.log_button.setVisible(mode != "remote")

    def _local_options(self) -> tuple:
        if self.mode() == "openai":
            options = [
                "--base-url",
                prop(self.openai_url_edit, "text").strip(),
                "--dialect",
                prop(self.dialect_combo, "currentText"),
            ]
            model = prop(self.openai_model_edit, "text").strip()
            return "openai", options + (["--model", model] if model else [])
        engine = prop(self.engine_edit, "text").strip() or "builtin"
        download = bool(self.anatomy_check.isChecked())
        self.settings.set_flag("anatomyDownload", download)
        return engine, (["--option", "anatomy_download=yes"] if download and engine == "builtin" else [])

    def backend(self) -> Optional[tuple]:
        """(base_url, token) of a ready backend, or None after starting what is needed (then retry)."""
        if self.mode() == "remote":
            url = backends.normalize_url(str(prop(self.url_combo, "currentText")))
            token = prop(self.token_edit, "text").strip()
            self.settings.remote_url = url
            self.settings.set_token(token, self.remember_check.isChecked())
            return url, token or None
        engine, options = self._local_options()
        if (
            self.server is not None
            and self.server.running
            and (self.server.engine, self.server.options) == (engine, options)
        ):
            return self.server.base_url, self.server.token
        self.start_server(engine, options)
        return None

    def start_server(self, engine: str, options: List[str]) -> None:
        missing = backends.missing_server_packages()
        if missing:
            self.install_banner.show(
                "The local server needs Python packages that Slicer lacks: "
                f"{', '.join(missing)}. Install them now?"
            )
            self.set_status("Local server needs packages (see Backend)")
            return
        self.stop_server()
        self.settings.set_text("localEngine", engine)
        self.server = backends.LocalServer(engine, options)
        self.server.start()
        self.set_status(f"Starting local server ({engine})…", busy=True)
        server = self.server
        self.dispatcher.submit(server.wait_ready, lambda url, error: self._server_ready(server, error))

    def _server_ready(self, server: backends.LocalServer, error: Optional[BaseException]) -> None:
        if server is not self.server:
            return
        if error is not None:
            self.set_status(f"Local server failed: {error}")
            self._pending = None
            return
        self.set_status(f"Local server ready at {server.base_url}")
        self.fetch_models()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
            self.set_status("Local server stopped")

    def install_packages(self) -> None:
        """Install the local server's packages (only because the user pressed Install on the banner),
        with pip on a worker thread; Send and Install stay disabled until pip is done."""
        if self.installing:
            return
        packages = backends.missing_server_packages()
        self.installing = True
        self.install_banner.button.setEnabled(False)
        self.install_banner.hide()
        self._set_busy(False)
        self.set_status(f"Installing {', '.join(packages)} with pip…", busy=True)
        self.dispatcher.submit(lambda: backends.pip_install(packages), self._installed)

    def _installed(self, result: Optional[tuple], error: Optional[BaseException]) -> None:
        self.installing = False
        self.install_banner.button.setEnabled(True)
        self._set_busy(self.job is not None)
        ok, tail = result if result is not None else (False, str(error))
        if ok:
            self.set_status("Packages installed; press Send again")
            return
        self.install_banner.show(f"pip could not install the packages:\n{tail}")
        self.set_status("Installing failed: see Backend")

    def toggle_log(self) -> None:
        visible = not self.log_view.isVisible()
        self.log_view.setVisible(visible)
        self.log_view.setPlainText(
            "\n".join(self.server.log) if self.server else "No local server was started."
        )
        self.log_button.setText("Hide server log" if visible else "Show server log")

    def test_connection(self) -> None:
        try:
            target = self.backend()
        except ValueError as exc:
            self.connection_label.setText(str(exc))
            return
        if target is None:
            self._pending = self.test_connection
            return
        self.connection_label.setText("Testing…")
        url, token = target
        self.dispatcher.submit(
            lambda: backends.handshake(url, token),
            lambda result, error: self._connection_result(url, result, error),
        )

    def _connection_result(self, url: str, result: Optional[tuple], error: Optional[BaseException]) -> None:
        if result is None:
            self.connection_label.setText(f"Test failed: {error}")
            return
        ok, sentence = result
        self.connection_label.setText(sentence)
        if ok:
            self._checked.add(url)
            self.fetch_models()

    def fetch_models(self) -> None:
        target = self.backend()
        if target is None:
            return
        client = self.client_factory(*target)
        self.dispatcher.submit(client.models, self._models_result)

    def _models_result(self, result: Any, error: Optional[BaseException]) -> None:
        if error is not None:
            self.model_info.setText(f"Could not list models: {error}")
            return
        self.models = list(result.get("models", []) if isinstance(result, dict) else result or [])
        self.model_combo.clear()
        for model in self.models:
            self.model_combo.addItem(f"{model.get('model')} ({model.get('engine')})", model.get("model"))
        self._show_model_info()

    def _show_model_info(self) -> None:
        index = prop(self.model_combo, "currentIndex")
        if not 0 <= index < len(self.models):
            self.model_info.setText("")
            return
        model = self.models[index]
        caps = model.get("capabilities", {})
        abilities = [name for name in ("boxes", "masks", "region_input") if caps.get(name)]
        self.model_info.setText(
            f"{model.get('description', '')}\nInput: {caps.get('input', '?')}; can give: "
            f"{', '.join(abilities) or 'text only'}\nLicence: {model.get('licence', '?')}\n"
            f"Intended use: {model.get('intended_use', '?')}"
        )

    # ---- conversation ---------------------------------------------------------------------------

    def accept_intended_use(self) -> None:
        self.settings.set_flag("acceptedIntendedUse", True)
        self.intended_use.setVisible(False)

    def set_status(self, text: str, busy: bool = False) -> None:
        self.status_label.setText(text)
        self.progress.setRange(0, 0 if busy else 1)

    def _set_busy(self, busy: bool) -> None:
        self.send_button.setEnabled(not busy and not self.installing)
        self.stop_button.setEnabled(busy)
        self.progress.setRange(0, 0 if busy else 1)

    def notice(self, text: str) -> None:
        self.conversation.turns.append(Turn("notice", text))
        self._dirty = True
        self.set_status(text)

    def send(self) -> None:
        """Send the typed question (or explain why not); returns at once, the answer streams in."""
        question = self.input.toPlainText().strip()
        if self.job is not None:
            self.set_status("Wait for the answer or press Stop")
            return
        if self.installing:
            self.set_status("Installing packages: press Send again when pip is done")
            return
        if not question:
            self.set_status("Type a question first")
            return
        if not self.settings.flag("acceptedIntendedUse"):
            self.set_status("Read the note on intended use above and press 'I understand' first")
            return
        volume = self.volume_node()
        if volume is None:
            self.notice("Select a volume first: load one (File > Add Data) and pick it in 'Volume'.")
            return
        try:
            target = self.backend()
        except ValueError as exc:
            self.notice(str(exc))
            return
        if target is None:
            self._pending = self.send
            return
        url, token = target
        if self.mode() == "remote" and not backends.is_loopback(url) and url not in self._consented:
            self.consent_banner.show(
                f"This sends the voxels of '{volume.GetName()}' (patient data) to {url}. "
                "Only continue if that server may receive it."
            )
            self._pending = self.send
            return
        self._start_job(question, volume, self.client_factory(url, token), url)

    def confirm_remote(self) -> None:
        url = backends.normalize_url(str(prop(self.url_combo, "currentText")))
        self._consented.add(url)
        self.consent_banner.hide()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()

    def _start_job(self, question: str, volume: Any, client: Any, url: str) -> None:
        try:
            _voxels, ijk_to_ras = scene_writer.volume_arrays(volume)
            roi_node = self._roi_node()
            roi = scene_writer.roi_request(roi_node) if roi_node is not None else None
        except scene_writer.SceneError as exc:
            self.notice(str(exc))
            return
        if self.scene is None or self.scene.volume is None or self.scene.volume.GetID() != volume.GetID():
            self.scene = scene_writer.ConversationScene.create(volume)
            self.params.conversation = self.scene.node
            self.conversation = Conversation()
        prefix = f"[about region '{roi_node.GetName()}'] " if roi_node is not None else ""
        self.conversation.turns.append(Turn("user", prefix + question))
        self.conversation.turns.append(Turn("assistant"))
        request = {"messages": self.conversation.messages(), "session_id": self.conversation.session_id}
        request["messages"][-1]["content"] = question
        if roi is not None:
            request["roi"] = roi
        model = self.model_combo.itemData(prop(self.model_combo, "currentIndex"))
        if model:
            request["model"] = model
        self.input.setPlainText("")
        handshake = None if url in self._checked else (lambda: self._handshake(client, url))
        self.job = ChatJob(
            self.dispatcher, client, lambda: scene_writer.live_voxels(volume), ijk_to_ras, request,
            slicer.util.tempDirectory("MedMLLMSlicer", includeDateTime=False), self._on_event,
            self._on_end, handshake,
        )  # fmt: skip
        self._started = time.perf_counter()
        self._set_busy(True)
        self.set_status("Sending the volume (only if the server does not have it yet)…", busy=True)
        self._dirty = True
        self.job.start()

    def _handshake(self, client: Any, url: str) -> None:
        """On the worker, before the first Send to `url`: the client raises a sentence on an API
        version mismatch; success is remembered (on the main thread) so later Sends skip it."""
        try:
            client.health()
        except ValueError:
            raise ConnectionError(f"something answers at {url}, but it is not a MedMLLM server") from None
        self.dispatcher.post(self._checked.add, url)

    @property
    def answer(self) -> Turn:
        return self.conversation.turns[-1]

    def _on_event(self, job: ChatJob, event: Dict[str, Any]) -> None:
        if job is not self.job:
            return
        try:
            notice = scene_writer.apply_event(self.scene, self.answer, event)
        except scene_writer.SceneError as exc:
            self._abort(str(exc))
            return
        if notice:
            self.conversation.turns.insert(-1, Turn("notice", notice))
        found = len(self.answer.items)
        self.set_status(f"Answering… ({found} findings)" if found else "Answering…", busy=True)
        self._dirty = True

    def _on_end(self, job: ChatJob, error: Optional[str]) -> None:
        if job is not self.job:
            return
        self.job = None
        self._set_busy(False)
        self.conversation.volume_id = job.volume_id
        self.answer.status = "error" if error else "done"
        if error:
            self.conversation.turns.insert(-1, Turn("notice", error))
            self.set_status(f"Failed: {error}")
        else:
            self.set_status(f"Done in {time.perf_counter() - self._started:.2f} s")
        self._finish_turn()

    def _finish_turn(self) -> None:
        if self.scene is not None:
            self.scene.save(self.conversation)
        self._dirty = True

    def stop(self) -> None:
        """Stop the answer now: nothing more is shown, and the server is told to stop."""
        if self.job is None:
            return
        self._abort("Stopped")

    def _abort(self, reason: str) -> None:
        job, self.job = self.job, None
        if job is not None:
            job.cancel()
        self._set_busy(False)
        if self.conversation.turns and self.answer.role == "assistant":
            self.answer.status = "stopped"
        if reason != "Stopped":
            self.conversation.turns.append(Turn("notice", reason))
        self.set_status(reason)
        if self.scene is not None and not slicer.mrmlScene.IsClosing():
            self._finish_turn()
        self._dirty = True

    def new_conversation(self) -> None:
        self.stop()
        self._show_scene(None)
        self.set_status("New conversation: the next question starts it")

    def _link_clicked(self, url: Any) -> None:
        where = parse_link(url.toString())
        if where is None:
            return
        turn, index = where
        try:
            item: Item = self.conversation.turns[turn].items[index]
        except IndexError:
            return
        self.set_status(scene_writer.focus(item))

    def _render_if_dirty(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        self.view.setHtml(render_html(self.conversation))
        bar = self.view.verticalScrollBar()
        bar.setValue(prop(bar, "maximum"))

    def cleanup(self) -> None:
        """Stop everything this panel started (answer, timers, local server, scene observers)."""
        self.stop()
        self._render_timer.stop()
        self.dispatcher.stop()
        self.stop_server()
        for tag in self._observers:
            slicer.mrmlScene.RemoveObserver(tag)
        self._observers = []

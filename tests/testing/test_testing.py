"""Fast tests of kvshelf.testing: no vLLM server (a stand-in server module tests VllmServer)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import textwrap
import time
import wave
from pathlib import Path

import pytest

from kvshelf.testing import (
    FAMILIES,
    FAMILY_REQUEST_TYPES,
    REQUEST_TYPES,
    ServerStartError,
    VllmServer,
    build_content,
    build_messages,
    build_model,
    build_tokenizer,
    chat_request,
    file_url,
    filler_text,
    free_port,
    make_media,
    read_build_info,
    serve_args,
)
from kvshelf.testing.models import MARKER_NAME, WEIGHTS_FILE

# --- tokenizer ---------------------------------------------------------------------------------

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|AUDIO|>"]


def _small_tokenizer(**kwargs):
    return build_tokenizer(
        special_tokens=_SPECIALS, eos_token="<|endoftext|>", pad_token="<|endoftext|>", **kwargs
    )


def test_tokenizer_is_deterministic():
    first, second = _small_tokenizer(), _small_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    text = "hello world <|AUDIO|> what is in this zebra picture? 日本"
    assert first.encode(text) == second.encode(text)


def test_tokenizer_special_tokens_and_round_trip():
    tokenizer = _small_tokenizer()
    # Specials get the lowest ids in order; they encode as one token each.
    assert [tokenizer.convert_tokens_to_ids(t) for t in _SPECIALS] == [0, 1, 2]
    assert tokenizer.encode("a <|AUDIO|> b").count(2) == 1
    # Byte-level BPE encodes any text, including words outside the corpus.
    text = "an unseen word: Zürich ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_places_specials_at_a_fixed_id():
    tokenizer = _small_tokenizer(first_special_id=5000)
    assert tokenizer.convert_tokens_to_ids("<|AUDIO|>") == 5002
    assert len(tokenizer) == 5003


def test_filler_text_is_one_token_per_word():
    tokenizer = _small_tokenizer()
    for num_tokens in (1, 37, 500):
        assert len(tokenizer.encode(filler_text(num_tokens))) == num_tokens
    assert filler_text(20, seed=1) != filler_text(20, seed=2)


# --- media -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return make_media(tmp_path_factory.mktemp("media"))


def test_media_is_deterministic(media, tmp_path):
    again = make_media(tmp_path)
    assert sorted(again) == sorted(media)
    for name, path in media.items():
        assert again[name].read_bytes() == path.read_bytes(), name


def test_media_variants_differ(media):
    contents = [path.read_bytes() for path in media.values()]
    assert len(set(contents)) == len(contents)


def test_make_media_is_idempotent(media):
    mtimes = {name: path.stat().st_mtime_ns for name, path in media.items()}
    time.sleep(0.01)
    make_media(next(iter(media.values())).parent)
    assert {name: path.stat().st_mtime_ns for name, path in media.items()} == mtimes


def test_media_formats(media):
    from PIL import Image

    assert Image.open(media["image_a"]).format == "PNG"
    assert Image.open(media["image_b"]).format == "JPEG"
    for name in ("audio_a", "audio_b"):
        with wave.open(str(media[name])) as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
    import cv2

    capture = cv2.VideoCapture(str(media["video_a"]))
    try:
        assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 16
    finally:
        capture.release()


# --- request builders --------------------------------------------------------------------------

_PART_TYPES = {
    "text-only": [],
    "single-image": ["image_url"],
    "multi-image": ["image_url", "image_url"],
    "video": ["video_url"],
    "audio": ["audio_url"],
}


@pytest.mark.parametrize("request_type", REQUEST_TYPES)
def test_build_content_shapes(media, request_type):
    content = build_content(request_type, media, text="Describe this.")
    assert [part["type"] for part in content] == _PART_TYPES[request_type] + ["text"]
    assert content[-1] == {"type": "text", "text": "Describe this."}
    for part in content[:-1]:
        url = part[part["type"]]["url"]
        mime, payload = url.removeprefix("data:").split(";base64,")
        assert mime.split("/")[0] in ("image", "audio", "video")
        assert base64.b64decode(payload)  # valid base64


def test_build_content_file_urls_and_filler(media):
    content = build_content(
        "multi-image",
        media,
        use_file_urls=True,
        filler_tokens=50,
        media_names=["image_c", "image_d"],
    )
    urls = [part["image_url"]["url"] for part in content[:-1]]
    assert urls == [file_url(media["image_c"]), file_url(media["image_d"])]
    assert all(url.startswith("file:///") for url in urls)
    assert content[-1]["text"] == f"{filler_text(50)}\nDescribe this."


def test_build_content_rejects_unknown_type_and_missing_media(media):
    with pytest.raises(ValueError, match="unknown request type"):
        build_content("image", media)
    with pytest.raises(KeyError, match="audio_a"):
        build_content("audio", {})


def test_chat_request_body(media):
    messages = build_messages("audio", media)
    body = chat_request("m", messages, cache_salt="s1")
    assert body == {
        "model": "m",
        "messages": messages,
        "max_tokens": 4,
        "temperature": 0.0,
        "cache_salt": "s1",
    }
    assert messages[0]["role"] == "user"
    json.dumps(body)  # JSON-serialisable as is


# --- model dirs --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_build_model_is_idempotent(tmp_path, family):
    out = tmp_path / family
    assert build_model(family, out, "xs") == out.resolve()
    info = read_build_info(out)
    assert info is not None and info["family"] == family and info["size"] == "xs"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"]  # else vLLM picks its pooling runner
    assert (out / WEIGHTS_FILE).stat().st_size > 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # A complete dir with the same parameters is reused untouched.
    build_model(family, out, "xs")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert not list(tmp_path.glob(".*building*"))


def test_build_model_is_deterministic(tmp_path):
    first = build_model("idefics3", tmp_path / "a", "xs")
    second = build_model("idefics3", tmp_path / "b", "xs")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_build_model_rebuilds_on_new_parameters_and_half_built_dirs(tmp_path):
    out = tmp_path / "model"
    build_model("idefics3", out, "xs")
    build_model("idefics3", out, "xs", dtype="float32", dummy_weights=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert not (out / WEIGHTS_FILE).exists()
    # Without the marker (written last) the dir counts as half-built and is rebuilt.
    (out / MARKER_NAME).unlink()
    (out / "config.json").write_text("{")
    build_model("idefics3", out, "xs", dtype="float32", dummy_weights=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_build_model_refuses_foreign_dirs_and_bad_arguments(tmp_path):
    (tmp_path / "project" / "src").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="does not look like a model dir"):
        build_model("idefics3", tmp_path / "project", "xs")
    with pytest.raises(ValueError, match="unknown model family"):
        build_model("llama", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown size"):
        build_model("idefics3", tmp_path / "x", "xxxl")


def test_serve_args():
    for family in FAMILIES:
        assert "text-only" in FAMILY_REQUEST_TYPES[family]
    assert serve_args("idefics3") == []
    assert serve_args("qwen2_audio", dtype="float32", dummy_weights=True) == [
        "--load-format",
        "dummy",
        "--dtype",
        "float32",
    ]
    ovis = serve_args("ovis2_5")
    assert "--trust-remote-code" in ovis
    limits = json.loads(ovis[ovis.index("--limit-mm-per-prompt") + 1])
    assert limits["video"]["num_frames"] == 8
    with pytest.raises(ValueError, match="unknown dtype"):
        serve_args("idefics3", dtype="fp8")


# --- server (a stand-in for vLLM's api_server module) ------------------------------------------

_FAKE_SERVER = textwrap.dedent('''
    """Stand-in for vllm.entrypoints.openai.api_server: /health, a child process, or a crash."""
    import http.server, os, subprocess, sys
    port = int(sys.argv[sys.argv.index("--port") + 1])
    if os.environ.get("FAKE_MODE") == "die":
        for i in range(60):
            print(f"log line {i}")
        print("fatal: model is broken", flush=True)
        sys.exit(3)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"child pid {child.pid}", flush=True)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
''')


@pytest.fixture()
def fake_vllm(tmp_path):
    package = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (package, package.parent, package.parent.parent):
        (folder / "__init__.py").write_text("")
    (package / "api_server.py").write_text(_FAKE_SERVER)
    return tmp_path / "fake"


def _is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _last_child_pid(server: VllmServer) -> int:
    lines = [line for line in server.log_text().splitlines() if line.startswith("child pid")]
    return int(lines[-1].split()[-1])


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_server_starts_restarts_and_stops_its_process_group(fake_vllm, tmp_path):
    server = VllmServer(
        tmp_path / "model",
        args=["--x", "1"],
        log_path=tmp_path / "s.log",
        env={"PYTHONPATH": str(fake_vllm)},
        stop_grace_s=5,
    )
    with server:
        assert server.url == f"http://127.0.0.1:{server.port}"
        first_child = _last_child_pid(server)
        assert _is_alive(first_child)
        # A restart stops the whole group, then starts again on the same port.
        port = server.port
        server.restart()
        second_child = _last_child_pid(server)
        assert server.port == port and second_child != first_child
        assert "child pid" in server.log_text(since_start=True)
        assert not _is_alive(first_child) and _is_alive(second_child)
        assert "--x" in server.command()
    assert not server.is_running() and not _is_alive(second_child)
    assert server.log_text().count("=== kvshelf: start") == 2


def test_server_that_dies_reports_its_log(fake_vllm, tmp_path):
    server = VllmServer(
        tmp_path / "model",
        log_path=tmp_path / "dead.log",
        env={"PYTHONPATH": str(fake_vllm), "FAKE_MODE": "die"},
    )
    with pytest.raises(ServerStartError) as error, server:
        pass
    message = str(error.value)
    assert "exited with code 3" in message and "fatal: model is broken" in message
    assert "log line 59" in message and "log line 5\n" not in message  # only the tail
    assert not server.is_running()


def test_server_start_timeout_stops_the_server(fake_vllm, tmp_path):
    # Health is polled on another port than the fake listens on, so it never turns healthy.
    server = VllmServer(
        tmp_path / "model",
        log_path=tmp_path / "slow.log",
        startup_timeout_s=2,
        env={"PYTHONPATH": str(fake_vllm)},
        stop_grace_s=5,
    )
    server.command = lambda: [
        server.python,
        "-m",
        "vllm.entrypoints.openai.api_server",  # type: ignore[method-assign]
        "--port",
        str(free_port()),
    ]
    with pytest.raises(ServerStartError, match="not healthy after 2 s"):
        server.start()
    assert not server.is_running()
    assert not _is_alive(_last_child_pid(server))


def test_server_dies_with_a_killed_runner(fake_vllm, tmp_path):
    """A SIGKILLed test runner (no atexit, no __exit__) must not leave its server running."""
    import signal
    import subprocess
    import sys

    runner_code = textwrap.dedent(f"""
        import sys, time
        from kvshelf.testing import VllmServer
        server = VllmServer("model", log_path={str(tmp_path / "orphan.log")!r},
                            env={{"PYTHONPATH": {str(fake_vllm)!r}}})
        server.start()
        print(server.pid, flush=True)
        time.sleep(600)
    """)
    runner = subprocess.Popen(
        [sys.executable, "-c", runner_code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        server_pid = int(runner.stdout.readline())
        assert _is_alive(server_pid)
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    deadline = time.monotonic() + 10
    while _is_alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    dead = not _is_alive(server_pid)
    # The stand-in does not stop its own child on SIGTERM (vLLM does); clean up the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server_pid, signal.SIGKILL)
    assert dead

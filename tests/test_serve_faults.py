"""The README's serving example for a built engine dir, run as written, and what its replicas' failures cost.

The README's two commands run in a subprocess (its own local Ray): `python -m engine.build` writes the tiny
model's ONNX Runtime dir, `python -m engine.serve --engine-dir ... --replicas 2` serves it, here with one
request per replica at a time (`--max-batch-size 1`) and three waiting in Serve's queue at most. Then a
replica is killed (SIGKILL) while it generates: its request gets a JSON 503 saying so, the queued requests
are served by the other replica, requests past the queue get 503 with Retry-After, Serve starts a new
replica and later requests succeed. The module takes ~2 minutes, most of it the build and Ray starting.
"""
import base64
import concurrent.futures
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import pytest

from engine.serve.local import free_port

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120.0  # the clients' timeout: every answer, a failure's too, must come well within it
SLOW = dict(num_inference_steps=100, height=128, width=128)  # ~4 s on the tiny graphs: long enough to be killed in
FAULT_FLAGS = ["--no-demo", "--max-batch-size", "1", "--max-queued-requests", "3", "--torch-threads", "1"]
SERVE_TEST_URL_VAR = "ENGINE_SERVE_TEST_URL"  # tests/test_serve.py's running server, if any


def readme_commands() -> tuple[list[str], list[str]]:
    """The README's build and serve commands for a built engine dir, as argument lists after `python -m`."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"Serve a built engine dir.*?```\n(.*?)```", text, re.S).group(1)
    build, serve_line = [shlex.split(line)[1:] for line in block.strip().splitlines()]
    assert build[:2] == ["-m", "engine.build"] and serve_line[:2] == ["-m", "engine.serve"], block
    return build, serve_line


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The README's build, then its serve command with a free port and FAULT_FLAGS; yields the URL."""
    if os.environ.pop(SERVE_TEST_URL_VAR, None) or ray.is_initialized():
        serve.shutdown()  # one local Ray at a time on this machine (tests/conftest.py RAY_MODULES)
        ray.shutdown()
    root = tmp_path_factory.mktemp("readme")
    build, serve_args = readme_commands()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    done = subprocess.run([sys.executable, *build, "--no-progress"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"README build: {time.monotonic() - started:.0f} s")
    started = time.monotonic()
    port = free_port()
    log = open(root / "serve.log", "w")
    process = subprocess.Popen([sys.executable, *serve_args, "--port", str(port), *FAULT_FLAGS], cwd=root, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, (root / "serve.log").read_text()
            assert time.monotonic() < deadline, "the server did not come up: " + (root / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        print(f"README serve: up in {time.monotonic() - started:.0f} s")
        yield url
    finally:
        process.send_signal(signal.SIGINT)  # the CLI's Ctrl-C: ray.shutdown()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the CLI and the Ray it started
            process.wait(30)
        log.close()


@pytest.fixture(scope="module")
def photo_b64(photo) -> str:
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def replica_pids(url: str, count: int = 2, tries: int = 60) -> set[int]:
    """The replicas' processes, from GET /stats (each answer comes from one replica, picked by Serve)."""
    pids = set()
    with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        for _ in range(tries):
            pids.add(c.get("/stats").json()["pid"])
            if len(pids) >= count:
                break
    return pids


def test_readme_serves_the_built_dir_with_two_replicas(served, photo_b64):
    models = httpx.get(served + "/models", timeout=TIMEOUT).json()
    assert models["backend"] == "onnxruntime" and models["controlnets"] == ["canny"], models
    assert len(replica_pids(served)) == 2
    r = httpx.post(served + "/generate", json=dict(prompt="an astronaut", image=photo_b64, seed=1, height=64, width=64,
                                                   num_inference_steps=2), timeout=TIMEOUT)
    assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text


def test_killed_replica_fails_only_its_request(served, photo_b64):
    pids = replica_pids(served)
    victim = min(pids)

    def post(i):
        started = time.monotonic()
        with httpx.Client(base_url=served, timeout=TIMEOUT) as c:
            r = c.post("/generate", json=dict(prompt=f"request {i}", image=photo_b64, seed=i, **SLOW))
        return i, r, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        running_and_queued = [pool.submit(post, i) for i in range(5)]  # 2 running (one a replica), 3 in Serve's queue
        time.sleep(1.5)
        overflow = [pool.submit(post, 10 + i) for i in range(2)]  # past max_queued_requests: refused at once
        concurrent.futures.wait(overflow, timeout=TIMEOUT)
        # Serve queues a request only when every replica is busy: a full queue says the victim is generating now.
        busy = psutil.Process(victim).cpu_percent(0.2)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        results = [f.result() for f in running_and_queued + overflow]
    print(f"killed replica {victim} at {busy:.0f}% CPU")
    for i, r, seconds in results:
        print(f"request {i}: {r.status_code} in {seconds:.1f} s, Retry-After {r.headers.get('retry-after')}: {r.text[:120]}")
    statuses = {i: r.status_code for i, r, _ in results}
    failed = [(i, r) for i, r, _ in results if i < 10 and r.status_code != 200]
    assert len(failed) == 1, statuses  # the killed replica's request only: the queued ones went to the other
    i, r = failed[0]
    body = r.json()
    assert r.status_code == 503 and "stopped before it answered" in body["error"] and "field" in body, r.text
    assert int(r.headers["retry-after"]) > 0
    assert all(seconds < TIMEOUT / 2 for _, _, seconds in results)  # no hang
    for i, r, _ in results[5:]:
        assert r.status_code == 503 and "backpressure" in r.json()["error"] and int(r.headers["retry-after"]) > 0, r.text
    # Serve starts a new replica in the dead one's place, and later requests succeed.
    deadline = time.monotonic() + 120
    while not (replica_pids(served, tries=10) - pids):
        assert time.monotonic() < deadline, "no new replica"
        time.sleep(1)
    print(f"a new replica answered {time.monotonic() - killed_at:.0f} s after the kill")
    for seed in range(3):
        r = httpx.post(served + "/generate", json=dict(prompt="after", image=photo_b64, seed=seed, height=64, width=64,
                                                       num_inference_steps=2), timeout=TIMEOUT)
        assert r.status_code == 200, r.text

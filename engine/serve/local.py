"""A local Ray instance with Serve's HTTP proxy, for `python -m engine.serve`, the tests and the load
benchmark alike: one place that knows how the workers find this package and which port is free."""
from __future__ import annotations

import os
import socket
from pathlib import Path

# The folder holding the `engine` package: Ray's workers import it from there even when it is not
# installed (a checkout, a worktree), as the driver does.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_local_serve(host: str = "127.0.0.1", port: int | None = None, num_cpus: int = 2, num_gpus: int = 0,
                      quiet: bool = True) -> int:
    """Start Ray on this machine (`num_cpus` CPUs, `num_gpus` GPUs, no dashboard) and Serve's HTTP proxy on
    host:port (a free port when None); returns the port. `quiet`: workers' logs stay in Ray's log folder
    instead of this terminal. The caller deploys its apps, then calls serve.shutdown() and ray.shutdown()."""
    import ray
    from ray import serve

    from engine.serve.proxy import CALLBACK

    port = free_port(host) if port is None else port
    # Serve's proxy answers its own failures (a replica that died, a full queue) in JSON (engine/serve/proxy.py);
    # it reads the callback from its environment, which Ray's processes inherit from this one.
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", CALLBACK)
    pythonpath = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=not quiet,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    serve.start(http_options={"host": host, "port": port})
    return port

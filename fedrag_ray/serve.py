"""``fedrag-ray serve RUN_DIR``: the fine-tuned system behind HTTP, on Ray Serve.

Each replica (``serve.num_replicas``, ``serve.num_cpus`` Ray CPUs each) loads the run's
config and ``trainable_state.npz`` once (``fedrag_ray.service.Answerer``, the same code as
``ask``) and answers:

- ``POST /ask`` with ``{"question": "..."}`` → ``{"answer": ..., "sources": [...]}``;
- ``GET /health`` → ``{"status": "ok", ...}``.

A bad request body gets a 4xx with ``{"error": ...}`` before any model work: 400 for a
body that is not a JSON object, 422 for a missing, non-string or empty question, 413 for
one over ``serve.max_question_chars``; 404 / 405 for other paths and methods. Ray Serve
is an optional extra (``pip install fedrag_ray[serve]``), imported only here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from fedrag_ray.config import ConfigError, ExperimentConfig

APP_NAME = "fedrag_ray"


class BadRequest(ValueError):
    """A request the service refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_question(body: bytes, max_chars: int) -> str:
    """The question of an ``/ask`` body, or :class:`BadRequest` saying what is wrong."""
    try:
        payload = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(400, 'body is not valid JSON; send {"question": "..."}') from None
    if not isinstance(payload, dict):
        raise BadRequest(400, 'body must be a JSON object: {"question": "..."}')
    question = payload.get("question")
    if question is None:
        raise BadRequest(422, "field 'question' is missing")
    if not isinstance(question, str):
        raise BadRequest(422, "field 'question' must be a string")
    if not question.strip():
        raise BadRequest(422, "field 'question' is empty")
    if len(question) > max_chars:
        raise BadRequest(
            413, f"field 'question' has {len(question)} characters; the limit is {max_chars}"
        )
    return question


class RagServer:
    """One replica: the whole system, loaded once. Answers run one at a time in a worker
    thread (a forward pass already uses the replica's CPUs), so /health stays responsive
    while a question is being answered."""

    def __init__(self, cfg_json: str, state: str, run_dir: str) -> None:
        from fedrag_ray.service import Answerer

        cfg = ExperimentConfig.model_validate_json(cfg_json)
        self.max_chars = cfg.serve.max_question_chars
        threads = max(1, int(cfg.serve.num_cpus))  # the CPUs Ray reserved for this replica
        self.answerer = Answerer(cfg, state, run_dir, threads=threads)
        self.lock = threading.Lock()
        self.started = time.time()
        self.answered = 0

    def _answer(self, question: str) -> dict[str, Any]:
        with self.lock:
            record = self.answerer.ask(question)
            self.answered += 1
            return record

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        path = request.url.path.rstrip("/") or "/"
        if path == "/health":
            if request.method != "GET":
                return JSONResponse({"error": "use GET /health"}, status_code=405)
            return JSONResponse(
                {
                    "status": "ok",
                    "name": self.answerer.cfg.name,
                    "answered": self.answered,
                    "uptime_s": round(time.time() - self.started, 1),
                }
            )
        if path != "/ask":
            return JSONResponse({"error": f"no route {path}; use POST /ask"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": "use POST /ask"}, status_code=405)
        try:
            question = parse_question(await request.body(), self.max_chars)
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        record = await asyncio.to_thread(self._answer, question)
        return JSONResponse(record)


def check_serve_installed() -> None:
    try:
        import ray.serve  # noqa: F401
        import starlette  # noqa: F401
    except ImportError:
        raise ConfigError(
            "serve: Ray Serve is not installed; pip install 'fedrag_ray[serve]' "
            "(ray[serve]==2.55.1)"
        ) from None


def build_app(cfg: ExperimentConfig, state: Path, run_dir: Path) -> Any:
    """The Ray Serve application: ``RagServer`` with the config's replicas and CPUs."""
    from ray import serve

    from fedrag_ray.runtime import quiet_env

    env = {**quiet_env(), **{k: v for k, v in os.environ.items() if k.startswith("FEDRAG_RAY_")}}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONPATH"):
        if key in os.environ:
            env[key] = os.environ[key]
    deployment = serve.deployment(RagServer, name="RagServer").options(
        num_replicas=cfg.serve.num_replicas,
        ray_actor_options={"num_cpus": cfg.serve.num_cpus, "runtime_env": {"env_vars": env}},
        max_ongoing_requests=8,
    )
    return deployment.bind(cfg.model_dump_json(), str(state.resolve()), str(run_dir.resolve()))


def run_server(
    cfg: ExperimentConfig,
    state: Path,
    run_dir: Path,
    address: str | None = None,
    on_ready: Any = None,
) -> None:
    """Start (or join) Ray, deploy, call ``on_ready(url)``, and serve until SIGINT or
    SIGTERM; then take the application and the HTTP proxy down and stop the Ray this
    call started."""
    import ray
    from ray import serve

    from fedrag_ray.federated.ray_head import workers_at_driver_niceness
    from fedrag_ray.runtime import verbose

    quiet = not verbose()
    if quiet:  # Serve's start-up notices (and its warning that serve.run's own default
        # HTTP options differ from the ones serve.start already applied)
        logging.getLogger("ray.serve").setLevel(logging.ERROR)
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": not quiet,
            "logging_level": logging.WARNING if quiet else logging.INFO,
        }
        if address:
            kwargs["address"] = address
        else:
            need = cfg.serve.num_replicas * cfg.serve.num_cpus
            kwargs["num_cpus"] = max(os.cpu_count() or 1, int(need + 0.999))
            workers_at_driver_niceness()
        ray.init(**kwargs)
        started = True
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        serve.run(build_app(cfg, state, run_dir), name=APP_NAME, route_prefix="/")
        if on_ready is not None:
            on_ready(f"http://{cfg.serve.host}:{cfg.serve.port}")
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()

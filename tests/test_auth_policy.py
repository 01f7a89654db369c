"""API keys and roles, the model catalogue and the argument policy, end to end: the proxy on a real
socket (in this process, or as ``python -m aic_vllm_proxy serve``) in front of real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import ECHO, FAST, SIM

ADMIN = "admin-0123456789"
USER = "user-0123456789"
KEYS = {"admin_keys": (ADMIN,), "api_keys": (USER,)}

#: (method, path, least role): "public", "user" or "admin".
ROUTES = [
    ("GET", "/proxy/health", "public"),
    ("GET", "/status", "user"),
    ("GET", "/v1/models", "user"),
    ("POST", "/v1/chat/completions", "user"),
    ("GET", "/metrics", "user"),
    ("POST", "/tokenize", "user"),
    ("POST", "/switch", "admin"),
    ("POST", "/stop", "admin"),
    ("POST", "/load", "admin"),
    ("POST", "/unload", "admin"),
    ("GET", "/load", "user"),  # vLLM's own (its server load), passed through
    ("GET", "/logs/tail", "admin"),
    ("GET", "/logs/current", "admin"),
    ("GET", "/logs/stream", "admin"),
    ("GET", "/plugins", "admin"),
    ("GET", "/models/catalog", "admin"),
]
#: Each route's own answer with no model loaded (and ``{}`` as the body of a POST); by path, or
#: by (method, path) where the methods differ.
NO_MODEL_ANSWERS: dict[Any, int] = {
    ("POST", "/load"): 422,  # no model
    ("GET", "/load"): 503,
    "/unload": 422,
    "/proxy/health": 200,
    "/status": 200,
    "/v1/models": 503,
    "/v1/chat/completions": 503,
    "/metrics": 503,
    "/tokenize": 503,
    "/switch": 422,  # no model_spec
    "/stop": 200,
    "/logs/tail": 404,  # no log yet
    "/logs/current": 404,
    "/logs/stream": 404,
    "/plugins": 200,
    "/models/catalog": 200,
}


def no_model_answer(method: str, path: str) -> int:
    return NO_MODEL_ANSWERS.get((method, path)) or NO_MODEL_ANSWERS[path]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(
    proxy: Any, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
) -> tuple[int, dict[str, str], Any]:
    async with proxy.session.request(method, proxy.url + path, headers=headers or {}, **kwargs) as resp:
        text = await resp.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = text
        return resp.status, dict(resp.headers), body


def assert_error(body: Any, status: int, type_: str) -> str:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert body["error"]["code"] == status and body["error"]["type"] == type_, body
    message: str = body["error"]["message"]
    assert message
    return message


# ------------------------------------------------------------------------------- roles


async def test_roles_on_every_route(make_proxy: Any) -> None:
    proxy = await make_proxy(**KEYS)
    for method, path, role in ROUTES:
        kwargs: dict[str, Any] = {"json": {}} if method == "POST" else {}
        # No key, a wrong key, a key in the wrong scheme: 401 (unless the route is public).
        for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {ADMIN}"}, bearer(ADMIN + "x")):
            status, resp_headers, body = await call(proxy, method, path, headers, **kwargs)
            if role == "public":
                assert status == 200, (path, status, body)
                continue
            assert status == 401, (method, path, headers, status, body)
            assert_error(body, 401, "authentication_error")
            assert resp_headers.get("WWW-Authenticate", "").startswith("Bearer"), resp_headers
        # A user key: the API and /status, not the control routes.
        status, _, body = await call(proxy, method, path, bearer(USER), **kwargs)
        if role == "admin":
            assert status == 403, (path, status, body)
            message = assert_error(body, 403, "permission_error")
            assert "admin key" in message
        else:
            assert status == no_model_answer(method, path), (path, status, body)
        # An admin key: everything (the answers are the routes' own: 503 with no model, ...).
        status, _, body = await call(proxy, method, path, {"Authorization": f"bearer  {ADMIN} "}, **kwargs)
        assert status == no_model_answer(method, path), (path, status, body)
    # Nothing was started by any of it.
    status, _, body = await call(proxy, "GET", "/status", bearer(USER))
    assert status == 200 and body["state"] == "stopped" and body["pid"] is None


async def test_refused_before_anything_changes(make_proxy: Any) -> None:
    proxy = await make_proxy(**KEYS)
    good = {"model_spec": f"m {FAST}"}
    for headers, expected in (({}, 401), (bearer(USER), 403)):
        status, _, body = await call(proxy, "POST", "/switch", headers, json=good)
        assert status == expected, body
    status, _, body = await call(proxy, "POST", "/switch", bearer(ADMIN), json=good)
    assert status == 200, body
    pid = body["status"]["pid"]
    proxy.groups.add(pid)
    for headers, expected in (({}, 401), (bearer(USER), 403)):
        for path, payload in (("/stop", {"force": True}), ("/switch", {"model_spec": f"other {FAST}"})):
            status, _, body = await call(proxy, "POST", path, headers, json=payload)
            assert status == expected, (path, body)
    status, _, body = await call(proxy, "GET", "/status", bearer(USER))
    assert body["state"] == "ready" and body["pid"] == pid and body["model"] == "m", body
    # The user key works for the API itself.
    payload = {"model": "m", "prompt": "hi", "max_tokens": 3}
    status, _, body = await call(proxy, "POST", "/v1/completions", bearer(USER), json=payload)
    assert status == 200 and body["choices"], body


async def test_no_keys_means_open(make_proxy: Any) -> None:
    proxy = await make_proxy()
    for method, path, _ in ROUTES:
        status, _, body = await call(proxy, method, path, **({"json": {}} if method == "POST" else {}))
        assert status == no_model_answer(method, path), (path, status, body)


# ------------------------------------------------------------------------------- keys and vLLM


async def test_proxy_key_is_not_forwarded_and_vllms_key_is_supplied(make_proxy: Any) -> None:
    proxy = await make_proxy(vllm_command=ECHO, **KEYS)

    async def forwarded_authorization(headers: dict[str, str]) -> list[str]:
        status, _, body = await call(proxy, "GET", "/echo/anything", headers)
        assert status == 200, body
        return [value for name, value in body["headers"] if name.lower() == "authorization"]

    status, _, body = await call(proxy, "POST", "/switch", bearer(ADMIN), json={"model_spec": "echo-model"})
    assert status == 200, body
    proxy.groups.add(body["status"]["pid"])
    assert await forwarded_authorization(bearer(USER)) == []
    assert await forwarded_authorization(bearer(ADMIN)) == []
    # vLLM started with its own --api-key: the proxy sends that key, and only that one.
    spec = {"model_spec": "echo-model --api-key vllm-secret"}
    status, _, body = await call(proxy, "POST", "/switch", bearer(ADMIN), json=spec)
    assert status == 200, body
    proxy.groups.add(body["status"]["pid"])
    assert await forwarded_authorization(bearer(USER)) == ["Bearer vllm-secret"]


async def test_no_keys_forwards_the_clients_authorization(make_proxy: Any) -> None:
    proxy = await make_proxy(vllm_command=ECHO)
    status, _, body = await call(proxy, "POST", "/switch", json={"model_spec": "echo-model"})
    assert status == 200, body
    proxy.groups.add(body["status"]["pid"])
    status, _, body = await call(proxy, "GET", "/echo", bearer("client-key-for-vllm"))
    assert [v for n, v in body["headers"] if n.lower() == "authorization"] == ["Bearer client-key-for-vllm"]


async def test_vllm_with_its_own_key_behind_proxy_keys(make_proxy: Any) -> None:
    """The simulator refuses /v1 without its key: the readiness probe and the users' requests only
    work because the proxy supplies it."""
    proxy = await make_proxy(**KEYS)
    spec = {"model_spec": f"m --api-key vllm-secret {FAST}"}
    status, _, body = await call(proxy, "POST", "/switch", bearer(ADMIN), json=spec)
    assert status == 200, body
    proxy.groups.add(body["status"]["pid"])
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    status, _, body = await call(proxy, "POST", "/v1/chat/completions", bearer(USER), json=payload)
    assert status == 200 and body["choices"], body


# ------------------------------------------------------------------------------- command line


def _role_of(url: str, key: str | None) -> str:
    import httpx

    headers = bearer(key) if key else {}
    plugins = httpx.get(url + "/plugins", headers=headers, timeout=30).status_code
    status = httpx.get(url + "/status", headers=headers, timeout=30).status_code
    return {(200, 200): "admin", (403, 200): "user", (401, 401): "none"}.get(
        (plugins, status), f"{plugins}/{status}"
    )


def test_keys_from_options_environment_and_file(spawn_proxy: Any, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# the node's keys\nadmin file-admin\n\nuser file-user   # for the class\n")
    env = {"AIC_VLLM_PROXY_ADMIN_KEY": "env-admin-1, env-admin-2", "AIC_VLLM_PROXY_API_KEY": "env-user"}
    proxy = spawn_proxy("--keys-file", str(keys_file), env=env)
    roles = {key: _role_of(proxy.url, key) for key in ("env-admin-1", "env-admin-2", "env-user")}
    roles |= {key: _role_of(proxy.url, key) for key in ("file-admin", "file-user", "other", None)}
    assert roles == {
        "env-admin-1": "admin",
        "env-admin-2": "admin",
        "env-user": "user",
        "file-admin": "admin",
        "file-user": "user",
        "other": "none",
        None: "none",
    }
    # Repeated options (they take the place of the environment variables).
    proxy = spawn_proxy("--admin-key", "cli-a", "--admin-key", "cli-b", "--api-key", "cli-u", env=env)
    roles = {key: _role_of(proxy.url, key) for key in ("cli-a", "cli-b", "cli-u", "env-admin-1")}
    assert roles == {"cli-a": "admin", "cli-b": "admin", "cli-u": "user", "env-admin-1": "none"}


def test_keys_file_is_read_once(spawn_proxy: Any, tmp_path: Path) -> None:
    """``--keys-file <(pass show node-keys)``: a pipe can be read once. The daemon reads the file
    once and comes up with its keys (read twice, the second open would wait for a writer and
    the daemon would never listen)."""
    fifo = tmp_path / "keys.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "w") as pipe:  # waits for the daemon to open it
            pipe.write("admin piped-admin\n")

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    proxy = spawn_proxy("--keys-file", str(fifo))
    writer.join(10)
    assert not writer.is_alive()
    assert (_role_of(proxy.url, "piped-admin"), _role_of(proxy.url, None)) == ("admin", "none")


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "cannot read the keys file"), ("admin ok\nroot KEY\n", ":2: expected 'admin KEY' or 'user KEY'")],
)
def test_bad_keys_file_stops_start_up(tmp_path: Path, content: str | None, expected: str) -> None:
    keys_file = tmp_path / "keys"
    if content is not None:
        keys_file.write_text(content)
    result = subprocess.run(
        [sys.executable, "-m", "aic_vllm_proxy", "serve", "--host", "127.0.0.1", "--port", "0",
         "--vllm-command", SIM, "--keys-file", str(keys_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr, result.stderr


def test_open_proxy_warns_when_listening_beyond_loopback(spawn_proxy: Any, tmp_path: Path) -> None:
    warning = "without authentication"
    assert warning in spawn_proxy("--host", "0.0.0.0").read_output()
    assert warning not in spawn_proxy("--host", "0.0.0.0", "--api-key", "k").read_output()
    assert warning not in spawn_proxy().read_output()  # 127.0.0.1


def test_keys_file_without_keys_still_warns(spawn_proxy: Any, tmp_path: Path) -> None:
    """A keys file with no key in it leaves the proxy open, so it must say so like with no file."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("# keys go here\n")
    proxy = spawn_proxy("--host", "0.0.0.0", "--keys-file", str(keys_file))
    assert _role_of(proxy.url, None) == "admin"  # open indeed
    assert "without authentication" in proxy.read_output()


# ------------------------------------------------------------------------------- catalogue


CONFIG = """
[proxy]
model_policy = "catalog"

[models.small]
model = "org/small-model"
args = "--served-model-name small --sim-import-delay 0.05 --sim-load-delay 0.2"
aliases = ["s", "tiny"]
description = "a small one"

[models.trusted]
model = "org/custom-code"
args = ["--trust-remote-code", "--served-model-name", "trusted", "--sim-import-delay", "0"]
"""


async def test_catalogue_from_the_config_file(
    spawn_proxy: Any, tmp_path: Path, vllm_groups: set[int]
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(CONFIG)
    proxy = spawn_proxy("--config", str(config), "--admin-key", ADMIN, "--api-key", USER)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def get(path: str, key: str = ADMIN) -> tuple[int, Any]:
            async with session.get(proxy.url + path, headers=bearer(key)) as resp:
                return resp.status, await resp.json()

        async def switch(spec: str) -> tuple[int, Any]:
            async with session.post(
                proxy.url + "/switch", headers=bearer(ADMIN), json={"model_spec": spec}
            ) as r:
                body = await r.json()
                if r.status == 200:
                    vllm_groups.add(body["status"]["pid"])
                return r.status, body

        status, catalog = await get("/models/catalog")
        assert status == 200
        assert catalog["policy"] == "catalog" and catalog["denied_flags"] == ["--trust-remote-code"]
        assert catalog["models"]["small"] == {
            "model": "org/small-model",
            "args": "--served-model-name small --sim-import-delay 0.05 --sim-load-delay 0.2",
            "aliases": ["s", "tiny"],
            "description": "a small one",
        }
        assert catalog["models"]["trusted"]["args"].startswith("--trust-remote-code --served-model-name")
        assert (await get("/models/catalog", USER))[0] == 403

        status, body = await switch("tiny")  # by alias
        assert status == 200 and body["status"]["model"] == "small", body
        pid = body["status"]["pid"]
        status, body = await switch("small")  # the same entry by name: nothing restarts
        assert status == 200 and body["changed"] is False, body
        for refused in ("org/other-model", "org/small-model", "small --max-model-len 100", f"x {FAST}"):
            status, body = await switch(refused)
            assert status == 403, (refused, body)
            message = assert_error(body, 403, "permission_error")
            assert "catalogue" in message and "small" in message, message
        status, now = await get("/status")
        assert now["state"] == "ready" and now["pid"] == pid, now  # nothing was stopped
        # A catalogue entry may use a denied flag: the admin wrote it.
        status, body = await switch("trusted")
        assert status == 200 and body["status"]["model"] == "trusted", body
        header = Path(body["status"]["log_path"]).read_text().splitlines()[0]
        assert "--trust-remote-code" in header


async def test_open_policy_refuses_denied_flags_before_stopping(make_proxy: Any) -> None:
    proxy = await make_proxy(denied_flags=("--trust-remote-code", "--enable-lora"))
    status, body = await proxy.switch(f"m {FAST}")
    assert status == 200, body
    pid = body["status"]["pid"]
    for spec in (
        f"m --trust-remote-code {FAST}",
        f"other --trust-remote-code=true {FAST}",
        f"m --enable-lora {FAST}",
    ):
        for wait in (True, False):
            status, body = await proxy.switch(spec, wait=wait)
            assert status == 403, (spec, body)
            message = assert_error(body, 403, "permission_error")
            assert "not allowed" in message and body["error"]["param"] == "model_spec", message
    now = await proxy.status()
    assert now["state"] == "ready" and now["pid"] == pid and not now["switching"], now
    async with proxy.session.get(proxy.url + "/models/catalog") as resp:
        catalog = await resp.json()
    assert catalog == {
        "policy": "open",
        "denied_flags": ["--trust-remote-code", "--enable-lora"],
        "models": {},
    }


async def test_allowed_flag_comes_off_the_deny_list(make_proxy: Any) -> None:
    proxy = await make_proxy(allowed_flags=("--trust-remote-code",))
    async with proxy.session.get(proxy.url + "/models/catalog") as resp:
        assert (await resp.json())["denied_flags"] == []
    status, body = await proxy.switch(f"m --trust-remote-code {FAST}")
    assert status == 200, body
    log = Path(body["status"]["log_path"]).read_text()
    assert "'trust_remote_code': True" in log


@pytest.mark.parametrize("spelling", ["--trust_remote_code", "--trust-remote", "--trust_remote-code"])
async def test_denied_flag_in_another_spelling_is_refused(make_proxy: Any, spelling: str) -> None:
    """vLLM reads ``--trust_remote_code`` as ``--trust-remote-code`` (underscores become dashes)
    and argparse takes any unambiguous prefix such as ``--trust-remote``: the simulator parses
    like vLLM and turns ``trust_remote_code`` on for each of these, so each must be refused."""
    proxy = await make_proxy()
    status, body = await proxy.switch(f"m {spelling} {FAST}", wait=False)
    assert status == 403, body
    assert (await proxy.status())["state"] == "stopped"

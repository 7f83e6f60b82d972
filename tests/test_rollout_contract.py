"""Our engine boundary against SGLang 0.5.23's own source (the wheel, read with `ast`, never imported).

* every request model of protocol.py (what EngineClient sends, what the embedded server accepts) has only
  fields that exist in its SGLang request struct, with a type SGLang accepts;
* the bodies EngineClient actually puts on the wire use only those models' fields;
* response models read only fields SGLang sends; every endpoint path exists in SGLang's http_server.py
  with the methods we use, and the embedded server serves exactly the endpoint table.
"""
from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import types
import typing
import urllib.parse
import zipfile
from pathlib import Path

import pytest
from pydantic import BaseModel

from megatron_rl.rollout import protocol
from megatron_rl.rollout.protocol import ENDPOINTS, REQUEST_BODIES, RESPONSE_BODIES, SglangStruct

SGLANG_VERSION = "0.5.23"
NETWORK_ERRORS = (
    "NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
    "Name or service not known", "Network is unreachable", "ConnectTimeoutError", "ProxyError",
    "Max retries exceeded", "No route to host", "Connection refused", "nodename nor servname",
)


def _cache_dir() -> Path:
    root = Path(os.environ.get("MEGATRON_RL_CACHE", Path.home() / ".cache" / "megatron-rl"))
    return root / "sglang-wheel" / SGLANG_VERSION


@pytest.fixture(scope="module")
def sglang_wheel() -> zipfile.ZipFile:
    directory = _cache_dir()
    wheels = sorted(directory.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
    if not wheels:
        directory.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   f"sglang=={SGLANG_VERSION}", "-d", str(directory)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        output = done.stdout + done.stderr
        wheels = sorted(directory.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
        if done.returncode != 0 or not wheels:
            index, reachable = _package_index_reachable()
            if not reachable or any(marker in output for marker in NETWORK_ERRORS):
                pytest.skip(f"cannot download sglang=={SGLANG_VERSION}: no network to the package index {index} "
                            f"({output.strip().splitlines()[-1] if output.strip() else 'pip failed'})")
            pytest.fail(f"`{' '.join(command)}` failed (exit {done.returncode}) although {index} is reachable:\n"
                        f"{output[-3000:]}")
    return zipfile.ZipFile(wheels[-1])


def _package_index_reachable() -> tuple[str, bool]:
    """pip's index URL and whether a TCP connection to it can be opened (the skip is for no network only)."""
    index = os.environ.get("PIP_INDEX_URL", "")
    if not index:
        listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
        for line in listing.stdout.splitlines():
            key, _, value = line.partition("=")
            if key.endswith(".index-url") and not key.endswith("extra-index-url"):
                index = value.strip().strip("'\"")
        index = index or "https://pypi.org/simple"
    parsed = urllib.parse.urlparse(index)
    if parsed.scheme == "file":
        return index, True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=10).close()
        return index, True
    except OSError:
        return index, False


# ------------------------------------------------------------------------------------------ reading SGLang


class SourceModule:
    """Module-level classes (fields with annotations, bases) and type aliases of one SGLang file."""

    def __init__(self, source: str):
        tree = ast.parse(source)
        self.classes: dict[str, tuple[list[str], dict[str, ast.expr]]] = {}
        self.aliases: dict[str, ast.expr] = {}
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
                fields = {}
                for item in node.body:
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        if "ClassVar" not in ast.unparse(item.annotation):
                            fields[item.target.id] = item.annotation
                self.classes[node.name] = (bases, fields)
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self.aliases[node.targets[0].id] = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                self.aliases[node.target.id] = node.value

    def fields(self, name: str) -> dict[str, ast.expr]:
        """Fields of class `name`, inherited ones (from classes of this module) included."""
        bases, own = self.classes[name]
        merged: dict[str, ast.expr] = {}
        for base in bases:
            if base in self.classes:
                merged.update(self.fields(base))
        merged.update(own)
        return merged


# Normalized JSON types: ("any",) ("none",) ("bool",) ("int",) ("float",) ("str",) ("object",)
# ("list", frozenset[inner]) ("literal", frozenset[values]) ("opaque", name)
ANY, NONE, BOOL, INT, FLOAT, STR, OBJECT = ("any",), ("none",), ("bool",), ("int",), ("float",), ("str",), ("object",)
_SCALARS = {"int": INT, "float": FLOAT, "str": STR, "bool": BOOL, "Any": ANY, "object": ANY, "bytes": ("opaque", "bytes")}


def sglang_type(node: ast.expr, module: SourceModule, seen: frozenset = frozenset()) -> frozenset:
    if isinstance(node, ast.Constant):
        if node.value is None:
            return frozenset({NONE})
        if isinstance(node.value, str):  # a string forward reference
            return sglang_type(ast.parse(node.value, mode="eval").body, module, seen)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return sglang_type(node.left, module, seen) | sglang_type(node.right, module, seen)
    if isinstance(node, ast.Attribute):  # typing.List etc.
        node = ast.Name(id=node.attr)
    if isinstance(node, ast.Name):
        name = node.id
        if name in _SCALARS:
            return frozenset({_SCALARS[name]})
        if name in ("dict", "Dict", "Mapping"):
            return frozenset({OBJECT})
        if name in ("list", "List", "Sequence", "tuple", "Tuple"):
            return frozenset({("list", frozenset({ANY}))})
        if name in module.aliases and name not in seen:
            return sglang_type(module.aliases[name], module, seen | {name})
        if name in module.classes:
            return frozenset({OBJECT})  # a struct: a JSON object
        return frozenset({("opaque", name)})
    if isinstance(node, ast.Subscript):
        base = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
        args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base == "Optional":
            return sglang_type(args[0], module, seen) | {NONE}
        if base == "Union":
            return frozenset().union(*(sglang_type(a, module, seen) for a in args))
        if base == "Annotated":
            inner = sglang_type(args[0], module, seen)
            if any(isinstance(a, ast.Call) and getattr(a.func, "id", None) == "Base64Bytes" for a in args[1:]):
                return _bytes_as_base64(inner)  # HTTP callers send these bytes as base64 strings
            return inner
        if base in ("List", "list", "Sequence"):
            return frozenset({("list", sglang_type(args[0], module, seen))})
        if base in ("Tuple", "tuple"):
            return frozenset({("list", frozenset().union(*(sglang_type(a, module, seen) for a in args
                                                            if not isinstance(a, ast.Constant) or a.value is not ...)))})
        if base in ("Dict", "dict", "Mapping"):
            return frozenset({OBJECT})
        if base == "Literal":
            return frozenset({("literal", frozenset(a.value for a in args if isinstance(a, ast.Constant)))})
    return frozenset({("opaque", ast.unparse(node))})


def _bytes_as_base64(types_: frozenset) -> frozenset:
    def one(t):
        if t == ("opaque", "bytes"):
            return STR
        if t[0] == "list":
            return ("list", _bytes_as_base64(t[1]))
        return t
    return frozenset(one(t) for t in types_)


def our_type(annotation) -> frozenset:
    if annotation is None or annotation is type(None):
        return frozenset({NONE})
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return frozenset().union(*(our_type(a) for a in args))
    if origin is typing.Literal:
        return frozenset({("literal", frozenset(args))})
    if origin in (list, tuple):
        return frozenset({("list", frozenset().union(*(our_type(a) for a in args if a is not Ellipsis)))})
    if origin is dict or annotation is dict:
        return frozenset({OBJECT})
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return frozenset({OBJECT})
    simple = {int: INT, float: FLOAT, str: STR, bool: BOOL, typing.Any: ANY}
    if annotation in simple:
        return frozenset({simple[annotation]})
    raise AssertionError(f"contract test cannot read our annotation {annotation!r}; extend our_type()")


def accepts(theirs: frozenset, ours: frozenset) -> bool:
    """Does every JSON value of our type validate against their type?"""
    def one(value: tuple) -> bool:
        if ANY in theirs:
            return True
        kind = value[0]
        if kind == "int":
            return INT in theirs or FLOAT in theirs
        if kind == "literal":
            if all(isinstance(v, str) for v in value[1]) and STR in theirs:
                return True
            return any(t[0] == "literal" and value[1] <= t[1] for t in theirs)
        if kind == "list":
            return any(t[0] == "list" and accepts(t[1], value[1]) for t in theirs)
        if kind == "any":
            return False
        return value in theirs
    return all(one(value) for value in ours)


def render(types_: frozenset) -> str:
    def one(t):
        if t[0] == "list":
            return f"list[{render(t[1])}]"
        if t[0] in ("literal", "opaque"):
            return f"{t[0]}{sorted(map(str, t[1])) if t[0] == 'literal' else '(' + t[1] + ')'}"
        return t[0]
    return " | ".join(sorted(one(t) for t in types_))


@pytest.fixture(scope="module")
def sglang_sources(sglang_wheel) -> dict[str, SourceModule]:
    files = {target[0] for cls in (*REQUEST_BODIES, *RESPONSE_BODIES) for target in cls.sglang.targets}
    return {name: SourceModule(sglang_wheel.read(name).decode()) for name in files}


# ------------------------------------------------------------------------------------------ tests


def test_every_request_body_is_under_contract():
    declared = {obj for obj in vars(protocol).values()
                if isinstance(obj, type) and issubclass(obj, protocol._RequestBody) and obj is not protocol._RequestBody}
    assert declared == set(REQUEST_BODIES), "add new request models to protocol.REQUEST_BODIES"
    for endpoint in ENDPOINTS.values():
        if endpoint.body is not None:
            assert endpoint.body in REQUEST_BODIES, endpoint.path
    for model in REQUEST_BODIES:
        assert isinstance(model.sglang, SglangStruct) and model.sglang.direction == "request", model.__name__
        for name, field in model.model_fields.items():  # nested models must be under contract too
            for nested in _nested_models(field.annotation):
                assert nested in REQUEST_BODIES, f"{model.__name__}.{name}: {nested.__name__}"


def _nested_models(annotation) -> set[type[BaseModel]]:
    found = set()
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found.add(annotation)
    for arg in typing.get_args(annotation):
        found |= _nested_models(arg)
    return found


@pytest.mark.parametrize("model", REQUEST_BODIES, ids=lambda m: m.__name__)
def test_request_fields_exist_in_sglang_with_compatible_types(model, sglang_sources):
    problems = []
    for file, struct in model.sglang.targets:
        module = sglang_sources[file]
        assert struct in module.classes, f"{struct} is gone from {file} in sglang {SGLANG_VERSION}"
        theirs = module.fields(struct)
        for name, field in model.model_fields.items():
            if name not in theirs:
                problems.append(f"{model.__name__}.{name}: no such field in {file}:{struct}")
                continue
            ours_t, theirs_t = our_type(field.annotation), sglang_type(theirs[name], module)
            if not accepts(theirs_t, ours_t):
                problems.append(f"{model.__name__}.{name}: we send {render(ours_t)}, {struct}.{name} is "
                                f"{ast.unparse(theirs[name])} = {render(theirs_t)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("model", RESPONSE_BODIES, ids=lambda m: m.__name__)
def test_response_fields_are_sent_by_sglang(model, sglang_sources):
    contract = model.sglang
    field_sets = []
    for file, struct in contract.targets:
        module = sglang_sources[file]
        assert struct in module.classes, f"{struct} is gone from {file} in sglang {SGLANG_VERSION}"
        field_sets.append(set(module.fields(struct)))
    for name in model.model_fields:
        if name in contract.tag_fields:
            continue
        holders = [fields for fields in field_sets if name in fields]
        if contract.match == "all":
            assert len(holders) == len(field_sets), f"{model.__name__}.{name} is not in every {contract.targets}"
        else:
            assert holders, f"{model.__name__}.{name} is in none of {contract.targets}"


def test_sampling_param_keys_are_sglangs(sglang_sources):
    theirs = set(sglang_sources[protocol.API_TYPES].fields("SamplingParams"))
    assert set(protocol.SGLANG_SAMPLING_PARAM_KEYS) == theirs


def _sglang_routes(source: str) -> dict[str, set[str]]:
    routes: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for decorator in node.decorator_list:
            if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                    and getattr(decorator.func.value, "id", None) == "app"):
                continue
            if not decorator.args or not isinstance(decorator.args[0], ast.Constant):
                continue
            path, kind = decorator.args[0].value, decorator.func.attr
            if kind == "api_route":
                methods = next((ast.literal_eval(k.value) for k in decorator.keywords if k.arg == "methods"), ["GET"])
            else:
                methods = [kind.upper()]
            routes.setdefault(path, set()).update(methods)
    return routes


def test_endpoints_exist_in_sglang_http_server(sglang_wheel):
    routes = _sglang_routes(sglang_wheel.read("sglang/srt/entrypoints/http_server.py").decode())
    for path, endpoint in ENDPOINTS.items():
        assert path in routes, f"{path} is not served by sglang {SGLANG_VERSION}"
        assert set(endpoint.methods) <= routes[path], f"{path}: we use {endpoint.methods}, sglang serves {routes[path]}"
    assert "/get_weight_version" not in routes  # removed in 0.5.21: weight_version comes from /model_info


def test_embedded_server_serves_exactly_the_endpoint_table():
    from megatron_rl.rollout.embedded_server import create_app

    app = create_app(engine=None)  # routes only; no handler runs
    served: dict[str, set[str]] = {}
    for route in app.routes:
        if getattr(route, "methods", None):
            served.setdefault(route.path, set()).update(route.methods - {"HEAD"})
    assert served == {path: set(e.methods) for path, e in ENDPOINTS.items()}


WEIGHT_CONTROL_PATHS = ("/begin_weight_update", "/end_weight_update", "/update_weights_from_tensor",
                        "/init_weights_update_group", "/update_weights_from_distributed",
                        "/destroy_weights_update_group", "/update_weight_version")


class _Recorder:
    """Stands in for urllib's opener: records what EngineClient puts on the wire, answers canned JSON."""

    def __init__(self):
        self.sent: list[tuple[str, str, dict | None]] = []

    def open(self, request, timeout=None):
        path = request.full_url.split("://", 1)[1].split("/", 1)[1].split("?")[0]
        body = json.loads(request.data) if request.data else None
        self.sent.append((request.get_method(), "/" + path, body))
        answers = {
            "/generate": [{"output_ids": [1], "meta_info": {"id": rid, "finish_reason": {"type": "length", "length": 1},
                                                           "prompt_tokens": 1, "completion_tokens": 1,
                                                           "output_token_logprobs": [[-0.5, 1, None]]}}
                          for rid in (body or {}).get("rid", [])],
            "/update_weights_from_disk": {"success": True, "message": "ok", "num_paused_requests": 0},
            **{path: {"success": True, "message": "ok"} for path in WEIGHT_CONTROL_PATHS},
            "/model_info": {"model_path": "/m", "weight_version": "v"},
        }
        payload = json.dumps(answers.get("/" + path)).encode() if "/" + path in answers else b""

        class Response:
            status = 200

            def read(self):
                return payload

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False
        return Response()


def test_what_the_client_sends_is_in_the_contract(sglang_sources):
    from megatron_rl.rollout import EngineClient, GenerateRequest, SamplingParams

    client = EngineClient("http://engine.invalid:1")
    recorder = _Recorder()
    client._opener = recorder
    full = SamplingParams(max_new_tokens=3, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, min_new_tokens=1,
                          stop_token_ids=[2], ignore_eos=True, sampling_seed=3)
    client.generate([GenerateRequest(input_ids=[1, 2], sampling_params=full, rid="r"), GenerateRequest(input_ids=[3])])
    client.generate([GenerateRequest(input_ids=[1, 2], logprob_start_len=0), GenerateRequest(input_ids=[3])])
    client.begin_weight_update()
    client.update_weights_from_tensor(["cGF5bG9hZA=="], load_format="flattened_bucket", weight_version="v2",
                                      flush_cache=False, abort_all_requests=True)
    client.init_weights_update_group("127.0.0.1", 29500, 1, 2, group_name="g", backend="gloo")
    client.update_weights_from_distributed(["w"], ["float32"], [[2, 3]], group_name="g", load_format="flattened_bucket",
                                           weight_version="v3", flush_cache=False, abort_all_requests=True)
    client.destroy_weights_update_group("g")
    client.end_weight_update()
    client.update_weight_version("v4")
    client.update_weights_from_disk("/w", "v1", load_format="auto", flush_cache=False, abort_all_requests=True)
    client.release_memory_occupation(["weights"])
    client.resume_memory_occupation()
    client.abort_request("r")
    client.abort_request(abort_all=True)
    client.pause_generation("retract")
    client.continue_generation()
    client.flush_cache()
    client.get_model_info()

    assert {path for _, path, _ in recorder.sent} >= set(WEIGHT_CONTROL_PATHS)
    assert recorder.sent[1][2]["logprob_start_len"] == [0, -1]
    assert "logprob_start_len" not in recorder.sent[0][2]  # output-only requests send what they always did
    for method, path, body in recorder.sent:
        endpoint = ENDPOINTS[path]
        assert method in endpoint.methods, (method, path)
        if body is None:
            continue
        assert endpoint.body is not None, f"{path}: client sends a body, the table has no model for it"
        assert set(body) <= set(endpoint.body.model_fields), (path, set(body) - set(endpoint.body.model_fields))
        for file, struct in endpoint.body.sglang.targets:
            theirs = sglang_sources[file].fields(struct)
            assert set(body) <= set(theirs), (path, struct, set(body) - set(theirs))
        if path == "/generate":
            for params in body["sampling_params"]:
                assert set(params) <= set(sglang_sources[protocol.API_TYPES].fields("SamplingParams"))

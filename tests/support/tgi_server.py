"""A server speaking TGI's wire protocol, for the `tgi` backend's tests (TGI needs GPUs).

It implements what the `text-generation` client uses (and POST /generate, which the
operator's smoke test calls): POST / (TGI's compat route,
`"stream": true`) and POST /generate_stream, both with
SSE `data:` events (token events, then one with `generated_text` and `details`),
errors as HTTP 4xx/5xx JSON `{"error", "error_type"}` before the stream and as an
SSE error event under HTTP 200 once streaming, 429 `overloaded` when its
concurrency limit is reached, POST /tokenize, GET /health and /info. Its behaviour comes from the
prompt, so one server serves every test case:

    "fail-after:N"   send N tokens, then an SSE error event (error_type generation)
    "slow:MS"        wait MS milliseconds between tokens
    "overload:K"     answer 429 to the first K requests carrying this prompt
    "say:TEXT|"      send TEXT in pieces of three characters (after what of it the prompt ends with)

and POST /control/die arms a kill: the stream of a given prompt ends the server (SIGKILL) after K tokens.

GET /stats tells what the server saw: streams started, finished, and cut off by the
client (with how many tokens had been sent), so tests can prove cancellation from
the backend's side.

Given a model folder holding a GGUF (`--model-id /models/model`, as the operator runs TGI), it
generates with llama.cpp instead, one generation at a time: the `tgi` image the test node runs
in place of TGI (tests/support/Dockerfile.tgi). It takes TGI launcher's flags, so it runs with
the arguments the operator renders.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


class LlamaModel:
    """A GGUF through llama.cpp; the streamed pieces come from a worker thread, one generation at a time."""

    def __init__(self, path: Path) -> None:
        from llama_cpp import Llama

        self.path = path
        self._llm = Llama(model_path=str(path), n_ctx=2048, n_threads=1, verbose=False)
        self._lock = asyncio.Lock()

    def tokenize(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode(), add_bos=False, special=True))

    async def pieces(self, prompt: str, max_new: int, seed: int | None) -> AsyncIterator[tuple[str, str | None]]:
        """(text, finish reason on the last piece: "length" or "eos_token")."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, str | None] | None] = asyncio.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                stream = self._llm.create_completion(
                    prompt, max_tokens=max_new, temperature=0.0, seed=seed or 0, stream=True
                )
                for chunk in stream:
                    choice = chunk["choices"][0]
                    reason = {"length": "length", "stop": "eos_token"}.get(choice.get("finish_reason") or "")
                    loop.call_soon_threadsafe(queue.put_nowait, (choice["text"], reason))
                    if stop.is_set():
                        break
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        async with self._lock:
            worker = loop.run_in_executor(None, work)
            try:
                # One piece behind: llama.cpp sends the finish reason on a piece of its own, TGI on the last token.
                held: tuple[str, str | None] | None = None
                while (item := await queue.get()) is not None:
                    if held is not None and item[1] is not None and not item[0]:
                        held = (held[0], item[1])
                        continue
                    if held is not None:
                        yield held
                    held = item
                if held is not None:
                    yield held[0], held[1] or "length"
            finally:
                stop.set()
                await worker


def find_gguf(model_id: str) -> Path | None:
    folder = Path(model_id)
    found = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    return found[0] if found else None


class FakeTgi:
    def __init__(self, name: str, max_concurrent: int, model_id: str = "fake/tgi") -> None:
        self.name = name
        self.max_concurrent = max_concurrent
        self.model_id = model_id
        gguf = find_gguf(model_id)
        self.model = LlamaModel(gguf) if gguf else None
        self.active = 0
        self.stats: dict[str, object] = {
            "started": 0,
            "finished": 0,
            "aborted": 0,
            "aborted_after_tokens": [],
            "overloaded": 0,
            "prompts": [],
            "most_active": 0,  # the most generations it ran at once
        }
        self._overloads: Counter[str] = Counter()
        # Prompts whose stream kills this server (SIGKILL, as a replica dies) after that many tokens (see `die`).
        self.dying: dict[str, int] = {}
        # ... or stalls there (sends nothing more, keeps the connection open), as a hung GPU does.
        self.stalling: dict[str, int] = {}
        # Backends (by path prefix) that misbehave on /generate, and how (see `fail`).
        self.failing: dict[str, str] = {}

    def _option(self, prompt: str, key: str) -> int | None:
        m = re.search(rf"{key}:(\d+)", prompt)
        return int(m.group(1)) if m else None

    async def compat_generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"error": "this test server only streams", "error_type": "validation"}, status=422)
        return await self._stream(request, body)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, await request.json())

    async def _stream(self, request: web.Request, body: dict[str, object]) -> web.StreamResponse:
        prompt = str(body["inputs"])
        params: dict[str, object] = body.get("parameters") or {}  # type: ignore[assignment]
        max_new = int(params.get("max_new_tokens") or 20)  # type: ignore[call-overload]
        self.stats["prompts"].append(prompt)  # type: ignore[attr-defined]
        overload = self._option(prompt, "overload")
        if self.active >= self.max_concurrent or (overload and self._overloads[prompt] < overload):
            self._overloads[prompt] += 1
            self.stats["overloaded"] += 1  # type: ignore[operator]
            return web.json_response({"error": "Model is overloaded", "error_type": "overloaded"}, status=429)
        if max_new > 4096:
            return web.json_response(
                {"error": "max_new_tokens must be <= 4096", "error_type": "validation"}, status=422
            )
        fail_after = self._option(prompt, "fail-after")
        delay = (self._option(prompt, "slow") or 0) / 1000
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        self.active += 1
        self.stats["most_active"] = max(int(self.stats["most_active"]), self.active)  # type: ignore[call-overload]
        self.stats["started"] += 1  # type: ignore[operator]
        sent = 0
        try:
            if self.model is not None:
                seed = params.get("seed")
                await self._stream_model(response, prompt, max_new, int(seed) if seed is not None else None)  # type: ignore[call-overload]
                self.stats["finished"] += 1  # type: ignore[operator]
                return response
            script = self._script(prompt, max_new)
            for i, text in enumerate(script):
                if i == self.dying.get(prompt):
                    await asyncio.sleep(0.05)  # what was written reaches the client before the process goes
                    os.kill(os.getpid(), signal.SIGKILL)
                if i == self.stalling.get(prompt):
                    await asyncio.sleep(3600)
                if fail_after is not None and i == fail_after:
                    await self._event(
                        response, {"error": "Request failed during generation: CUDA error", "error_type": "generation"}
                    )
                    return response
                if delay:
                    await asyncio.sleep(delay)
                last = i == len(script) - 1
                event = {
                    "index": i + 1,
                    "token": {"id": 1000 + i, "text": text, "logprob": -0.5, "special": False},
                    "generated_text": None,
                    "details": None,
                    "top_tokens": None,
                }
                if last:
                    event["generated_text"] = "".join(script)
                    reason = "length" if len(script) == max_new else "eos_token"
                    event["details"] = {"finish_reason": reason, "generated_tokens": len(script), "seed": None}
                await self._event(response, event)
                sent += 1
            self.stats["finished"] += 1  # type: ignore[operator]
        except (ConnectionResetError, asyncio.CancelledError):
            # The client went away: aiohttp cancels the handler or the write fails.
            self.stats["aborted"] += 1  # type: ignore[operator]
            self.stats["aborted_after_tokens"].append(sent)  # type: ignore[attr-defined]
            raise
        finally:
            self.active -= 1
        return response

    @staticmethod
    def _script(prompt: str, max_new: int) -> list[str]:
        """The tokens to send: the words in turn, or with "say:TEXT|" in the prompt, TEXT in pieces of three
        characters, carried on after whatever of it the prompt already ends with (a call carried on after
        a failure asks with the text it has), then the end of the sequence."""
        said = re.search(r"say:([^|]*)\|", prompt)
        if said is None:
            return [f" {WORDS[i % len(WORDS)]}" for i in range(max_new)]
        pieces = [said.group(1)[i : i + 3] for i in range(0, len(said.group(1)), 3)]
        done = max(k for k in range(len(pieces) + 1) if prompt.endswith("".join(pieces[:k])))
        return pieces[done : done + max_new] or [""]

    async def _stream_model(self, response: web.StreamResponse, prompt: str, max_new: int, seed: int | None) -> None:
        assert self.model is not None
        text: list[str] = []
        die_after = self.dying.get(prompt)
        pieces = self.model.pieces(prompt, max_new, seed)
        async for piece, reason in pieces:
            if len(text) == die_after:
                await asyncio.sleep(0.05)  # what was written reaches the client before the process goes
                os.kill(os.getpid(), signal.SIGKILL)
            text.append(piece)
            event: dict[str, object] = {
                "index": len(text),
                "token": {"id": len(text), "text": piece, "logprob": 0.0, "special": False},
                "generated_text": None,
                "details": None,
                "top_tokens": None,
            }
            if reason is not None:
                event["generated_text"] = "".join(text)
                event["details"] = {"finish_reason": reason, "generated_tokens": len(text), "seed": seed}
            await self._event(response, event)

    @staticmethod
    async def _event(response: web.StreamResponse, data: dict[str, object]) -> None:
        await response.write(f"data:{json.dumps(data)}\n\n".encode())

    async def generate(self, request: web.Request) -> web.Response:
        """POST /generate (non-streaming), also under any path prefix: `/<namespace>/<service>/generate`
        stands for that Service's backend, so one server plays every backend color in operator tests."""
        body = await request.json()
        if not isinstance(body.get("inputs"), str):
            return web.json_response({"error": "missing inputs", "error_type": "validation"}, status=422)
        fault = self.failing.get(request.match_info.get("prefix", ""))
        if fault is not None:
            return await self._misbehave(request, fault)
        n = int((body.get("parameters") or {}).get("max_new_tokens") or 4)
        if self.model is not None:
            self.stats["started"] += 1  # type: ignore[operator]
            text = "".join([piece async for piece, _ in self.model.pieces(body["inputs"], n, None)])
            self.stats["finished"] += 1  # type: ignore[operator]
            return web.json_response({"generated_text": text})
        return web.json_response({"generated_text": " ".join(WORDS[i % len(WORDS)] for i in range(n))})

    async def fail(self, request: web.Request) -> web.Response:
        """POST /control/fail {"prefix": "ns/service", "failing": true, "mode": ...}: that backend's /generate
        misbehaves as `mode` says (FAULTS; default "error"); "failing": false makes it well again."""
        body = await request.json()
        if body.get("failing", True):
            self.failing[body["prefix"]] = str(body.get("mode", "error"))
        else:
            self.failing.pop(body["prefix"], None)
        return web.json_response(self.failing)

    async def die(self, request: web.Request) -> web.Response:
        """POST /control/die {"prompt": P, "after_tokens": K}: the stream of prompt P (exactly) kills this
        server with SIGKILL once it has sent K tokens, as a replica lost mid-generation; with
        "stall": true it sends nothing more instead (words mode), its connection left open."""
        body = await request.json()
        armed = self.stalling if body.get("stall") else self.dying
        armed[str(body["prompt"])] = int(body["after_tokens"])
        return web.json_response({"armed": len(armed)})

    @staticmethod
    async def _misbehave(request: web.Request, mode: str) -> web.StreamResponse:
        """What a hostile or broken pod behind a backend Service could answer a smoke check with."""
        if mode == "stall":  # accepts, reads, never answers
            await asyncio.sleep(3600)
        if mode == "redirect":  # to another namespace's Service
            raise web.HTTPTemporaryRedirect("http://10.6.6.6/other-namespace/secret-service/generate")
        if mode == "flood":  # a 200 whose body never ends (1 GiB, unannounced)
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            await response.prepare(request)
            chunk = b'{"generated_text": "' + b"x" * (1 << 20)
            for _ in range(1024):
                await response.write(chunk)
            return response
        # "error": a 500 whose body carries what must never be copied into a status or an Event
        body = {"error": "CUDA out of memory; SECRET-FROM-THE-POD", "error_type": "generation"}
        return web.json_response(body, status=500)

    async def tokenize(self, request: web.Request) -> web.Response:
        """TGI's POST /tokenize: the input's tokens as {id, text, start, stop}. With a model, its own
        vocabulary's; else a word or a single other character a token (each CJK character one)."""
        text = str((await request.json())["inputs"])
        self.stats["tokenized"] = int(self.stats.get("tokenized", 0)) + 1  # type: ignore[call-overload]
        if self.model is not None:
            ids = self.model.tokenize(text)
            return web.json_response([{"id": i, "text": "", "start": 0, "stop": 0} for i in ids])
        tokens = [
            {"id": n, "text": m.group(), "start": m.start(), "stop": m.end()}
            for n, m in enumerate(re.finditer(r"[A-Za-z0-9_]+|\S", text))
        ]
        return web.json_response(tokens)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_id": self.model_id,
                "max_concurrent_requests": self.max_concurrent,
                "version": "fake",
                "router": self.name,
            }
        )

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response({**self.stats, "active": self.active, "name": self.name})


def make_app(name: str, max_concurrent: int, model_id: str = "fake/tgi") -> web.Application:
    fake = FakeTgi(name, max_concurrent, model_id)
    app = web.Application()
    # TGI's compat route: POST / with "stream": true is what the text-generation client calls.
    app.router.add_post("/", fake.compat_generate)
    app.router.add_post("/generate_stream", fake.generate_stream)
    app.router.add_post("/generate", fake.generate)
    app.router.add_post("/control/fail", fake.fail)
    app.router.add_post("/control/die", fake.die)
    app.router.add_post("/{prefix:.+}/generate", fake.generate)
    app.router.add_post("/tokenize", fake.tokenize)
    app.router.add_get("/health", fake.health)
    app.router.add_get("/info", fake.info)
    app.router.add_get("/stats", fake.get_stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="tgi")
    # TGI launcher's names for these, as the operator passes them.
    parser.add_argument("--max-concurrent", "--max-concurrent-requests", dest="max_concurrent", type=int, default=128)
    parser.add_argument("--hostname", default="127.0.0.1")
    # As TGI's launcher: a local folder is loaded from disk (here: its config.json must be there), or it fails.
    parser.add_argument("--model-id", default="fake/tgi")
    # Taken, and of no use without GPUs (or, --usage-stats, without TGI's telemetry: this one sends none).
    for flag in (
        "--max-input-tokens",
        "--max-total-tokens",
        "--max-batch-prefill-tokens",
        "--quantize",
        "--num-shard",
        "--usage-stats",
    ):
        parser.add_argument(flag)
    args = parser.parse_args()
    if args.model_id.startswith("/") and not (Path(args.model_id) / "config.json").is_file():
        sys.exit(f"cannot load {args.model_id}: no config.json")
    web.run_app(
        make_app(args.name, args.max_concurrent, args.model_id),
        host=args.hostname,
        port=args.port,
        print=None,
        shutdown_timeout=1.0,
    )


if __name__ == "__main__":
    main()

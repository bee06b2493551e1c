#!/usr/bin/env python3
"""Drives a running tally gateway with the official OpenAI and Anthropic Python SDKs.

The clients are used exactly as a customer would: only `base_url` and `api_key` differ from
talking to the providers directly. Prints one line per check and exits non-zero if any fails.
The last line, `upstream-requests openai=N anthropic=M`, counts the requests that reached a
provider (and so must be metered); tests/sdk_compat.rs reads it.

    python tests/sdk/check_sdks.py --gateway http://127.0.0.1:8080 --token tly_...
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Callable

try:
    import anthropic
    import openai
except ImportError as e:  # pragma: no cover - reported to the Rust test
    print(f"SETUP: cannot import the SDKs ({e}); run `bash tests/run.sh` to install them",
          file=sys.stderr)
    sys.exit(3)

OPENAI_MODEL = "gpt-4o"
ANTHROPIC_MODEL = "claude-haiku-4-5"
UNKNOWN_MODEL = "no-such-model"
BAD_TOKEN = "tly_not-a-real-gateway-token"
PROMPT = "Say hello to the gateway in five words."


class CheckFailed(Exception):
    pass


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def error_text(e: Exception) -> str:
    """The error's parsed body and the raw response text, for matching stable codes."""
    parts = [json.dumps(getattr(e, "body", None), default=str)]
    response = getattr(e, "response", None)
    if response is not None:
        try:
            parts.append(response.text)
        except Exception:  # noqa: BLE001 - a streamed body may be unreadable
            pass
    return " ".join(parts)


class Checks:
    def __init__(self, gateway: str, token: str) -> None:
        self.gateway = gateway
        self.token = token
        self.failures: list[str] = []
        self.passed = 0
        # Requests that reached a provider and must show up in the ledger's usage.
        self.upstream = {"openai": 0, "anthropic": 0}

    def run(self, name: str, fn: Callable[[], str]) -> None:
        try:
            detail = fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
            self.failures.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            if not isinstance(e, CheckFailed):
                traceback.print_exc(file=sys.stderr)
            return
        self.passed += 1
        print(f"ok   {name}: {detail}", flush=True)

    # ---- OpenAI ------------------------------------------------------------------------------

    def openai_client(self, token: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway + "/v1", api_key=token or self.token)

    def openai_chat(self) -> str:
        self.upstream["openai"] += 1
        r = self.openai_client().chat.completions.create(
            model=OPENAI_MODEL, messages=[{"role": "user", "content": PROMPT}]
        )
        expect(len(r.choices) == 1, f"one choice expected, got {len(r.choices)}")
        content = r.choices[0].message.content
        expect(bool(content), f"empty content: {r!r}")
        expect(r.choices[0].message.role == "assistant", f"role {r.choices[0].message.role!r}")
        expect(r.choices[0].finish_reason is not None, "no finish_reason")
        u = r.usage
        expect(u is not None, "no usage in the response")
        expect(u.prompt_tokens > 0 and u.completion_tokens > 0, f"usage {u!r}")
        expect(u.total_tokens == u.prompt_tokens + u.completion_tokens, f"usage {u!r}")
        return f"{len(content)} chars, usage {u.prompt_tokens}+{u.completion_tokens}"

    def openai_with_raw_response(self) -> str:
        self.upstream["openai"] += 1
        raw = self.openai_client().chat.completions.with_raw_response.create(
            model=OPENAI_MODEL, messages=[{"role": "user", "content": PROMPT}]
        )
        expect(raw.http_request.url.path.endswith("/v1/chat/completions"),
               f"path {raw.http_request.url.path}")
        parsed = raw.parse()
        expect(bool(parsed.choices[0].message.content), "empty content")
        request_id = raw.headers.get("x-tally-request-id")
        expect(bool(request_id), "no x-tally-request-id header")
        return f"HTTP {raw.status_code}, x-tally-request-id {request_id}"

    def openai_stream(self) -> str:
        self.upstream["openai"] += 1
        stream = self.openai_client().chat.completions.create(
            model=OPENAI_MODEL, messages=[{"role": "user", "content": PROMPT}], stream=True
        )
        text, chunks, finish = "", 0, None
        for chunk in stream:
            chunks += 1
            # The gateway asks the provider for usage on every stream; a client that did not
            # ask must not get the extra usage-only chunk (code indexing choices[0] breaks).
            expect(chunk.usage is None, f"unrequested usage chunk: {chunk!r}")
            expect(len(chunk.choices) == 1, f"chunk without a choice: {chunk!r}")
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        expect(bool(text), f"no text in {chunks} chunks")
        expect(finish is not None, "no finish_reason in the stream")
        return f"{chunks} chunks, {len(text)} chars, finish_reason {finish}"

    def openai_stream_usage(self) -> str:
        self.upstream["openai"] += 1
        stream = self.openai_client().chat.completions.create(
            model=OPENAI_MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        expect(bool(text), "no text")
        last = chunks[-1] if chunks else None
        expect(last is not None and last.choices == [] and last.usage is not None,
               f"the last chunk is not the usage chunk: {last!r}")
        u = last.usage
        expect(u.prompt_tokens > 0 and u.completion_tokens > 0, f"usage {u!r}")
        earlier = [c for c in chunks[:-1] if c.usage is not None]
        expect(not earlier, f"usage before the last chunk: {earlier!r}")
        return f"{len(chunks)} chunks, final usage {u.prompt_tokens}+{u.completion_tokens}"

    def openai_stream_helper(self) -> str:
        self.upstream["openai"] += 1
        with self.openai_client().chat.completions.stream(
            model=OPENAI_MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            stream_options={"include_usage": True},
        ) as stream:
            deltas = [e.delta for e in stream if e.type == "content.delta"]
            final = stream.get_final_completion()
        expect(bool(deltas), "no content.delta events")
        expect(final.choices[0].message.content == "".join(deltas),
               "the final completion differs from the streamed text")
        expect(final.usage is not None and final.usage.completion_tokens > 0,
               f"usage {final.usage!r}")
        return f"{len(deltas)} deltas, usage {final.usage.prompt_tokens}+{final.usage.completion_tokens}"

    def openai_models(self) -> str:
        models = list(self.openai_client().models.list())
        ids = [m.id for m in models]
        expect(bool(ids), "no models")
        expect(any(i in ("gpt-4o", "openai:gpt-4o") for i in ids), f"gpt-4o not listed: {ids}")
        expect(all(m.object == "model" for m in models), "an entry is not a model")
        return f"{len(ids)} models"

    def openai_bad_token(self) -> str:
        try:
            self.openai_client(BAD_TOKEN).chat.completions.create(
                model=OPENAI_MODEL, messages=[{"role": "user", "content": PROMPT}]
            )
        except openai.AuthenticationError as e:
            expect(e.status_code == 401, f"status {e.status_code}")
            return f"AuthenticationError {e.status_code}, code {e.code}"
        raise CheckFailed("a bad token was accepted")

    def openai_unknown_model(self) -> str:
        try:
            self.openai_client().chat.completions.create(
                model=UNKNOWN_MODEL, messages=[{"role": "user", "content": PROMPT}]
            )
        except openai.BadRequestError as e:
            expect(e.status_code == 400, f"status {e.status_code}")
            body = error_text(e)
            expect("model_unknown" in body, f"no model_unknown in {body}")
            expect(e.code == "model_unknown", f"e.code is {e.code!r}")
            return f"BadRequestError {e.status_code}, code {e.code}"
        raise CheckFailed("an unknown model was accepted")

    def openai_unknown_model_stream(self) -> str:
        try:
            stream = self.openai_client().chat.completions.create(
                model=UNKNOWN_MODEL, messages=[{"role": "user", "content": PROMPT}], stream=True
            )
            for _ in stream:
                pass
        except openai.BadRequestError as e:
            expect(e.status_code == 400, f"status {e.status_code}")
            expect("model_unknown" in error_text(e), f"no model_unknown in {error_text(e)}")
            return f"BadRequestError {e.status_code} before the stream starts"
        raise CheckFailed("an unknown model was accepted")

    # ---- Anthropic ---------------------------------------------------------------------------

    def anthropic_client(self, token: str | None = None) -> anthropic.Anthropic:
        # The SDK appends /v1/messages itself.
        return anthropic.Anthropic(base_url=self.gateway, api_key=token or self.token)

    def anthropic_message(self) -> str:
        self.upstream["anthropic"] += 1
        m = self.anthropic_client().messages.create(
            model=ANTHROPIC_MODEL, max_tokens=50, messages=[{"role": "user", "content": PROMPT}]
        )
        expect(m.type == "message" and m.role == "assistant", f"{m.type}/{m.role}")
        texts = [b.text for b in m.content if b.type == "text"]
        expect(bool(texts) and bool(texts[0]), f"no text: {m.content!r}")
        expect(m.stop_reason is not None, "no stop_reason")
        u = m.usage
        expect(u.input_tokens > 0 and u.output_tokens > 0, f"usage {u!r}")
        return f"{len(texts[0])} chars, usage {u.input_tokens}+{u.output_tokens}"

    def anthropic_stream_helper(self) -> str:
        self.upstream["anthropic"] += 1
        with self.anthropic_client().messages.stream(
            model=ANTHROPIC_MODEL, max_tokens=50, messages=[{"role": "user", "content": PROMPT}]
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        expect(bool(text), "no text from text_stream")
        final_text = "".join(b.text for b in final.content if b.type == "text")
        expect(final_text == text, f"final message {final_text!r} != streamed {text!r}")
        expect(final.stop_reason is not None, "no stop_reason")
        u = final.usage
        expect(u.input_tokens > 0 and u.output_tokens > 0, f"usage {u!r}")
        return f"{len(text)} chars, usage {u.input_tokens}+{u.output_tokens}"

    def anthropic_raw_stream(self) -> str:
        self.upstream["anthropic"] += 1
        stream = self.anthropic_client().messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=50,
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
        )
        types = [e.type for e in stream]
        expect(types[:1] == ["message_start"], f"events {types}")
        expect(types[-1:] == ["message_stop"], f"events {types}")
        expect("content_block_delta" in types and "message_delta" in types, f"events {types}")
        return f"{len(types)} events"

    def anthropic_bad_token(self) -> str:
        try:
            self.anthropic_client(BAD_TOKEN).messages.create(
                model=ANTHROPIC_MODEL, max_tokens=50, messages=[{"role": "user", "content": PROMPT}]
            )
        except anthropic.AuthenticationError as e:
            expect(e.status_code == 401, f"status {e.status_code}")
            return f"AuthenticationError {e.status_code}"
        raise CheckFailed("a bad token was accepted")

    def anthropic_unknown_model(self) -> str:
        try:
            self.anthropic_client().messages.create(
                model=UNKNOWN_MODEL, max_tokens=50, messages=[{"role": "user", "content": PROMPT}]
            )
        except anthropic.BadRequestError as e:
            expect(e.status_code == 400, f"status {e.status_code}")
            body = error_text(e)
            expect("model_unknown" in body, f"no model_unknown in {body}")
            return f"BadRequestError {e.status_code}, model_unknown"
        raise CheckFailed("an unknown model was accepted")

    def anthropic_unknown_model_stream(self) -> str:
        try:
            with self.anthropic_client().messages.stream(
                model=UNKNOWN_MODEL, max_tokens=50, messages=[{"role": "user", "content": PROMPT}]
            ) as stream:
                stream.get_final_message()
        except anthropic.BadRequestError as e:
            expect(e.status_code == 400, f"status {e.status_code}")
            expect("model_unknown" in error_text(e), f"no model_unknown in {error_text(e)}")
            return f"BadRequestError {e.status_code} before the stream starts"
        raise CheckFailed("an unknown model was accepted")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", required=True, help="http://host:port of the gateway")
    parser.add_argument("--token", required=True, help="a gateway API key")
    parser.add_argument(
        "--endpoint-path",
        default="",
        help="path prefix of a named endpoint, e.g. /e/my-endpoint (default: the default endpoint)",
    )
    args = parser.parse_args()
    base = args.gateway.rstrip("/") + ("/" + args.endpoint_path.strip("/") if args.endpoint_path.strip("/") else "")
    print(f"openai {openai.__version__}, anthropic {anthropic.__version__}; gateway {base}", flush=True)

    c = Checks(base, args.token)
    c.run("openai chat.completions.create", c.openai_chat)
    c.run("openai with_raw_response", c.openai_with_raw_response)
    c.run("openai stream=True", c.openai_stream)
    c.run("openai stream include_usage", c.openai_stream_usage)
    c.run("openai chat.completions.stream helper", c.openai_stream_helper)
    c.run("openai models.list", c.openai_models)
    c.run("openai bad token -> AuthenticationError", c.openai_bad_token)
    c.run("openai unknown model -> 400 model_unknown", c.openai_unknown_model)
    c.run("openai unknown model, stream -> 400 model_unknown", c.openai_unknown_model_stream)
    c.run("anthropic messages.create", c.anthropic_message)
    c.run("anthropic messages.stream", c.anthropic_stream_helper)
    c.run("anthropic messages.create stream=True", c.anthropic_raw_stream)
    c.run("anthropic bad token -> AuthenticationError", c.anthropic_bad_token)
    c.run("anthropic unknown model -> 400 model_unknown", c.anthropic_unknown_model)
    c.run("anthropic unknown model, stream -> 400 model_unknown", c.anthropic_unknown_model_stream)

    print(f"{c.passed} passed, {len(c.failures)} failed", flush=True)
    print(f"upstream-requests openai={c.upstream['openai']} anthropic={c.upstream['anthropic']}",
          flush=True)
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())

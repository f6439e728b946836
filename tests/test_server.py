"""`lengthwise serve` as a real process on 127.0.0.1, driven by the official `openai` client and by
raw HTTP: completions and chat (plain and streaming), n, stop strings, seeds, logprobs, every
error case, a client that disconnects mid-stream, overload, and SIGTERM.

The model is the trained stories260k (it writes text and really stops), copied with a chat
template added; skipped when ../shared is absent.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import stories_with_template

openai = pytest.importorskip("openai")

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260k"
KEY = "test-key"
NAME = "stories"
TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lengthwise.cli", "serve", str(model_dir), "--port", str(port),
                             "--served-model-name", NAME, "--threads", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not come up within 90 s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return stories_with_template(tmp_path_factory, TEMPLATE)


@pytest.fixture(scope="module")
def server(model_dir):
    proc, base = _start(model_dir, "--api-key", KEY, "--max-waiting", "50", "--max-num-seqs", "8")
    yield base
    _stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(model_dir):
    """The served model through the offline API, in this process: the reference for the server."""
    from lengthwise import LLM

    return LLM(model_dir, dtype="float32", device="cpu")


def _post(base: str, path: str, body: bytes | dict, key: str | None = KEY, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(json.loads(e.read()), _headers={k.lower(): v for k, v in e.headers.items()})


def _metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("lengthwise:") and "{" in line:
            name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
            out[name] = float(value)
    return out


def _post_text(base: str, path: str, body: dict, key: str | None = None) -> tuple[int, str]:
    """POST `body`; the status and the raw answer (the LoRA endpoints answer in plain text)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _adapters_added_and_removed_while_serving(base, client, offline, hf, tmp_path, prompt, params, texts) -> None:
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: an adapter added while serving is
    a model at once and generates what the offline engine does with it; a name is loaded once
    unless `load_inplace` (its new files then serve); a bad adapter is refused naming what is
    wrong and leaves nothing behind; unloading ends a name (404 after), by name or id, while a
    request already streaming with it finishes with it."""
    from conftest import save_adapter

    from lengthwise import SamplingParams
    from lengthwise.lora import LoRARequest

    story = save_adapter(tmp_path / "story", hf, seed=4, rank=4)
    other = save_adapter(tmp_path / "other", hf, seed=5, rank=8, modules=("o_proj", "down_proj"))
    assert _post_text(base, "/v1/load_lora_adapter", {"lora_name": "story", "lora_path": str(story)}) == (
        200, "Success: LoRA adapter 'story' added successfully.")
    assert client.models.retrieve("story").parent == NAME
    want = offline.generate([prompt], params, use_tqdm=False,
                            lora_request=LoRARequest("story", 9, str(story)))[0].outputs[0].text
    assert client.completions.create(model="story", prompt=prompt, max_tokens=40, temperature=0).choices[0].text == want
    assert want not in texts.values()
    status, body = _post_text(base, "/v1/load_lora_adapter", {"lora_name": "story", "lora_path": str(other)})
    assert status == 400 and json.loads(body)["error"]["param"] == "lora_name" and "already" in body
    assert _post_text(base, "/v1/load_lora_adapter", {"lora_name": "story", "lora_path": str(other),
                                                      "load_inplace": True})[0] == 200
    want = offline.generate([prompt], params, use_tqdm=False,
                            lora_request=LoRARequest("other", 10, str(other)))[0].outputs[0].text
    assert client.completions.create(model="story", prompt=prompt, max_tokens=40, temperature=0).choices[0].text == want
    bad = save_adapter(tmp_path / "bad", hf, seed=3, rank=32)  # above the default --max-lora-rank 16
    corrupt = save_adapter(tmp_path / "corrupt", hf, seed=6, rank=4) / "adapter_model.safetensors"
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    for path, needle in ((bad, "max_lora_rank"), (tmp_path / "missing", "missing"),
                         (corrupt.parent, "not a readable safetensors file")):
        status, body = _post_text(base, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(path)})
        assert status == 400 and json.loads(body)["error"]["param"] == "lora_path" and needle in body, body
    for body, param in (({"lora_name": NAME, "lora_path": str(story)}, "lora_name"),
                        ({"lora_name": " ", "lora_path": str(story)}, "lora_name"),
                        ({"lora_name": "x"}, "lora_path"), ({}, "lora_name")):
        path = "/v1/unload_lora_adapter" if body == {} else "/v1/load_lora_adapter"
        status, answer = _post_text(base, path, body)
        assert status == 400 and json.loads(answer)["error"]["param"] == param, answer
    assert {m.id for m in client.models.list().data} == {NAME, "sql", "chat", "story"}
    # Unloading "sql" while one of its requests streams: that request finishes with "sql".
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    want = offline.generate([prompt], long, use_tqdm=False,
                            lora_request=LoRARequest("sql", 1, str(tmp_path / "sql")))[0].outputs[0].text
    stream = client.completions.create(model="sql", prompt=prompt, max_tokens=200, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(c for c in stream if c.choices).choices[0].text
    assert _post_text(base, "/v1/unload_lora_adapter", {"lora_name": "sql"}) == (
        200, "Success: LoRA adapter 'sql' removed successfully.")
    assert first + "".join(c.choices[0].text for c in stream if c.choices) == want
    with pytest.raises(openai.NotFoundError, match="'sql'"):
        client.completions.create(model="sql", prompt=prompt, max_tokens=4)
    status, body = _post_text(base, "/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert status == 404 and "cannot be found" in body
    assert _post_text(base, "/v1/unload_lora_adapter", {"lora_int_id": 2})[0] == 200  # "chat", by its id
    assert {m.id for m in client.models.list().data} == {NAME, "story"}


def test_runtime_lora_updating_is_off_unless_asked_for(server):
    assert _post_text(server, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/tmp"})[0] == 401  # no key
    status, body = _post_text(server, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/tmp"}, KEY)
    assert status == 400 and "--allow-runtime-lora-updating" in body


# -- the happy paths, through the official client --------------------------------------------------

def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, err = _post(server, "/v1/nowhere", {"model": NAME})  # routing's refusals: OpenAI's body too
    assert status == 404 and err["error"]["type"] == "invalid_request_error"
    assert "/v1/nowhere" in err["error"]["message"]
    with urllib.request.urlopen(server + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}


def test_tokenize_and_detokenize_as_vllm(server, offline):
    """vLLM's /tokenize (a prompt, or messages through the chat template) and /detokenize: the ids
    the server feeds the model, and their text back; bad input is a 400 naming the field."""
    tokenizer = offline.get_tokenizer()
    status, body = _post(server, "/tokenize", {"model": NAME, "prompt": "Once upon a time"})
    ids = tokenizer.encode("Once upon a time")
    assert status == 200 and body == {"count": len(ids), "max_model_len": 512, "tokens": ids}
    _, plain = _post(server, "/tokenize", {"prompt": "Once upon a time", "add_special_tokens": False})
    assert plain["tokens"] == tokenizer.encode("Once upon a time", add_special_tokens=False) != ids
    _, strs = _post(server, "/tokenize", {"prompt": "Once upon a time", "return_token_strs": True})
    assert strs["token_strs"] == [tokenizer.id_to_token(t) for t in ids]
    _, chat = _post(server, "/tokenize", {"messages": [{"role": "user", "content": "Once upon a time"}]})
    assert chat["tokens"] == tokenizer.encode_chat([{"role": "user", "content": "Once upon a time"}])
    status, body = _post(server, "/detokenize", {"model": NAME, "tokens": ids})
    assert status == 200 and body == {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}
    for path, bad, param in (("/tokenize", {"prompt": "a", "messages": []}, "prompt"), ("/tokenize", {}, "prompt"),
                             ("/detokenize", {"tokens": [9999]}, "tokens"), ("/detokenize", {"tokens": "a"}, "tokens"),
                             ("/tokenize", {"model": "gpt-4", "prompt": "a"}, "model")):
        status, err = _post(server, path, bad)
        assert status in (400, 404) and err["error"]["param"] == param, (path, bad, err)
    assert _post(server, "/tokenize", {"prompt": "a"}, key=None)[0] == 401


def test_completion_and_its_stream_agree(client):
    kw = dict(model=NAME, prompt="Once upon a time", max_tokens=24, temperature=0)
    full = client.completions.create(**kw)
    text = full.choices[0].text
    assert text and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0 and full.usage.total_tokens == (full.usage.prompt_tokens
                                                                           + full.usage.completion_tokens)
    assert "predicted_length" in full.model_extra  # null without a length predictor
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_chat_and_its_stream_agree(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Once upon a time, there was a cat"}],
              max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_chat_extras_prefill_and_template_variables(client, server):
    """vLLM's chat extras: continue_final_message goes on from a prefilled answer (the prompt ends
    with it, no end of turn after it), chat_template_kwargs reach the template, clashes are 400s."""
    convo = [{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": " there was"}]
    kw = dict(model=NAME, max_tokens=4, temperature=0)
    go_on = client.chat.completions.create(messages=convo, **kw, extra_body={
        "continue_final_message": True, "add_generation_prompt": False, "chat_template_kwargs": {"unused": 1}})
    same = client.completions.create(prompt="Once upon a time there was", **kw)  # (the template joins contents)
    assert go_on.choices[0].message.content == same.choices[0].text
    for extra, param in (({"continue_final_message": True}, "continue_final_message"),
                         ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs")):
        status, err = _post(server, "/v1/chat/completions", {"model": NAME, "messages": convo, **extra})
        assert status == 400 and err["error"]["param"] == param, err


def test_streamed_samples_finish_once_each(client):
    """n samples of one request end at different steps (each at its first full stop); each choice
    gets exactly one chunk with a finish_reason, its last (OpenAI and vLLM do the same; clients
    count finished choices by it)."""
    for create, kw in ((client.completions.create, dict(prompt="Once upon a time")),
                       (client.chat.completions.create,
                        dict(messages=[{"role": "user", "content": "Once upon a time"}]))):
        chunks = list(create(model=NAME, max_tokens=60, temperature=1.0, seed=5, n=4, stop=["."], stream=True,
                             **kw))
        finishes: dict[int, list[int]] = {}
        for i, c in enumerate(chunks):
            for choice in c.choices:
                if choice.finish_reason is not None:
                    finishes.setdefault(choice.index, []).append(i)
        assert sorted(finishes) == [0, 1, 2, 3] and all(len(v) == 1 for v in finishes.values()), finishes
        for index, (at,) in finishes.items():  # nothing for a choice after its finish
            assert all(ch.index != index for c in chunks[at + 1:] for ch in c.choices)
        assert len({at for (at,) in finishes.values()}) > 1  # they did end at different steps


def test_n_samples_seeds_and_stop_strings(client):
    kw = dict(model=NAME, prompt="Once upon a time", max_tokens=30, temperature=1.0)
    two = client.completions.create(**kw, n=2, seed=7)
    assert sorted(c.index for c in two.choices) == [0, 1]
    again = client.completions.create(**kw, n=2, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]  # seeded: reproducible
    other = client.completions.create(**kw, n=2, seed=8)
    assert [c.text for c in other.choices] != [c.text for c in two.choices]
    greedy = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=40, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    words = greedy.split()
    stop = " " + words[len(words) // 2]
    cut = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=40, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == greedy[:greedy.index(stop)]
    assert cut.model_extra["stop_reason"] == stop  # vLLM's field: which stop string ended it
    streamed = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=40, temperature=0,
                                         stop=[stop], extra_body={"ignore_eos": True}, stream=True)
    last = [c for c in streamed if c.choices][-1].choices[0]
    assert last.finish_reason == "stop" and last.model_extra["stop_reason"] == stop


def test_logprobs(client):
    r = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert all(len(t) == 3 for t in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    # Sampled: the sampled token is always among top_logprobs (OpenAI: up to logprobs + 1 entries),
    # with logprobs=0 too (only it).
    for k in (0, 1):
        r = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=20, temperature=1.5,
                                      seed=3, logprobs=k)
        lp = r.choices[0].logprobs
        assert all(t in top and top[t] == v and len(top) <= k + 1
                   for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True)), lp
    assert any(len(top) == 2 for top in lp.top_logprobs)  # some sampled token was not the top one
    c = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Once upon a time"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)  # greedy: the top token


def test_echo_scores_the_prompt_as_evaluation_harnesses_ask(client, offline):
    """lm-evaluation-harness's loglikelihood request (token ids, echo, logprobs=1, max_tokens 0 or
    1): one logprob per prompt token, None for the first, equal to the offline prompt_logprobs;
    with max_tokens > 0 the generated part follows the prompt in text and logprobs; a stream
    sends the same text and tokens."""
    from lengthwise import SamplingParams

    llm = offline
    ids = llm.get_tokenizer().encode("Once upon a time, there was a little cat")
    ref = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0].prompt_logprobs
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice, lp = r.choices[0], r.choices[0].logprobs
    assert choice.text == llm.get_tokenizer().decode(ids, skip_special_tokens=False)
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([e.logprob for e in ref[1:]], abs=1e-5)
    assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
    assert all(t in top and len(top) <= 2 for t, top in zip(lp.tokens[1:], lp.top_logprobs[1:], strict=True))
    # max_tokens 1 (the harness's other spelling): the prompt's logprobs, then one generated token
    one = client.completions.create(model=NAME, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert one.choices[0].logprobs.token_logprobs[:-1] == lp.token_logprobs
    assert len(one.choices[0].logprobs.tokens) == len(ids) + 1 == len(ids) + one.usage.completion_tokens

    prompt = "Once upon a time"
    kw = dict(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    plain = client.completions.create(**kw).choices[0]
    echoed = client.completions.create(**kw, echo=True).choices[0]
    assert echoed.text == prompt + plain.text
    n = len(llm.get_tokenizer().encode(prompt))
    assert echoed.logprobs.tokens[n:] == plain.logprobs.tokens
    assert echoed.logprobs.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert echoed.logprobs.text_offset[n] == len(prompt)  # the generated text starts after the prompt's
    for token, offset in zip(echoed.logprobs.tokens[2:], echoed.logprobs.text_offset[2:], strict=True):
        assert echoed.text[offset:offset + len(token)] == token  # (past the BOS and the dummy-prefix space)
    assert echoed.logprobs.text_offset == sorted(echoed.logprobs.text_offset)
    chunks = [c.choices[0] for c in client.completions.create(**kw, echo=True, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == echoed.text
    assert [t for c in chunks for t in c.logprobs.tokens] == echoed.logprobs.tokens
    assert [o for c in chunks for o in c.logprobs.text_offset] == echoed.logprobs.text_offset
    only = [c.choices[0] for c in client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True,
                                                            stream=True) if c.choices]
    assert [(c.text, c.finish_reason) for c in only] == [(prompt, "length")]


def test_echo_of_a_prompt_never_scored_still_lists_its_tokens(offline):
    """A request ended (server shutdown) before its prompt was scored: echo lists every prompt
    token with a null logprob, at offsets into the echoed text."""
    from lengthwise.server.api_server import Echo

    tokenizer = offline.get_tokenizer()
    text = "Once upon a time"
    ids = tokenizer.encode(text)
    lp, start = Echo(text, ids, only=False).logprobs(tokenizer, [None] * len(ids))
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"] == [None] * len(ids) and start == len(text)
    assert all(text[o:o + len(t)] == t for t, o in zip(lp["tokens"][2:], lp["text_offset"][2:], strict=True))


def test_logit_bias_bans_and_forces_tokens(client, offline):
    """OpenAI's logit_bias: -100 on the greedy first token bans it; +100 on one token forces it at
    every step (its logprob stays the model's own, as vLLM reports it)."""
    from lengthwise import SamplingParams

    prompt = "Once upon a time"
    greedy = offline.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0]
    kw = dict(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    assert client.completions.create(**kw).choices[0].text == greedy.text
    banned = client.completions.create(**kw, logit_bias={str(greedy.token_ids[0]): -100}).choices[0]
    tokenizer = offline.get_tokenizer()
    assert banned.text and not banned.text.startswith(tokenizer.decode(greedy.token_ids[:1]))
    forced = client.completions.create(**kw, logit_bias={"100": 100}).choices[0]
    assert forced.text == tokenizer.decode([100] * 8)
    assert all(lp < 0 for lp in forced.logprobs.token_logprobs)  # the model's own, not the biased


def test_structured_outputs_hold_answers_to_json_and_choices(client):
    """OpenAI's response_format (json_object, json_schema) and vLLM's structured_outputs /
    guided_choice: stories260k writes stories, yet every answer that ends is what was asked for,
    streamed or not."""
    schema = {"type": "object", "properties": {"hero": {"type": "string", "maxLength": 10},
                                                "happy": {"type": "boolean"}}, "required": ["hero", "happy"]}
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=60, n=3, seed=4)
    fmt = {"type": "json_schema", "json_schema": {"name": "story", "schema": schema, "strict": True}}
    r = client.chat.completions.create(**kw, response_format=fmt)
    done = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert done and all(set(json.loads(t)) == {"hero", "happy"} and len(json.loads(t)["hero"]) <= 10 for t in done)
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(**kw, response_format=fmt, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[i] for i in range(3)] == [c.message.content for c in r.choices]  # same seed, same answers
    obj = client.chat.completions.create(**kw, response_format={"type": "json_object"})
    assert all(isinstance(json.loads(c.message.content), dict) for c in obj.choices if c.finish_reason == "stop")
    choice = client.completions.create(model=NAME, prompt="Lily was", max_tokens=8, n=4, temperature=1.0,
                                       extra_body={"guided_choice": ["happy", "sad"]})
    assert {c.text for c in choice.choices} <= {"happy", "sad"}
    same = client.completions.create(model=NAME, prompt="Lily was", max_tokens=8, n=4, temperature=1.0,
                                     extra_body={"structured_outputs": {"choice": ["happy", "sad"]}})
    assert {c.text for c in same.choices} <= {"happy", "sad"}
    for extra in ({"guided_regex": r"[A-Z][a-z]{2,8} (is|was) \d{1,2}\."},
                  {"structured_outputs": {"regex": r"[A-Z][a-z]{2,8} (is|was) \d{1,2}\."}}):
        regex = client.completions.create(model=NAME, prompt="Lily was", max_tokens=20, n=3, temperature=1.0,
                                          seed=2, extra_body=extra)
        assert all(re.fullmatch(r"[A-Z][a-z]{2,8} (is|was) \d{1,2}\.", c.text) and c.finish_reason == "stop"
                   for c in regex.choices), [c.text for c in regex.choices]


def test_beam_search_answers_are_the_choices_best_first(client, offline):
    """vLLM's `use_beam_search`: `n` beams; the choices are the offline `LLM.beam_search`'s answers
    in its order, streamed or not, on completions and chat."""
    from lengthwise import BeamSearchParams

    prompt = "Once upon a time"
    want = offline.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=24, length_penalty=0.5))[0]
    kw = dict(model=NAME, prompt=prompt, max_tokens=24, n=3, extra_body={"use_beam_search": True,
                                                                          "length_penalty": 0.5})
    r = client.completions.create(**kw)
    assert [c.text for c in r.choices] == [s.text for s in want.sequences]
    assert [c.index for c in r.choices] == [0, 1, 2] and {c.finish_reason for c in r.choices} == {"length"}
    assert r.usage.completion_tokens == 3 * 24
    streamed = ["", "", ""]
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [s.text for s in want.sequences]
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Lily saw a bird"}],
                                          max_tokens=300, n=2, extra_body={"use_beam_search": True})
    ids = offline.get_tokenizer().encode_chat([{"role": "user", "content": "Lily saw a bird"}], True)
    answers = offline.beam_search([{"prompt_token_ids": ids}], BeamSearchParams(beam_width=2, max_tokens=300))[0]
    assert [c.message.content for c in chat.choices] == [s.text for s in answers.sequences]
    assert [c.finish_reason for c in chat.choices] == [s.finish_reason for s in answers.sequences]


def test_embeddings_as_openai_serves_them(client, server, offline):
    """`/v1/embeddings`: the offline `LLM.embed`'s vectors, as floats or base64 (the official
    client's default), for texts, token ids and (vLLM's) chat messages; usage counts the prompt
    tokens; the metrics count the prompts but no first token."""
    import numpy as np

    from lengthwise import PoolingParams

    texts = ["Once upon a time", "Lily saw a big red ball in the park."]
    want = offline.embed(texts, use_tqdm=False)
    before = _metrics(server)
    r = client.embeddings.create(model=NAME, input=texts, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1] and r.model == NAME and r.object == "list"
    for d, w in zip(r.data, want, strict=True):
        np.testing.assert_allclose(d.embedding, w.outputs.embedding, atol=1e-5)
    used = sum(len(w.prompt_token_ids) for w in want)
    assert r.usage.prompt_tokens == r.usage.total_tokens == used
    after = _metrics(server)
    assert after["lengthwise:prompt_tokens_total"] - before.get("lengthwise:prompt_tokens_total", 0) == used
    ttft = "lengthwise:time_to_first_token_seconds_count"
    assert after.get(ttft, 0) == before.get(ttft, 0)
    default = client.embeddings.create(model=NAME, input=texts[1])  # sent as base64, decoded by the client
    np.testing.assert_allclose(default.data[0].embedding, want[1].outputs.embedding, atol=1e-5)
    status, raw = _post(server, "/v1/embeddings", {"model": NAME, "input": texts[0], "encoding_format": "base64"})
    assert status == 200
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, want[0].outputs.embedding, atol=1e-5)
    ids = [w.prompt_token_ids for w in want]
    for given in (ids, ids[0]):
        r = client.embeddings.create(model=NAME, input=given, encoding_format="float")
        for d, w in zip(r.data, want, strict=False):
            np.testing.assert_allclose(d.embedding, w.outputs.embedding, atol=1e-5)
    # vLLM's extras: chat messages, truncation, no normalization.
    messages = [{"role": "user", "content": "Lily saw a bird"}]
    status, r = _post(server, "/v1/embeddings", {"model": NAME, "messages": messages,
                                                 "truncate_prompt_tokens": 3, "normalize": False})
    assert status == 200, r
    chat_ids = offline.get_tokenizer().encode_chat(messages, add_generation_prompt=False)
    ref = offline.embed([{"prompt_token_ids": chat_ids[-3:]}], PoolingParams(normalize=False), use_tqdm=False)[0]
    assert r["usage"]["prompt_tokens"] == 3
    np.testing.assert_allclose(r["data"][0]["embedding"], ref.outputs.embedding, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("body, param", [
    ({"model": NAME}, "input"),
    ({"model": NAME, "input": []}, "input"),
    ({"model": NAME, "input": [99999]}, "input"),
    ({"model": NAME, "input": ["hi", [5, 6]]}, "input"),
    ({"model": NAME, "input": "hi", "messages": [{"role": "user", "content": "hi"}]}, "input"),
    ({"model": NAME, "messages": []}, "messages"),
    ({"model": NAME, "input": "hi", "encoding_format": "binary"}, "encoding_format"),
    ({"model": NAME, "input": "hi", "dimensions": 8}, "dimensions"),  # not a matryoshka model
    ({"model": NAME, "input": "hi", "dimensions": 0}, "dimensions"),
    ({"model": NAME, "input": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"model": NAME, "input": "hi", "truncate_prompt_tokens": 600}, "truncate_prompt_tokens"),
    ({"model": NAME, "input": [5] * 513}, "input"),  # beyond the 512-token context
    ({"model": NAME, "input": "hi", "temperature": 0.5}, "temperature"),
    ({"model": NAME, "input": "hi", "priority": 1}, "priority"),  # this server's fcfs would ignore it
    ({"model": NAME, "input": ["hi"] * 51}, "input"),  # more than --max-waiting 50 could ever queue
])
def test_bad_embedding_requests_get_400_naming_the_parameter(server, body, param):
    status, err = _post(server, "/v1/embeddings", body)
    assert status == 400, err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param, err


def test_embeddings_of_an_unknown_model_are_404(server):
    status, err = _post(server, "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"})
    assert status == 404 and err["error"]["code"] == "model_not_found"


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    ({"model": NAME, "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "top_p": 2}, "top_p"),
    ({"model": NAME, "prompt": "hi", "n": 0}, "n"),
    ({"model": NAME, "prompt": "hi", "n": 9}, "n"),  # more samples than --max-num-seqs 8 can run together
    ({"model": NAME, "prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 600}, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 0}, "max_tokens"),  # nothing to do without echo
    ({"model": NAME, "prompt": "hi", "logit_bias": {"a": 1}}, "logit_bias"),
    ({"model": NAME, "prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": NAME, "prompt": "hi", "logit_bias": {"600": 1}}, "logit_bias"),  # beyond the 512-token vocabulary
    ({"model": NAME, "prompt": "hi", "stop_token_ids": [600]}, "stop_token_ids"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"model": NAME, "prompt": "hi", "colour": "blue"}, "colour"),
    ({"model": NAME}, "prompt"),
    ({"model": NAME, "prompt": [99999]}, "prompt"),
    ({"model": NAME, "prompt": "hi", "guided_json": {"type": "integer", "minimum": 1}}, "guided_json"),
    ({"model": NAME, "prompt": "hi", "guided_json": {"type": "string", "pattern": "(a)\\1"}}, "guided_json"),
    ({"model": NAME, "prompt": "hi", "guided_regex": "a(?=b)"}, "guided_regex"),
    ({"model": NAME, "prompt": "hi", "guided_grammar": "root ::= x"}, "guided_grammar"),
    ({"model": NAME, "prompt": "hi", "guided_choice": []}, "guided_choice"),
    ({"model": NAME, "prompt": "hi", "structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs"),
    ({"model": NAME, "prompt": "hi", "guided_choice": ["a"], "response_format": {"type": "json_object"}},
     "guided_choice"),
    ({"model": NAME, "prompt": ["hi"] * 51}, "prompt"),  # more prompts than --max-waiting 50 could ever queue
    ({"model": NAME, "prompt": "hi", "priority": 1}, "priority"),  # this server's fcfs would ignore it
    ({"model": NAME, "prompt": "hi", "priority": "high"}, "priority"),
    ({"model": NAME, "prompt": "hi", "priority": True}, "priority"),  # strict: not read as 1
    ({"model": NAME, "prompt": "hi", "use_beam_search": True, "top_p": 0.5}, "top_p"),  # the search picks tokens
    ({"model": NAME, "prompt": "hi", "use_beam_search": True, "temperature": 0.7}, "temperature"),
    ({"model": NAME, "prompt": "hi", "use_beam_search": True, "echo": True}, "echo"),
    ({"model": NAME, "prompt": "hi", "use_beam_search": True, "n": 9}, "n"),  # beyond --max-num-seqs 8
    ({"model": NAME, "prompt": "hi", "use_beam_search": True, "early_stopping": "sometimes"}, "early_stopping"),
    ({"model": NAME, "prompt": "hi", "length_penalty": 2.0}, "length_penalty"),  # not a beam search: unused
    ({"model": NAME, "prompt": "hi", "use_beam_search": True, "logprobs": 0}, "logprobs"),  # 0 is not unset
    ({"model": NAME, "prompt": "hi", "use_beam_search": True, "guided_grammar": "root ::= x"}, "guided_grammar"),
    ({"model": NAME, "prompt": "hi", "use_beam_search": True, "skip_special_tokens": False}, "skip_special_tokens"),
    ({"model": NAME, "prompt": "hi", "use_beam_search": True, "max_tokens": 0}, "max_tokens"),
])
def test_bad_completion_requests_get_400_naming_the_parameter(server, body, param):
    status, err = _post(server, "/v1/completions", body)
    assert status == 400, err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
    assert err["error"]["param"] == param


def test_an_unknown_model_is_404_model_not_found(server, client):
    """As OpenAI and vLLM answer: the official client raises NotFoundError."""
    for path, body in (("/v1/completions", {"model": "gpt-4", "prompt": "hi"}),
                       ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})):
        status, err = _post(server, path, body)
        assert status == 404 and err["error"]["code"] == "model_not_found" and err["error"]["param"] == "model", err
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", max_tokens=2)


@pytest.mark.parametrize("body, param", [
    ({"model": NAME, "messages": []}, "messages"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": NAME, "messages": [{"role": "system", "content": "be brief"}, {"role": "user"}]}, "messages.1.content"),
    ({"model": NAME, "messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9999},
     "max_completion_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}},
     "response_format"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer",
                                                                                      "minimum": 1}}}},
     "response_format"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4, "max_tokens": 5},
     "max_completion_tokens"),
])
def test_bad_chat_requests_get_400_naming_the_parameter(server, body, param):
    status, err = _post(server, "/v1/chat/completions", body)
    assert status == 400 and err["error"]["param"] == param, err


def test_max_tokens_and_max_completion_tokens_together_when_they_agree(server):
    """Some clients send the deprecated alias beside the new name; one value is no ambiguity."""
    body = {"model": NAME, "messages": [{"role": "user", "content": "Once"}], "max_completion_tokens": 3,
            "max_tokens": 3, "ignore_eos": True}
    status, r = _post(server, "/v1/chat/completions", body)
    assert status == 200 and r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"


def test_api_key_is_required(server):
    for key in (None, "wrong"):
        status, err = _post(server, "/v1/completions", {"model": NAME, "prompt": "hi"}, key=key)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"


# -- faults and overload ---------------------------------------------------------------------------

def test_a_disconnect_mid_stream_aborts_and_frees_the_blocks(server):
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json",
                                                               "Authorization": f"Bearer {KEY}"})
    before = _metrics(server).get("lengthwise:generation_tokens_total", 0.0)
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")  # streaming has begun
    seen_running = _metrics(server)["lengthwise:num_requests_running"]
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = _metrics(server)
        if m["lengthwise:num_requests_running"] == 0 and m["lengthwise:kv_cache_blocks_used"] == 0:
            break
        time.sleep(0.1)
    assert seen_running >= 1
    assert m["lengthwise:num_requests_running"] == 0 and m["lengthwise:kv_cache_blocks_used"] == 0, m
    # It was aborted, not run to its 400 tokens: far fewer tokens generated than that.
    assert m["lengthwise:generation_tokens_total"] - before < 400


def test_overload_rejects_with_retry_after_and_loses_nothing(server):
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True}
    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(lambda _: _post(server, "/v1/completions", body, timeout=120), range(200)))
    ok = [r for s, r in results if s == 200]
    refused = [(s, r) for s, r in results if s in (429, 503)]
    assert len(ok) + len(refused) == 200, [s for s, _ in results]
    assert ok and refused
    assert all(r["usage"]["completion_tokens"] == 16 and r["choices"][0]["finish_reason"] == "length" for r in ok)
    assert all(r["_headers"].get("retry-after") for _, r in refused)
    m = _metrics(server)
    assert m["lengthwise:num_requests_waiting"] == 0 and m["lengthwise:num_requests_running"] == 0


def test_generation_config_caps_the_default_chat_length(model_dir, tmp_path):
    """As vLLM: without max_tokens a chat may use the rest of the context, but no more than the
    checkpoint's max_new_tokens (and its repetition_penalty is the default too)."""
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    path = d / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**gen, "max_new_tokens": 5}))
    proc, base = _start(d)
    try:
        body = {"model": NAME, "messages": [{"role": "user", "content": "Once upon a time"}], "ignore_eos": True}
        status, r = _post(base, "/v1/chat/completions", body, None)
        assert status == 200 and r["usage"]["completion_tokens"] == 5, r
    finally:
        _stop(proc)


def test_a_priority_server_takes_priorities_and_a_busy_one_serves_the_urgent_first(model_dir, offline):
    """`--scheduling-policy priority` (vLLM's flag): `priority` is accepted on both endpoints and
    changes no text; with one sequence slot, an urgent request sent while a long one runs
    finishes first (it preempts it)."""
    import concurrent.futures

    from lengthwise import SamplingParams

    proc, base = _start(model_dir, "--scheduling-policy", "priority", "--max-num-seqs", "1")
    try:
        prompt = "Once upon a time"
        want = offline.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0]
        body = {"model": NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0, "priority": -5}
        status, r = _post(base, "/v1/completions", body, None)
        assert status == 200 and r["choices"][0]["text"] == want.outputs[0].text, r
        chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "priority": 7}
        assert _post(base, "/v1/chat/completions", chat, None)[0] == 200
        done: list[str] = []

        def send(name: str, priority: int, max_tokens: int) -> None:
            b = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "priority": priority}
            assert _post(base, "/v1/completions", b, None)[0] == 200
            done.append(name)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            slow = pool.submit(send, "long", 1, 480)
            for _ in range(500):  # until the long one is running
                if _metrics(base).get("lengthwise:num_requests_running", 0) >= 1:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the long request never started")
            fast = pool.submit(send, "urgent", 0, 2)
            fast.result(timeout=60)
            slow.result(timeout=120)
        assert done == ["urgent", "long"]
        assert _metrics(base)["lengthwise:num_preemptions_total"] >= 1
    finally:
        _stop(proc)


def test_speculative_decoding_serves_plain_decodings_text_and_counts_its_drafts(model_dir, offline):
    """`--speculative-config` as vLLM takes it: greedy completions (streamed too) are the offline
    engine's plain decoding, and /metrics counts drafted and kept tokens."""
    from lengthwise import SamplingParams

    proc, base = _start(model_dir, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4,'
                                                                ' "adaptive": false}')
    try:  # (fixed draft lengths: counters that do not depend on this host's step times)
        prompt = "Once upon a time, there was a little girl named Lily."
        want = offline.generate([prompt], SamplingParams(temperature=0.0, max_tokens=80), use_tqdm=False)[0]
        body = {"model": NAME, "prompt": prompt, "max_tokens": 80, "temperature": 0}
        status, r = _post(base, "/v1/completions", body, None)
        assert status == 200 and r["choices"][0]["text"] == want.outputs[0].text
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=80, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == want.outputs[0].text
        m = _metrics(base)
        assert 0 < m["lengthwise:spec_decode_num_accepted_tokens_total"] < m[
            "lengthwise:spec_decode_num_draft_tokens_total"]
    finally:
        _stop(proc)
    eagle = '{"method": "eagle", "num_speculative_tokens": 2}'
    bad = subprocess.run([sys.executable, "-m", "lengthwise.cli", "serve", str(model_dir), "--port",
                          str(_free_port()), "--speculative-config", eagle],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "speculative_config.method" in bad.stderr and "Traceback" not in bad.stderr


def test_the_oracle_predictor_is_refused_at_start_up(model_dir):
    """Real traffic carries no true lengths: serving with the oracle must fail before it listens,
    not stop the engine at its first request."""
    proc = subprocess.run([sys.executable, "-m", "lengthwise.cli", "serve", str(model_dir), "--port",
                           str(_free_port()), "--threads", "1", "--length-predictor", "oracle"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "oracle" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _sigterm_while_posting(proc: subprocess.Popen, base: str, body: dict, running: int) -> tuple[int, dict]:
    """POST `body`, send SIGTERM once `running` requests run, and return the POST's answer."""
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, base, "/v1/completions", body, None)
        deadline = time.monotonic() + 20
        while _metrics(base).get("lengthwise:num_requests_running", 0) < running and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        return pending.result(60)


def test_sigterm_drains_in_flight_requests_and_exits_0(model_dir):
    """Also serves with a length predictor (`self`: the model asked for its own length), whose
    estimate every response carries and /metrics compares with the real length."""
    proc, base = _start(model_dir, "--grace-period", "30", "--length-predictor", "self")
    status, r = _post(base, "/v1/completions", {"model": NAME, "prompt": "Once upon a time", "max_tokens": 8}, None)
    assert status == 200 and isinstance(r["predicted_length"], (int, float)) and r["predicted_length"] > 0
    assert _metrics(base)["lengthwise:predicted_minus_actual_length_tokens_count"] == 1
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True}
    status, r = _sigterm_while_posting(proc, base, body, running=1)
    assert status == 200 and r["usage"]["completion_tokens"] == 300  # finished, not cut off
    assert r["predicted_length"] > 0
    assert proc.wait(60) == 0


def test_sigterm_past_the_grace_period_ends_open_responses_with_abort(model_dir):
    """At the grace's end (here at once) the unfinished requests are aborted, and each response
    still ends as the API says: a 200 whose finish_reason is "abort", a stream's last chunk and
    `data: [DONE]`; not a cut connection or a 500."""
    proc, base = _start(model_dir, "--grace-period", "0")
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 450, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(dict(body, stream=True)),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")  # streaming has begun
    status, r = _sigterm_while_posting(proc, base, body, running=2)  # the stream and this request
    events = [line for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and r["choices"][0]["finish_reason"] == "abort", r
    assert 0 < r["usage"]["completion_tokens"] < 450
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "abort", last
    assert proc.wait(60) == 0


# -- the load generator ----------------------------------------------------------------------------

def test_bench_serve_measures_every_request_against_the_server(server, tmp_path):
    from lengthwise.cli import main

    lengths = [5, 12, 3, 20, 8, 15, 6, 10, 4, 9, 11, 7]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "prompt": f"Once upon a time {i}", "lengths": {"t0.0": n}})
                            + "\n" for i, n in enumerate(lengths)))
    out, js = tmp_path / "out", tmp_path / "serve.json"
    common = ["bench", "serve", "--base-url", server, "--api-key", KEY, "--data", str(data), "--quiet",
              "--num-requests", "12", "--request-rate", "40", "--max-concurrency", "4", "--out-dir", str(out)]
    assert main([*common, "--goodput", "ttft:60000", "e2el:60000", "--json", str(js)]) == 0
    s = json.loads(js.read_text())
    assert s["completed"] == len(lengths) and s["failed"] == 0 and s["model"] == NAME
    assert [r["output_tokens"] for r in s["requests"]] == lengths  # ignore_eos: every recorded length
    assert s["output_throughput"] == pytest.approx(sum(lengths) / s["duration_s"])
    assert 0 < s["mean_ttft_ms"] <= s["mean_e2el_ms"] and s["mean_tpot_ms"] > 0 and s["p99_itl_ms"] > 0
    assert s["request_goodput"] == pytest.approx(s["request_throughput"])  # generous SLOs: every request
    assert (out / "serve.png").stat().st_size > 0 and "TTFT" in (out / "serve.md").read_text()
    assert main([*common, "--goodput", "ttft:0.001", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["request_goodput"] == 0  # nobody's first token within 1 us
    assert main([*common, "--goodput", "speed:5"]) == 2  # an unknown SLO: a clear error, not a silent skip


@pytest.mark.parametrize("kv, shown", [("auto", "float32"), ("fp8", "float8_e4m3fn")])
def test_metrics_describe_the_kv_cache(model_dir, kv, shown):
    """`lengthwise:cache_config_info` (vLLM's cache_config_info) labels the cache the engine really
    holds: `--kv-cache-dtype fp8` shows as float8_e4m3fn."""
    from lengthwise.cli import build_parser
    from lengthwise.server.cli import build_state

    state = build_state(build_parser().parse_args(["serve", str(model_dir), "--threads", "1", "--kv-cache-memory",
                                                   "4MiB", "--kv-cache-dtype", kv, "--served-model-name", "s"]))
    engine = state.engine.engine
    lines = [ln for ln in state.metrics.render().decode().splitlines()
             if ln.startswith("lengthwise:cache_config_info{")]
    assert len(lines) == 1 and lines[0].endswith(" 1.0"), lines
    labels = dict(item.split("=") for item in lines[0].split("{", 1)[1].split("}", 1)[0].split(","))
    assert labels == {"model_name": '"s"', "cache_dtype": f'"{shown}"', "block_size": f'"{engine.config.block_size}"',
                      "num_blocks": f'"{engine.num_blocks}"',
                      "num_tokens": f'"{engine.num_blocks * engine.config.block_size}"'}


def test_metrics_name_the_adapters_running_and_waiting(model_dir, tmp_path):
    """`lengthwise:lora_requests_info` (vLLM's lora_requests_info): with max_loras=1 and requests
    of two adapters, one adapter's requests run while the other's wait, and the gauge's labels say
    which; one label set at a time, the current one."""
    import transformers
    from conftest import save_adapter

    from lengthwise import SamplingParams
    from lengthwise.config import EngineConfig
    from lengthwise.engine.llm_engine import LLMEngine
    from lengthwise.lora import LoRARequest
    from lengthwise.server.metrics import ServerMetrics

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    a, b = save_adapter(tmp_path / "a", hf, seed=1), save_adapter(tmp_path / "b", hf, seed=2)
    engine = LLMEngine.from_dir(model_dir, EngineConfig(dtype="float32", device="cpu", enable_lora=True, max_loras=1))
    metrics = ServerMetrics("s")
    metrics.describe_loras(1)

    def labels() -> dict[str, str]:
        lines = [ln for ln in metrics.render().decode().splitlines() if ln.startswith("lengthwise:lora_requests_info{")]
        assert len(lines) == 1, lines
        return dict(item.split("=", 1) for item in lines[0].split("{", 1)[1].split("}", 1)[0].split(","))

    assert labels() == {"model_name": '"s"', "max_lora": '"1"', "waiting_lora_adapters": '""',
                        "running_lora_adapters": '""'}
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for lora in (LoRARequest("a", 1, str(a)), LoRARequest("b", 2, str(b)), None):
        engine.add_request("Once upon a time", params, lora_request=lora)
    seen = []
    while engine.has_unfinished_requests():
        engine.step()
        metrics.on_step(engine, 0.0)
        seen.append((labels()["running_lora_adapters"], labels()["waiting_lora_adapters"]))
    assert seen[0] == ('"a"', '"b"') and ('"b"', '""') in seen and seen[-1] == ('""', '""')


def test_lora_modules_are_served_as_models(model_dir, tmp_path):
    """`--lora-modules` as vLLM takes it: each adapter is a model of /v1/models (its parent the base
    model), a request naming it generates what the offline engine generates with that adapter,
    streamed too, and a bad adapter stops the start-up naming it."""
    import transformers
    from conftest import save_adapter

    from lengthwise import LLM, SamplingParams
    from lengthwise.lora import LoRARequest

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    sql = save_adapter(tmp_path / "sql", hf, seed=1)
    chat = save_adapter(tmp_path / "chat", hf, seed=2, rank=8, modules=("q_proj", "v_proj"))
    proc, base = _start(model_dir, "--lora-modules", f"sql={sql}", json.dumps({"name": "chat", "path": str(chat)}),
                        "--max-loras", "2", "--allow-runtime-lora-updating")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        cards = {m.id: m for m in client.models.list().data}
        assert set(cards) == {NAME, "sql", "chat"}
        assert cards["sql"].parent == NAME and cards["sql"].root == str(sql) and cards[NAME].parent is None
        assert client.models.retrieve("chat").parent == NAME
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            assert re.search(r'lengthwise:lora_requests_info\{[^}]*max_lora="2"', r.read().decode())
        offline = LLM(model_dir, dtype="float32", device="cpu", enable_lora=True, max_loras=2)
        prompt = "Once upon a time, there was a little girl named Lily."
        params = SamplingParams(temperature=0.0, max_tokens=40)
        texts = {}
        for name, lora in ((NAME, None), ("sql", LoRARequest("sql", 1, str(sql))),
                           ("chat", LoRARequest("chat", 2, str(chat)))):
            want = offline.generate([prompt], params, use_tqdm=False, lora_request=lora)[0].outputs[0].text
            r = client.completions.create(model=name, prompt=prompt, max_tokens=40, temperature=0)
            assert r.model == name and r.choices[0].text == want
            stream = client.completions.create(model=name, prompt=prompt, max_tokens=40, temperature=0, stream=True)
            assert "".join(c.choices[0].text for c in stream if c.choices) == want
            texts[name] = want
        assert len(set(texts.values())) == 3  # each adapter really changes the text
        with pytest.raises(openai.NotFoundError, match="'sql'"):
            client.completions.create(model="sqll", prompt=prompt, max_tokens=4)
        _adapters_added_and_removed_while_serving(base, client, offline, hf, tmp_path, prompt, params, texts)
    finally:
        _stop(proc)
    bad = tmp_path / "bad"  # rank 32: above the default --max-lora-rank 16
    out = subprocess.run([sys.executable, "-m", "lengthwise.cli", "serve", str(model_dir), "--port",
                          str(_free_port()), "--lora-modules", f"bad={bad}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "max_lora_rank" in out.stderr and "Traceback" not in out.stderr

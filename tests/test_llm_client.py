"""The OpenAI-compatible client, editor and judge against a stub chat server on 127.0.0.1 (no other network)."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from firempo_kernels.integrations.data import build_pairs as bp
from firempo_kernels.integrations.data.editors import EDIT_PROMPT, TAG_PROMPT, OpenAIEditor, load_editor
from firempo_kernels.integrations.data.records import QARecord, load_preference_records
from firempo_kernels.integrations.llm_client import JUDGE_PROMPT, AnswerJudge, ChatClient, LLMError


class Stub:
    """A chat server whose replies come from ``answer(prompt) -> (status, text, headers)``; it logs requests."""

    def __init__(self, answer):
        self.answer = answer
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                status, text, headers = stub.answer(body["messages"][-1]["content"])
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}
                                  if status == 200 else {"error": text}).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def make(answer):
        servers.append(Stub(answer))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test")
    return "TEST_LLM_KEY"


SIDE = QARecord(id="s1", image="x.png", question="Is the lesion in the left or the right lung?",
                ground_truth="The lesion is in the left lung.", answer_type="closed", candidates=("left", "right"))


def paper_server(prompt):
    """Judges 'right lung' wrong and corrects it; tags like the paper's second call."""
    if prompt.startswith("You check"):
        return 200, ('Sure. {"answer_sentence": "The lesion is in the right lung.", "final_answer": "right", '
                     '"is_correct": false, "opposite_answer": "The lesion is in the left lung."}'), {}
    if prompt.startswith("Two sentences"):
        a, b = (s.strip() for s in prompt.split("Sentence ")[1:3])
        a, b = a.split(": ", 1)[1].split("\n")[0], b.split(": ", 1)[1].split("\n")[0]
        # wider than the word-level diff's tags, so the test sees whose tags the pair has
        tag = lambda t: t.replace("right lung", "<mask>right lung</mask>").replace("left lung", "<mask>left lung</mask>")  # noqa: E731
        return 200, "```json\n" + json.dumps({"a": tag(a), "b": tag(b)}) + "\n```", {}
    return 400, "unexpected prompt", {}


def test_editor_two_step_prompts_tagged_pair_and_cache(stub, key, tmp_path):
    server = stub(paper_server)
    answer = "There is a nodule. The lesion is in the right lung."
    client = ChatClient("gpt-4o-mini", base_url=server.url, api_key_env=key, cache_dir=tmp_path / "cache")
    pairs, stats = bp.make_pairs([SIDE], [answer], OpenAIEditor(client))
    assert (stats.wrong, stats.right) == (1, 0)
    assert pairs[0].chosen == "There is a nodule. The lesion is in the <mask>left lung</mask>."
    assert pairs[0].rejected == "There is a nodule. The lesion is in the <mask>right lung</mask>."
    first, second = server.requests
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["model"] == "gpt-4o-mini" and first["temperature"] == 0.0
    assert first["messages"] == [{"role": "user", "content": EDIT_PROMPT.format(
        question=SIDE.question, ground_truth=SIDE.ground_truth, answer=answer)}]
    assert second["messages"][0]["content"] == TAG_PROMPT.format(
        first=answer, second="There is a nodule. The lesion is in the left lung.")
    # a second run, a new client on the same cache: the same pairs, no request
    again = ChatClient("gpt-4o-mini", base_url=server.url, api_key_env=key, cache_dir=tmp_path / "cache",
                       max_requests=0)
    pairs2, _ = bp.make_pairs([SIDE], [answer], OpenAIEditor(again))
    assert pairs2 == pairs and len(server.requests) == 2 and (again.sent, again.cached) == (0, 2)


def test_editor_tags_that_do_not_reproduce_the_sentences_fall_back_to_the_diff(stub, key, tmp_path):
    def answer(prompt):
        if prompt.startswith("Two sentences"):
            return 200, '{"a": "The <mask>lesion</mask> is left.", "b": "A lesion is right."}', {}
        return 200, '{"answer_sentence": "It is left.", "is_correct": true, "opposite_answer": "It is right."}', {}

    server = stub(answer)
    client = ChatClient("m", base_url=server.url, api_key_env=key, cache_dir=tmp_path)
    pair, why = bp.make_pair(SIDE, "It is left.", OpenAIEditor(client))
    assert why == "correct"
    assert (pair.chosen, pair.rejected) == ("It is <mask>left</mask>.", "It is <mask>right</mask>.")


def test_build_pairs_command_with_the_openai_editor(stub, key, tmp_path, capsys):
    server = stub(paper_server)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({**{k: v for k, v in SIDE.__dict__.items() if k != "extra"},
                                                  "candidates": ["left", "right"], "wrong_answers": []}) + "\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "s1", "answer": "The lesion is in the right lung."}) + "\n")
    argv = ["--data", str(tmp_path / "q.jsonl"), "--answers", str(tmp_path / "a.jsonl"), "--out",
            str(tmp_path / "pairs.jsonl"), "--editor", "openai:gpt-4o-mini", "--base-url", server.url,
            "--api-key-env", key, "--llm-cache", str(tmp_path / "cache"), "--max-requests", "2"]
    assert bp.main(argv) == 0
    (pair,) = load_preference_records(tmp_path / "pairs.jsonl")
    assert pair.chosen == "The lesion is in the <mask>left lung</mask>."
    assert bp.main(argv[:-2] + ["--max-requests", "0"]) == 0 and len(server.requests) == 2


def test_dead_server_and_missing_key_refused_with_one_message(key, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    delays = []
    client = ChatClient("m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=key, cache_dir=tmp_path,
                        max_retries=2, backoff=0.5, sleep=delays.append)
    with pytest.raises(LLMError, match=r"no answer from .* after 3 attempt\(s\).*server running"):
        client.chat([{"role": "user", "content": "hi"}])
    assert delays == [0.5, 1.0]
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "s1", "image": "x.png", "question": "q?",
                                                  "ground_truth": "a"}) + "\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "s1", "answer": "b"}) + "\n")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    argv = ["--data", str(tmp_path / "q.jsonl"), "--answers", str(tmp_path / "a.jsonl"),
            "--out", str(tmp_path / "p.jsonl"), "--editor", "openai:gpt-4o-mini"]
    capsys.readouterr()
    assert bp.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: no API key: the environment variable OPENAI_API_KEY is not set" in err
    assert err.count("error") == 1 and "Traceback" not in err and not (tmp_path / "p.jsonl").exists()


def test_retries_budget_and_refusals(stub, key, tmp_path):
    calls = []

    def flaky(prompt):
        calls.append(prompt)
        if prompt == "busy" and len(calls) < 3:
            return 503, "overloaded", {"Retry-After": "2"}
        if prompt == "bad key":
            return 401, "invalid key", {}
        if prompt == "bad model":
            return 404, "no such model", {}
        return 200, f"echo {prompt}", {}

    server = stub(flaky)
    delays = []
    client = ChatClient("m", base_url=server.url, api_key_env=key, cache_dir=tmp_path, backoff=0.1,
                        sleep=delays.append, max_requests=5)
    assert client.chat([{"role": "user", "content": "busy"}]) == "echo busy"
    assert delays == [2.0, 2.0] and client.sent == 3  # the server's Retry-After, not the backoff
    with pytest.raises(LLMError, match="refused the key"):
        client.chat([{"role": "user", "content": "bad key"}])
    with pytest.raises(LLMError, match="HTTP 404.*model name"):
        client.chat([{"role": "user", "content": "bad model"}])
    with pytest.raises(LLMError, match="request budget spent: 5 request"):
        client.chat([{"role": "user", "content": "one too many"}])
    assert len(server.requests) == 5
    # the cache key follows the request, never the key
    assert client.cache_key([{"role": "user", "content": "a"}]) != client.cache_key([{"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="`messages`"):
        client.chat([{"role": "user"}])


def test_answer_judge(stub, key, tmp_path):
    def judge(prompt):
        if "Model answer: left lung" in prompt:
            return 200, '{"correct": true}', {}
        if "Model answer: right lung" in prompt:
            return 200, 'The answer is wrong. {"correct": false}', {}
        return 200, "I cannot tell.", {}

    server = stub(judge)
    j = AnswerJudge(ChatClient("m", base_url=server.url, api_key_env=key, cache_dir=tmp_path))
    assert j("Where?", "The left lung.", "left lung") is True
    assert j("Where?", "The left lung.", "right lung") is False
    assert j("Where?", "The left lung.", "somewhere") is None
    assert server.requests[0]["messages"][0]["content"] == JUDGE_PROMPT.format(
        question="Where?", ground_truth="The left lung.", answer="left lung")


def test_load_editor_openai_spec(stub, key, tmp_path):
    server = stub(paper_server)
    editor = load_editor("openai:gpt-4o-mini", base_url=server.url, api_key_env=key, cache_dir=tmp_path)
    assert isinstance(editor, OpenAIEditor) and editor.client.model == "gpt-4o-mini"


def test_bad_settings_are_named(key):
    for kwargs, name in ((dict(max_requests=-1), "max_requests"), (dict(max_tokens=0), "max_tokens"),
                         (dict(max_retries=True), "max_retries"), (dict(base_url="localhost:8000"), "base_url")):
        with pytest.raises(ValueError, match=f"`{name}`"):
            ChatClient("m", api_key_env=key, **kwargs)
    with pytest.raises(ValueError, match="`model`"):
        ChatClient(" ", api_key_env=key)


def test_editor_replies_without_a_verdict_or_an_edit_drop_the_record(stub, key, tmp_path):
    replies = {"a": "I am not sure.", "b": '{"is_correct": true, "opposite_answer": "It is left."}'}
    server = stub(lambda prompt: (200, replies["a" if "Model answer: maybe" in prompt else "b"], {}))
    editor = OpenAIEditor(ChatClient("m", base_url=server.url, api_key_env=key, cache_dir=tmp_path))
    pairs, stats = bp.make_pairs([SIDE, SIDE], ["maybe", "It is left."], editor)
    assert pairs == [] and dict(stats.dropped) == {"no edit from the editor": 1, "edit has the answer's words": 1}
    assert len(server.requests) == 2  # no tagging call for an edit equal to the answer

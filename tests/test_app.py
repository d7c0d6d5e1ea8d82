"""The listening app in-process: status codes, path safety, pairing, export into AudioRewardTrainer, report, CLI."""

from __future__ import annotations

import io
import json
import math
import os
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("fastapi", reason="the app extra is not installed: pip install -e '.[app]'")

from app_helpers import tone_pool  # noqa: E402
from datasets import Audio, load_from_disk  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from musicrl_trl.app import cli  # noqa: E402
from musicrl_trl.app.pool import load_pool  # noqa: E402
from musicrl_trl.app.server import create_app  # noqa: E402
from musicrl_trl.app.store import Store  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class App:
    """A pool, a database with raters alice, bob and an admin, and a TestClient on the API (no Gradio)."""

    def __init__(self, tmp_path, mode="collect", min_listen_fraction=0.0, **pool_kwargs):
        self.pool = tone_pool(tmp_path / "pool", **pool_kwargs)
        self.db = tmp_path / "votes.sqlite"
        self.store = Store(self.db)
        self.tokens = {name: self.store.add_rater(name) for name in ("alice", "bob")}
        self.tokens["admin"] = self.store.add_rater("admin", admin=True)
        self.client = TestClient(
            create_app(self.pool, self.db, mode, ui=False, min_listen_fraction=min_listen_fraction)
        )

    def headers(self, name="alice", **extra):
        return {"Authorization": f"Bearer {self.tokens[name]}", **extra}

    def pair(self, name="alice"):
        response = self.client.get("/api/pair", headers=self.headers(name))
        assert response.status_code == 200, response.text
        return response.json()

    def listen(self, pair, name="alice", sides=("a", "b")):
        for side in sides:
            response = self.client.post(
                "/api/played", headers=self.headers(name), json={"pair_id": pair["pair_id"], "side": side}
            )
            assert response.status_code == 200, response.text

    def vote(self, pair, choice, name="alice", **headers):
        body = {"pair_id": pair["pair_id"], "choice": choice}
        return self.client.post("/api/vote", headers=self.headers(name, **headers), json=body)

    def stored_votes(self):
        return self.store.counts()["votes"]


def test_requests_without_a_valid_token_get_401(tmp_path):
    app = App(tmp_path, prompts=1, clips_per_prompt=2, seconds=0.02)
    pair = app.pair()
    clip_id = pair["a"]["clip_id"]
    body = {"pair_id": pair["pair_id"], "side": "a"}
    requests = [
        ("GET", "/api/pair", None),
        ("GET", "/api/me", None),
        ("GET", f"/api/clip/{clip_id}", None),
        ("POST", "/api/played", body),
        ("POST", "/api/vote", {"pair_id": pair["pair_id"], "choice": "a"}),
        ("POST", "/api/rate", {**body, "text_adherence": 3, "acoustic_quality": 3, "overall_appeal": 3}),
        ("GET", "/api/export", None),
    ]
    token = app.tokens["alice"]
    bad_headers = [{}, {"Authorization": "Bearer "}, {"Authorization": "Bearer not-a-token"}]
    bad_headers += [
        {"Authorization": f"Basic {token}"},
        {"Authorization": token},
        {"Authorization": f"Bearer {token}x"},
    ]
    for method, path, json_body in requests:
        for headers in bad_headers:
            response = app.client.request(method, path, headers=headers, json=json_body)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert response.json()["error"] == "unauthorized"
    # Signed clip URLs work without the header, but only for the clip and rater they were signed for.
    assert app.client.get(pair["a"]["url"]).status_code == 200
    signature = pair["a"]["url"].split("sig=")[1]
    assert app.client.get(f"/api/clip/{pair['b']['clip_id']}?rater=1&sig={signature}").status_code == 401
    assert app.client.get(f"/api/clip/{clip_id}?rater=99&sig={signature}").status_code == 401
    assert app.client.get(f"/api/clip/{clip_id}?rater=1&sig={'0' * 32}").status_code == 401
    assert app.stored_votes() == 0


def test_malformed_requests_get_400_and_store_nothing(tmp_path):
    app = App(tmp_path, prompts=1, clips_per_prompt=2, seconds=0.02)
    pair = app.pair()
    app.listen(pair)
    pair_id = pair["pair_id"]
    bad_votes = [
        b"{not json",
        b"[]",
        b'"a"',
        json.dumps({"pair_id": pair_id}).encode(),  # no choice
        json.dumps({"choice": "a"}).encode(),  # no pair
        json.dumps({"pair_id": pair_id, "choice": "c"}).encode(),
        json.dumps({"pair_id": pair_id, "choice": "A"}).encode(),
        json.dumps({"pair_id": pair_id, "choice": 1}).encode(),
        json.dumps({"pair_id": pair_id, "choice": None}).encode(),
        json.dumps({"pair_id": pair_id, "choice": "a", "weight": 2}).encode(),  # unknown field
        json.dumps({"pair_id": pair_id, "choice": "a", "reason": "x" * 2001}).encode(),
        json.dumps({"pair_id": 12, "choice": "a"}).encode(),
        json.dumps({"pair_id": "../../etc", "choice": "a"}).encode(),
    ]
    headers = app.headers(**{"Content-Type": "application/json"})
    for body in bad_votes:
        response = app.client.post("/api/vote", headers=headers, content=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"] == "malformed"
    for body in ({"pair_id": pair_id, "side": "c"}, {"pair_id": pair_id}, {"pair_id": pair_id, "side": ["a"]}):
        assert app.client.post("/api/played", headers=app.headers(), json=body).status_code == 400
    # A JSON body sent without a JSON content type (curl -d) is read as JSON, not refused.
    for kind in ({}, {"Content-Type": "text/plain"}):
        body = json.dumps({"pair_id": pair_id, "side": "a"})
        assert app.client.post("/api/played", headers=app.headers(**kind), content=body).status_code == 200
    response = app.vote(pair, "a", **{"Idempotency-Key": "spaces are not allowed"})
    assert response.status_code == 400 and response.json()["error"] == "bad_idempotency_key"
    assert app.client.get("/api/clip/a%20b", headers=app.headers()).status_code == 400
    assert app.stored_votes() == 0
    assert app.vote(pair, "a").status_code == 200  # the well-formed vote still goes through


def test_conflicts_get_409_and_a_vote_is_stored_once(tmp_path):
    app = App(tmp_path, prompts=1, clips_per_prompt=3, seconds=0.02)
    pair = app.pair()
    response = app.vote(pair, "a")
    assert response.status_code == 409 and response.json()["detail"] == "play clips A and B to the end before voting."
    app.listen(pair, sides=("a",))
    response = app.vote(pair, "a")
    assert response.status_code == 409 and "play clip B" in response.json()["detail"]
    app.listen(pair, sides=("b",))
    first = app.vote(pair, "b")
    assert first.status_code == 200 and first.json()["stored"] and not first.json()["replayed"]
    for choice in ("b", "a", "tie"):
        again = app.vote(pair, choice)
        assert again.status_code == 409 and again.json()["error"] == "already_voted"
    assert app.stored_votes() == 1
    assert app.store.votes()[0]["choice"] == "b"
    # Bob cannot vote on, or mark as played, a pair given to Alice.
    assert app.vote(pair, "a", name="bob").status_code == 404
    body = {"pair_id": pair["pair_id"], "side": "a"}
    assert app.client.post("/api/played", headers=app.headers("bob"), json=body).status_code == 404


def test_min_listen_fraction_refuses_played_before_the_clip_could_have_ended(tmp_path):
    app = App(tmp_path, min_listen_fraction=0.9, prompts=1, clips_per_prompt=2, seconds=0.5)
    pair = app.pair()
    body = {"pair_id": pair["pair_id"], "side": "a"}
    response = app.client.post("/api/played", headers=app.headers(), json=body)
    assert response.status_code == 409 and response.json()["error"] == "not_played"
    time.sleep(0.5)
    assert app.client.post("/api/played", headers=app.headers(), json=body).status_code == 200


def test_retried_vote_with_the_same_idempotency_key_is_not_stored_twice(tmp_path):
    app = App(tmp_path, prompts=1, clips_per_prompt=3, seconds=0.02)
    pair = app.pair()
    app.listen(pair)
    first = app.vote(pair, "tie", **{"Idempotency-Key": "vote-1"})
    retry = app.vote(pair, "tie", **{"Idempotency-Key": "vote-1"})
    assert first.status_code == retry.status_code == 200
    assert retry.json()["replayed"] and retry.json()["created_at"] == first.json()["created_at"]
    assert app.vote(pair, "a", **{"Idempotency-Key": "vote-1"}).status_code == 422  # same key, other vote
    assert app.vote(pair, "tie", **{"Idempotency-Key": "vote-2"}).status_code == 409  # new key, same pair
    assert app.stored_votes() == 1


def test_a_rater_never_gets_a_pair_twice_and_open_pairs_resume(tmp_path):
    app = App(tmp_path, prompts=3, clips_per_prompt=3, seconds=0.01)  # 3 prompts x 3 pairs
    seen, orders = set(), set()
    for _ in range(9):
        pair = app.pair()
        assert app.pair()["pair_id"] == pair["pair_id"]  # asking again (a retry, a reload) resumes the open pair
        clips = (pair["a"]["clip_id"], pair["b"]["clip_id"])
        assert clips[0].split("-")[0] == clips[1].split("-")[0], "two clips of one prompt"
        seen.add(frozenset(clips))
        orders.add(clips)
        app.listen(pair)
        assert app.vote(pair, "a").status_code == 200
    assert len(seen) == 9
    response = app.client.get("/api/pair", headers=app.headers())
    assert response.status_code == 404 and response.json()["error"] == "no_pairs_left"
    assert app.client.get("/api/pair", headers=app.headers("bob")).status_code == 200
    assert app.client.get("/api/me", headers=app.headers()).json() == {
        "name": "alice",
        "admin": False,
        "votes": 9,
        "mode": "collect",
    }


def test_a_b_order_is_random_and_the_database_is_in_wal_mode(tmp_path):
    # 12 clips of one prompt: 66 pairs. With a fair coin per pair the lower clip id comes first 33 +- 4 times; the
    # band below fails with probability ~1e-5 (a fixed order, always or never first, fails it for sure).
    app = App(tmp_path, prompts=1, clips_per_prompt=12, seconds=0.01)
    votes = _vote_all(app, lambda pair: "tie")
    assert len(votes) == 66
    lower_first = sum(pair["a"]["clip_id"] < pair["b"]["clip_id"] for pair, _ in votes)
    assert 15 <= lower_first <= 51, lower_first
    # WAL: readers never block the writer, and a commit survives a crash of the server process.
    with sqlite3.connect(app.db) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_pools_sharing_a_database_keep_their_open_pairs_apart(tmp_path):
    app = App(tmp_path, prompts=1, clips_per_prompt=2, seconds=0.01)
    first = app.pair()  # left open on pool 1
    other = tone_pool(tmp_path / "pool-2", prompts=1, clips_per_prompt=3, seconds=0.01)
    for path in (other / "pool.jsonl", *sorted((other / "clips").iterdir())):  # new clip ids: "q0-c0", ...
        path.rename(path.with_name(path.name.replace("p0-", "q0-")))
    (other / "pool.jsonl").write_text((other / "pool.jsonl").read_text().replace("p0-", "q0-"))
    client = TestClient(create_app(other, app.db, ui=False))
    second = client.get("/api/pair", headers=app.headers()).json()
    assert second["pair_id"] != first["pair_id"] and second["a"]["clip_id"].startswith("q0-")
    assert client.get("/api/pair", headers=app.headers()).json()["pair_id"] == second["pair_id"]
    assert app.pair()["pair_id"] == first["pair_id"]  # still open on the first pool


def test_request_paths_never_reach_files_outside_the_pool(tmp_path):
    app = App(tmp_path, prompts=1, clips_per_prompt=2, seconds=0.02)
    secret = tmp_path / "secret.wav"
    sf.write(secret, np.ones(160) * 0.5, 16_000)
    secret_bytes = secret.read_bytes()
    attacks = [
        "/api/clip/..%2Fsecret.wav",
        "/api/clip/%2e%2e%2fsecret.wav",
        "/api/clip/..%2F..%2Fsecret.wav",
        "/api/clip/%2Fetc%2Fpasswd",
        "/api/clip/..",
        "/api/clip/...",
        "/api/clip/clips%2Fp0-c0.wav",
        "/api/clip/p0-c0%00",
        "/api/clip/p0-c0/../../secret.wav",
        "/api/clip/%252e%252e%252fsecret.wav",
        "/api/clip/votes.sqlite",
        "/api/clip/pool.jsonl",
    ]
    for path in attacks:
        response = app.client.get(path, headers=app.headers())
        assert response.status_code in (400, 404), (path, response.status_code)
        assert response.content != secret_bytes and b"SQLite" not in response.content
    # pool.jsonl entries pointing outside the folder are refused when the pool is loaded.
    for file in ("../secret.wav", str(secret), "clips/../../secret.wav", "clips/link.wav"):
        bad = tmp_path / f"bad-{abs(hash(file))}"
        bad.mkdir()
        line = {"clip_id": "x", "prompt": "p", "file": file, "system": "s"}
        (bad / "pool.jsonl").write_text(json.dumps(line) + "\n")
        if file == "clips/link.wav":
            (bad / "clips").mkdir()
            (bad / "clips" / "link.wav").symlink_to(secret)
        with pytest.raises(ValueError, match="outside the pool folder"):
            load_pool(bad)
    # A clip swapped for a symlink leading out after the server started is refused too.
    (app.pool / "clips" / "p0-c0.wav").unlink()
    (app.pool / "clips" / "p0-c0.wav").symlink_to(secret)
    response = app.client.get("/api/clip/p0-c0", headers=app.headers())
    assert response.status_code == 404 and response.content != secret_bytes
    assert app.client.get("/api/clip/p0-c1", headers=app.headers()).status_code == 200


def _load_example(name: str):
    import importlib.util
    import sys

    from app_helpers import ROOT

    spec = importlib.util.spec_from_file_location(f"{name}_example", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    return module


def _vote_all(app, choose, name="alice"):
    """Vote on every pair the rater can get; ``choose(pair) -> 'a' | 'b' | 'tie'``."""
    votes = []
    while True:
        response = app.client.get("/api/pair", headers=app.headers(name))
        if response.status_code == 404:
            return votes
        pair = response.json()
        app.listen(pair, name=name)
        choice = choose(pair)
        assert app.vote(pair, choice, name=name).status_code == 200
        votes.append((pair, choice))


def _level(clip_id: str) -> int:
    return int(clip_id.rsplit("-c", 1)[1])  # tone_pool: clip k has level 0.1 * (k + 1)


def test_only_an_admin_exports_over_http(tmp_path, monkeypatch):
    app = App(tmp_path, prompts=2, clips_per_prompt=2, seconds=0.02)
    scratch = tmp_path / "scratch"  # where the export's temporary folders go: empty again after every request
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    # Nothing voted yet: a 409 that says what to do, not a 500 (and no temporary folder left behind).
    response = app.client.get("/api/export", headers=app.headers("admin"))
    assert response.status_code == 409 and response.json()["error"] == "no_votes", response.text
    assert "Collect votes first" in response.json()["detail"]
    assert list(scratch.iterdir()) == []

    _vote_all(app, lambda pair: "a")
    assert app.client.get("/api/export", headers=app.headers("alice")).status_code == 403
    response = app.client.get("/api/export", headers=app.headers("admin"))
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        archive.extractall(tmp_path / "download", filter="data")
    dataset = load_from_disk(str(tmp_path / "download" / "preferences"))
    assert len(dataset) == 2 and set(dataset["rater"]) == {"alice"}
    assert list(scratch.iterdir()) == []

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tarfile, "open", disk_full)
    client = TestClient(app.client.app, raise_server_exceptions=False)
    assert client.get("/api/export", headers=app.headers("admin")).status_code == 500
    assert list(scratch.iterdir()) == []


def test_export_pushes_to_the_hub_when_asked(tmp_path, monkeypatch):
    # No Hub can be reached from here: Dataset.push_to_hub is replaced by a recorder; what is checked is that the
    # exported dataset, the repo id and privacy reach it.
    from datasets import Dataset

    app = App(tmp_path, prompts=1, clips_per_prompt=3, seconds=0.01)
    _vote_all(app, lambda pair: "b")
    pushed = []
    monkeypatch.setattr(Dataset, "push_to_hub", lambda self, repo, private: pushed.append((len(self), repo, private)))
    argv = ["export", "--db", str(app.db), "--pool", str(app.pool), "--push_to_hub", "org/prefs"]
    assert cli.main([*argv, "--out", str(tmp_path / "private")]) == 0
    assert cli.main([*argv, "--out", str(tmp_path / "public"), "--public"]) == 0
    assert pushed == [(3, "org/prefs", True), (3, "org/prefs", False)]
    assert cli.main([*argv, "--out", str(tmp_path / "public")]) == 2  # never exports over an earlier export


def test_export_round_trip_into_audio_reward_trainer(tmp_path):
    from musicrl_trl import AudioRewardConfig, AudioRewardTrainer
    from musicrl_trl.reward_models import MusicRewardConfig, MusicRewardModel

    # Hidden taste: the louder clip wins (two clips of a prompt never have the same level); every 7th vote is a tie.
    app = App(tmp_path, prompts=5, clips_per_prompt=4, seconds=0.12)
    counter = iter(range(10_000))

    def louder(pair):
        if next(counter) % 7 == 6:
            return "tie"
        return "a" if _level(pair["a"]["clip_id"]) > _level(pair["b"]["clip_id"]) else "b"

    votes = _vote_all(app, louder) + _vote_all(app, louder, name="bob")
    assert len(votes) == 2 * 5 * 6
    out = tmp_path / "dataset"
    assert cli.main(["export", "--db", str(app.db), "--pool", str(app.pool), "--out", str(out)]) == 0
    dataset = load_from_disk(str(out))
    assert {"prompt", "chosen", "rejected", "tie", "rater", "created_at"} <= set(dataset.column_names)
    assert isinstance(dataset.features["chosen"], Audio) and isinstance(dataset.features["rejected"], Audio)
    assert len(dataset) == len(votes) and set(dataset["rater"]) == {"alice", "bob"}
    by_pair = {pair["pair_id"]: (pair, choice) for pair, choice in votes}
    for row in dataset:
        pair, choice = by_pair[row["pair_id"]]
        assert row["tie"] == (choice == "tie") and row["prompt"] == pair["prompt"]
        winner = pair["b" if choice == "b" else "a"]["clip_id"]
        assert row["chosen_clip_id"] == winner
        audio, rate = sf.read(io.BytesIO(row["chosen"]["bytes"]))
        expected, _ = sf.read(app.pool / "clips" / f"{winner}.wav")
        assert rate == 16_000 and np.allclose(audio, expected)
        assert row["created_at"].endswith("+00:00")

    # examples/train_reward_model.py --dataset_name DIR reads the exported folder as its train split.
    example = _load_example("train_reward_model")
    loaded = example.load_any_dataset(str(out))
    assert loaded["train"].num_rows == len(dataset)

    torch.manual_seed(0)
    model = MusicRewardModel(MusicRewardConfig(conv_channels=[8, 16], hidden_size=32, sampling_rate=16_000))
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    args = AudioRewardConfig(
        output_dir=str(tmp_path / "rm"),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        num_train_epochs=4,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = AudioRewardTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    assert trainer.mode == "pairwise"
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_accuracy"] >= 0.9, after
    assert 0 < after["eval_tie_fraction"] < 0.3
    changed = [name for name, param in model.named_parameters() if not torch.equal(param, initial[name])]
    assert set(changed) >= {name for name in initial if name != "score.bias"}


def test_report_on_a_known_vote_set(tmp_path):
    # Two systems, 5 prompts, 3 clips of "base" and 2 of "tuned" per prompt: 6 cross-system pairs per prompt.
    app = App(tmp_path, mode="evaluate", prompts=5, clips_per_prompt=5, seconds=0.01, systems=("base", "tuned"))
    outcomes = iter(["tuned"] * 40 + ["tie"] * 5 + ["base"] * 15)  # 60 votes: tuned 40 - 5 - 15

    def scripted(pair):
        systems = {app_side: app.store_systems[pair[app_side]["clip_id"]] for app_side in ("a", "b")}
        winner = next(outcomes)
        return "tie" if winner == "tie" else "a" if systems["a"] == winner else "b"

    pool = load_pool(app.pool)
    app.store_systems = {clip_id: clip.system for clip_id, clip in pool.clips.items()}
    # Collection-mode votes in the same database (30 of the 50 pair clips of both systems) are not an evaluation.
    evaluate_client, app.client = app.client, TestClient(create_app(app.pool, app.db, "collect", ui=False))
    assert len(_vote_all(app, lambda pair: "a", name="admin")) == 50
    app.client = evaluate_client
    votes = _vote_all(app, scripted) + _vote_all(app, scripted, name="bob")
    assert len(votes) == 60
    # Ratings for one pair: tuned's clip 4-5-5, base's 2-3-1.
    pair = votes[-1][0]
    for side in ("a", "b"):
        high = app.store_systems[pair[side]["clip_id"]] == "tuned"
        scores = (
            dict(text_adherence=4, acoustic_quality=5, overall_appeal=5)
            if high
            else dict(text_adherence=2, acoustic_quality=3, overall_appeal=1)
        )
        body = {"pair_id": pair["pair_id"], "side": side, **scores}
        assert app.client.post("/api/rate", headers=app.headers("bob"), json=body).status_code == 200
        assert app.client.post("/api/rate", headers=app.headers("bob"), json=body).status_code == 409
    out = tmp_path / "report"
    assert cli.main(["report", "--db", str(app.db), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["votes"] == 60 and report["raters"] == 2 and report["collection_votes"] == 50
    (entry,) = report["comparisons"]
    assert (entry["system"], entry["opponent"]) == ("base", "tuned")  # oriented alphabetically
    assert (entry["wins"], entry["ties"], entry["losses"], entry["n"]) == (15, 5, 40, 60)
    assert entry["win_rate"] == pytest.approx(15 / 55)
    assert entry["win_rate_ties_half"] == pytest.approx(17.5 / 60)
    # 55 decisive +-1 outcomes: the signed-rank test is the sign test z = (wins - losses) / sqrt(n).
    assert entry["wilcoxon_p"] == pytest.approx(math.erfc(25 / math.sqrt(55) / math.sqrt(2)), rel=1e-9)
    assert entry["ratings"]["overall_appeal"] == {"n": 1, "mean_difference": -4.0, "wilcoxon_p": 1.0}
    assert report["mean_ratings"]["tuned"] == {"text_adherence": 4, "acoustic_quality": 5, "overall_appeal": 5}
    markdown = (out / "report.md").read_text()
    assert "| base | tuned | 60 | 15 | 5 | 40 | 0.273 | 0.292 |" in markdown
    assert "60 evaluation votes by 2 raters; 50 collection-mode votes" in markdown


def test_report_follows_the_evaluation_librarys_conventions(tmp_path):
    from musicrl_trl.app.report import build_report, to_markdown
    from musicrl_trl.evaluation import paired_comparison

    # One prompt, clips 0 and 2 of "base", 1 and 3 of "tuned": 4 cross-system pairs. A sweep: tuned wins all 8.
    app = App(tmp_path, mode="evaluate", prompts=1, clips_per_prompt=4, seconds=0.01, systems=("base", "tuned"))
    systems = {clip_id: clip.system for clip_id, clip in load_pool(app.pool).clips.items()}
    for name in ("alice", "bob"):
        _vote_all(app, lambda pair: "a" if systems[pair["a"]["clip_id"]] == "tuned" else "b", name=name)
    report = build_report(app.db)
    (entry,) = report["comparisons"]
    expected = paired_comparison([-1.0] * 8, [0.0] * 8)
    assert {key: entry[key] for key in expected} == expected
    assert (entry["win_rate"], entry["wilcoxon_p"]) == (0.0, pytest.approx(2 / 2**8))
    assert "| base | tuned | 8 | 0 | 0 | 8 | 0.000 | 0.000 | 0.008 |" in to_markdown(report)  # not 0.00e+00

    # No decisive vote: win rate 0.5 and p = 1, as paired_comparison gives for a policy against itself.
    app = App(tmp_path / "ties", mode="evaluate", prompts=1, clips_per_prompt=2, seconds=0.01, systems=("x", "y"))
    _vote_all(app, lambda pair: "tie")
    _vote_all(app, lambda pair: "tie", name="bob")
    (entry,) = build_report(app.db)["comparisons"]
    assert (entry["ties"], entry["win_rate"], entry["win_rate_ties_half"], entry["wilcoxon_p"]) == (2, 0.5, 0.5, 1.0)
    assert paired_comparison([0.0, 0.0], [0.0, 0.0])["win_rate"] == 0.5
    assert "| x | y | 2 | 0 | 2 | 0 | 0.500 | 0.500 | 1.000 |" in to_markdown(build_report(app.db))


def test_feedback_loop_reports_a_round_without_a_decisive_vote(tmp_path):
    from musicrl_trl.app.report import build_report

    example = _load_example("human_feedback_loop")
    systems = ("policy-0", "policy-1")
    app = App(tmp_path, mode="evaluate", prompts=2, clips_per_prompt=2, seconds=0.01, systems=systems)
    assert example.policy_1_result(build_report(app.db))[0] is None  # nothing voted yet
    _vote_all(app, lambda pair: "tie")
    share, sentence = example.policy_1_result(build_report(app.db))
    assert share is None and sentence.startswith("no decisive vote: all 2 evaluation votes were ties")
    _vote_all(app, lambda pair: "a" if pair["a"]["clip_id"].endswith("c1") else "b", name="bob")  # c1: policy-1
    share, sentence = example.policy_1_result(build_report(app.db))
    assert share == 1.0 and sentence.startswith("policy-1 won 100% of the decisive votes against policy-0 (2 of 2")


def test_rate_needs_evaluate_mode_and_evaluate_pairs_cross_systems(tmp_path):
    app = App(tmp_path, prompts=1, clips_per_prompt=2, seconds=0.01)
    pair = app.pair()
    app.listen(pair)
    body = {"pair_id": pair["pair_id"], "side": "a", "text_adherence": 3, "acoustic_quality": 3, "overall_appeal": 3}
    assert app.client.post("/api/rate", headers=app.headers(), json=body).status_code == 400
    for bad in ({**body, "overall_appeal": 6}, {**body, "text_adherence": 0}, {**body, "acoustic_quality": "3"}):
        assert app.client.post("/api/rate", headers=app.headers(), json=bad).status_code == 400
    with pytest.raises(ValueError, match="two systems"):
        create_app(app.pool, tmp_path / "e.sqlite", mode="evaluate", ui=False)

    # A clip is rated alone: the refusal before it was played names that clip and rating, not voting.
    app = App(tmp_path / "eval", mode="evaluate", prompts=1, clips_per_prompt=2, seconds=0.01, systems=("x", "y"))
    pair = app.pair()
    app.listen(pair, sides=("a",))
    body = {"pair_id": pair["pair_id"], "side": "b", "text_adherence": 3, "acoustic_quality": 3, "overall_appeal": 3}
    response = app.client.post("/api/rate", headers=app.headers(), json=body)
    assert response.status_code == 409 and response.json()["error"] == "not_played"
    assert response.json()["detail"] == "play clip B to the end before rating it."
    assert app.client.post("/api/rate", headers=app.headers(), json={**body, "side": "a"}).status_code == 200


def test_cli_make_pool_add_rater_and_serve_checks(tmp_path, capsys):
    from musicrl_trl.testing import save_tiny_musicgen

    policy, policy_b = save_tiny_musicgen(tmp_path / "base", seed=0), save_tiny_musicgen(tmp_path / "tuned", seed=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("calm piano\nloud drums\n")
    out = tmp_path / "pool"
    argv = ["make-pool", "--policy", policy, "--policy_b", policy_b, "--prompts", str(prompts)]
    argv += ["--clips_per_prompt", "2", "--out", str(out), "--audio_duration_s", "0.2", "--batch_size", "4"]
    assert cli.main(argv) == 0
    lines = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 2 * 2
    assert sorted({line["system"] for line in lines}) == ["base", "tuned"]
    assert sorted(line["prompt"] for line in lines) == ["calm piano"] * 4 + ["loud drums"] * 4
    assert len({line["clip_id"] for line in lines}) == 8
    for line in lines:
        audio, rate = sf.read(out / line["file"])
        assert rate == 32_000 and audio.shape == (round(0.2 * 32_000),) and np.abs(audio).max() > 0
    pool = load_pool(out)
    assert len(pool.pairs("evaluate")) == 2 * 4 and len(pool.pairs("collect")) == 2 * 6
    assert cli.main(argv) == 2  # never overwrites a pool
    assert "exists" in capsys.readouterr().err
    # A policy that cannot be loaded is named with the problem and the fix, before anything is written.
    (tmp_path / "half-saved").mkdir()
    broken = [
        (tmp_path / "gone", f"policy_b: the local path '{tmp_path / 'gone'}' does not exist"),
        (tmp_path / "half-saved", f"policy_b: the folder '{tmp_path / 'half-saved'}' holds neither config.json nor "
         "adapter_config.json"),
    ]
    for policy_b_path, problem in broken:
        bad = ["make-pool", "--policy", policy, "--policy_b", str(policy_b_path), "--prompts", str(prompts)]
        assert cli.main([*bad, "--clips_per_prompt", "1", "--out", str(tmp_path / "bad-pool")]) == 2
        assert f"musicrl-app make-pool: {problem}" in capsys.readouterr().err
        assert not (tmp_path / "bad-pool").exists()
    # The console script says the same without a traceback.
    from app_helpers import ROOT, subprocess_env

    missing = ["make-pool", "--policy", str(tmp_path / "gone"), "--prompts", str(prompts), "--clips_per_prompt", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "musicrl_trl.app", *missing, "--out", str(tmp_path / "bad-pool")],
        capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=ROOT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"musicrl-app make-pool: policy: the local path '{tmp_path / 'gone'}' does not exist" in result.stderr

    db = tmp_path / "app.sqlite"
    assert cli.main(["add-rater", "--db", str(db), "ana"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert Store(db).authenticate(token).name == "ana"
    with sqlite3.connect(db) as connection:
        assert token not in json.dumps(connection.execute("SELECT * FROM raters").fetchall())
    assert all(token.encode() not in path.read_bytes() for path in tmp_path.glob("app.sqlite*"))
    assert cli.main(["add-rater", "--db", str(db), "ana"]) == 2  # names are unique
    assert cli.main(["add-rater", "--db", str(db), "../evil"]) == 2
    assert cli.main(["serve", "--pool", str(tmp_path), "--db", str(db), "--port", "0"]) == 2  # no pool.jsonl
    assert "make-pool" in capsys.readouterr().err
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        assert cli.main(["serve", "--pool", str(out), "--db", str(db), "--port", port, "--mode", "evaluate"]) == 2
    assert "pick another --port" in capsys.readouterr().err
    assert os.path.exists(db)


def test_page_votes_in_evaluate_mode_need_every_score_and_both_plays(tmp_path):
    pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")
    from musicrl_trl.app.ui import render_pair, vote_from_page

    app = App(tmp_path, mode="evaluate", prompts=1, clips_per_prompt=2, seconds=0.01, systems=("base", "tuned"))
    pair = app.pair()
    token = app.tokens["alice"]
    page = render_pair(pair, token)
    assert f'data-pair="{pair["pair_id"]}"' in page and page.count("<audio") == 2
    scores = [4, 5, 3, 2, 2, 1]
    assert "Start" in vote_from_page(app.store, True, "a", "wrong", pair["pair_id"], "", scores)
    assert "all three scales" in vote_from_page(app.store, True, "a", token, pair["pair_id"], "", scores[:5] + [None])
    assert "play clips A and B" in vote_from_page(app.store, True, "a", token, pair["pair_id"], "", scores)
    app.listen(pair)
    assert vote_from_page(app.store, True, "a", token, pair["pair_id"], " richer ", scores) is None
    assert "already voted" in vote_from_page(app.store, True, "b", token, pair["pair_id"], "", scores)
    (vote,) = app.store.votes()
    assert (vote["choice"], vote["reason"]) == ("a", "richer")
    ratings = {rating["side"]: rating for rating in app.store.ratings()}
    assert [ratings["a"][name] for name in ("text_adherence", "acoustic_quality", "overall_appeal")] == [4, 5, 3]
    assert [ratings["b"][name] for name in ("text_adherence", "acoustic_quality", "overall_appeal")] == [2, 2, 1]

"""The listening app as a real server process: concurrent raters across a kill -9, and a real browser voting."""

from __future__ import annotations

import http.client
import io
import os
import shutil
import sqlite3
import subprocess
import threading
import time

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")

from app_helpers import AppServer, tone_pool  # noqa: E402
from datasets import load_from_disk  # noqa: E402

from musicrl_trl.app.client import RaterClient  # noqa: E402
from musicrl_trl.app.pool import load_pool  # noqa: E402
from musicrl_trl.app.store import Store  # noqa: E402

NUM_RATERS, VOTES_PER_RATER = 8, 25


def _stored_votes(db) -> list[sqlite3.Row]:
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    try:
        return connection.execute(
            "SELECT v.*, a.clip_a, a.clip_b FROM votes v JOIN assignments a USING (pair_id)"
        ).fetchall()
    finally:
        connection.close()


@pytest.mark.slow
def test_200_concurrent_votes_survive_kill_and_restart(tmp_path):
    # 5 prompts x 4 clips = 30 pairs: each rater has 25 distinct pairs to vote on.
    pool = tone_pool(tmp_path / "pool", prompts=5, clips_per_prompt=4, seconds=0.1)
    db = tmp_path / "votes.sqlite"
    store = Store(db)
    tokens = [store.add_rater(f"rater{i}") for i in range(NUM_RATERS)]
    server = AppServer(pool, db)
    clients = [RaterClient(server.url, token, retry_deadline_s=300) for token in tokens]
    acknowledged: list[list[dict]] = [[] for _ in clients]
    errors: list[BaseException] = []

    def louder(prompt, audio_a, audio_b):
        rms = [float(np.sqrt(np.mean(sf.read(io.BytesIO(audio))[0] ** 2))) for audio in (audio_a, audio_b)]
        return "a" if rms[0] > rms[1] else "b"

    def rate(index: int) -> None:
        try:
            while len(acknowledged[index]) < VOTES_PER_RATER:
                acknowledged[index].append(clients[index].listen_and_vote(louder))
        except BaseException as error:  # surfaced by the main thread
            errors.append(error)

    start = time.monotonic()
    threads = [threading.Thread(target=rate, args=(i,)) for i in range(NUM_RATERS)]
    for thread in threads:
        thread.start()
    # Kill the server (SIGKILL, no shutdown) once about a third of the votes are in, and start it again on its port.
    while sum(map(len, acknowledged)) < 70 and not errors and any(thread.is_alive() for thread in threads):
        time.sleep(0.01)
    acknowledged_before_kill = sum(map(len, acknowledged))
    killed_at = time.monotonic()
    server.kill()
    stored_after_kill = len(_stored_votes(db))
    server = AppServer(pool, db, port=server.port)
    downtime = time.monotonic() - killed_at
    for thread in threads:
        thread.join(timeout=600)
    elapsed = time.monotonic() - start
    server.kill()
    assert not errors, errors

    rows = _stored_votes(db)
    acked_ids = [vote["pair_id"] for votes in acknowledged for vote in votes]
    assert len(acked_ids) == NUM_RATERS * VOTES_PER_RATER
    assert len(rows) == NUM_RATERS * VOTES_PER_RATER, "every vote stored, none twice"
    assert sorted(acked_ids) == sorted(row["pair_id"] for row in rows)
    # Exactly once per rater and unordered clip pair, and each rater's 25 votes are theirs.
    per_rater_pairs = {(row["rater_id"], row["clip_lo"], row["clip_hi"]) for row in rows}
    assert len(per_rater_pairs) == len(rows)
    assert sorted(sum(1 for row in rows if row["rater_id"] == i + 1) for i in range(NUM_RATERS)) == [25] * 8
    # Every vote acknowledged before the kill was already on disk when the process died.
    assert stored_after_kill >= acknowledged_before_kill
    assert acknowledged_before_kill < NUM_RATERS * VOTES_PER_RATER
    retries = sum(client.retries for client in clients)
    assert retries > 0, "the kill should have interrupted the raters"
    print(
        f"\nconcurrency: {len(rows)} votes by {NUM_RATERS} raters in {elapsed:.1f} s; server SIGKILLed after "
        f"{acknowledged_before_kill} acknowledged votes ({stored_after_kill} on disk), back after {downtime:.1f} s; "
        f"{retries} retried requests, {sum(c.replayed_votes for c in clients)} votes answered from the database "
        f"(answer lost in the kill); 0 lost, 0 duplicated"
    )


# ---- the browser ----------------------------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--mute-audio",
    "--autoplay-policy=no-user-gesture-required",
]


def _chromium() -> str:
    """Debian's Chromium, installed with apt-get when missing and possible; else skip with the reason."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")
    path = shutil.which("chromium") or CHROMIUM
    if os.path.exists(path):
        return path
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            "Chromium is missing and cannot be installed here (needs root and apt-get): apt-get install chromium"
        )
    install = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium"
    result = subprocess.run(["sh", "-c", install], capture_output=True, text=True, timeout=900)
    if result.returncode != 0 or not os.path.exists(CHROMIUM):
        pytest.skip(f"apt-get could not install chromium: {result.stderr[-500:]}")
    return CHROMIUM


@pytest.mark.slow
def test_browser_plays_both_clips_and_votes(tmp_path):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    pool = tone_pool(tmp_path / "pool", prompts=1, clips_per_prompt=2, seconds=0.8)
    db = tmp_path / "votes.sqlite"
    token = Store(db).add_rater("listener")
    server = AppServer(pool, db)
    try:
        # The mounted Gradio app's own file routes serve neither the database nor the pool (raw paths, no client
        # normalisation of "..").
        clip = pool / "clips" / "p0-c0.wav"
        for path in (
            f"/ui/gradio_api/file={db}",
            f"/ui/gradio_api/file={clip}",
            f"/ui/gradio_api/file={pool / 'pool.jsonl'}",
            "/ui/gradio_api/file=/etc/passwd",
            "/ui/assets/%2e%2e/%2e%2e/etc/passwd",
            "/api/clip/../../etc/passwd",
            f"/api/clip/..%2F..%2F{db.name}",
        ):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            connection.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            response = connection.getresponse()
            body = response.read()
            connection.close()
            assert response.status in (400, 403, 404), (path, response.status)
            assert b"SQLite" not in body and b"root:" not in body and body != clip.read_bytes()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(server.url + "/")  # redirects to the Gradio page at /ui/
            page.fill("#token input", token)
            page.click("#start")
            page.wait_for_selector("#pair audio[data-side=b]")
            pair_id = page.get_attribute("#pair [data-pair]", "data-pair")
            status = page.locator("#status")

            # Voting before any clip was played is refused on the page, and nothing is stored.
            page.click("#vote-b")
            status.get_by_text("Refused").wait_for()
            assert "play clips A and B to the end" in status.inner_text()

            # Clip A played to the end (the page posts /api/played itself); B not yet: still refused.
            page.evaluate("document.querySelector('#pair audio[data-side=a]').play()")
            page.wait_for_selector("[data-played-for=a].done", timeout=15_000)
            page.click("#vote-b")
            page.wait_for_function(
                "document.querySelector('#status').innerText.includes('play clip B to the end')", timeout=15_000
            )
            assert _stored_votes(db) == []

            page.evaluate("document.querySelector('#pair audio[data-side=b]').play()")
            page.wait_for_selector("[data-played-for=b].done", timeout=15_000)
            page.click("#vote-b")
            status.get_by_text("Vote stored").wait_for(timeout=15_000)
            browser.close()
    finally:
        server.kill()
    votes = _stored_votes(db)
    assert len(votes) == 1
    assert votes[0]["pair_id"] == pair_id and votes[0]["choice"] == "b"


@pytest.mark.slow
def test_human_feedback_loop_example_runs_offline(tmp_path, capsys):
    import importlib.util
    import sys

    from app_helpers import ROOT

    spec = importlib.util.spec_from_file_location("human_feedback_loop", ROOT / "examples" / "human_feedback_loop.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(example)
    args = example.LoopArguments(
        output_dir=str(tmp_path / "loop"),
        clips_per_prompt=2,
        num_raters=2,
        votes_per_rater=4,
        rl_updates=2,
        eval_clips_per_prompt=1,
    )
    summary = example.main(args)
    assert "{'" not in capsys.readouterr().out  # a step summary, not the trainers' raw metric dicts
    out = tmp_path / "loop"
    assert summary["collection_votes"] == 2 * 4
    assert summary["evaluation_votes"] == 2 * len(example.PROMPTS)  # every rater rated every cross-system pair
    assert len(load_from_disk(str(out / "preferences-0"))) == 8
    for path in ("preference-model-0/model.safetensors", "policy-1/model.safetensors", "report-1/report.md"):
        assert (out / path).is_file(), path
    assert len(load_pool(out / "pool-1").systems) == 2

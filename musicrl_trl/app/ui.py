"""The raters' page: a Gradio Blocks UI (so the app also runs as a Hugging Face Space) over the same store as the API.

Two native ``<audio>`` elements play the pair. When one plays to the end, the page itself posts ``/api/played`` with
the rater's token (JavaScript on the audio element's ``ended`` event), exactly what a scripted client does; the vote
buttons call the store in-process, which refuses a vote until both clips were played to the end, and the page shows
the refusal. Nothing here decides what counts: the store does, for the UI and the API alike.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import gradio as gr

from .pool import Pool
from .server import pair_json
from .store import RATING_CRITERIA, AppError, Store

__all__ = ["build_ui", "render_pair", "vote_from_page", "CSS"]

INTRO = """## Which clip fits the description better?
Enter your rater token, press **Start**, play **both** clips to the end, then vote. Votes count once per pair; there
is no right answer, only your preference."""

CSS = """
#pair .clips { display: flex; gap: 1.5rem; flex-wrap: wrap; }
#pair .clip { flex: 1; min-width: 260px; }
#pair audio { width: 100%; }
#pair .played { font-size: 0.9em; color: #a15c00; }
#pair .played.done { color: #18794e; }
#status { min-height: 2.5em; }
"""

# Runs once when the component mounts; the listener sits on the component's root, which survives re-renders.
# `ended` does not bubble, hence the capture phase.
PLAYED_JS = """
element.addEventListener('ended', async (event) => {
  const audio = event.target;
  const pair = audio.closest ? audio.closest('[data-pair]') : null;
  if (!pair) return;
  const mark = pair.querySelector(`[data-played-for="${audio.dataset.side}"]`);
  try {
    const response = await fetch('/api/played', {
      method: 'POST',
      headers: {'Authorization': 'Bearer ' + pair.dataset.token, 'Content-Type': 'application/json'},
      body: JSON.stringify({pair_id: pair.dataset.pair, side: audio.dataset.side}),
    });
    const body = await response.json();
    mark.textContent = response.ok ? 'played to the end \\u2713' : 'not counted: ' + body.detail;
    mark.classList.toggle('done', response.ok);
  } catch (error) {
    mark.textContent = 'could not reach the server: play it again';
  }
}, true);
"""
LABELS = {"text_adherence": "Fits the description", "acoustic_quality": "Sound quality", "overall_appeal": "Appeal"}


def render_pair(pair: dict[str, Any], token: str) -> str:
    clips = "".join(
        f'<div class="clip"><h3>{side.upper()}</h3>'
        f'<audio controls preload="auto" src="{html.escape(pair[side]["url"])}" data-side="{side}"></audio>'
        f'<div class="played" data-played-for="{side}">to be played to the end</div></div>'
        for side in ("a", "b")
    )
    return (
        f'<div data-pair="{html.escape(pair["pair_id"])}" data-token="{html.escape(token)}">'
        f'<p class="prompt">Description: <b>{html.escape(pair["prompt"])}</b></p>'
        f'<div class="clips">{clips}</div></div>'
    )


def vote_from_page(
    store: Store,
    evaluate: bool,
    choice: str,
    token: str | None,
    pair_id: str | None,
    reason: str | None,
    scores: Sequence[int | None] = (),
) -> str | None:
    """Store a vote sent from the page (in evaluation mode with its six 1-5 scores: A's three criteria, then B's).

    Returns why it was refused, or None once stored. The store enforces what the API enforces (both clips played to
    the end, one vote per pair); the page only adds that evaluation votes come with every score.
    """
    rater = store.authenticate(token)
    if rater is None or pair_id is None:
        return "press Start with your token first."
    ratings = {}
    if evaluate:
        if len(scores) != 2 * len(RATING_CRITERIA) or any(score is None for score in scores):
            return "rate both clips on all three scales first."
        ratings = {
            side: dict(zip(RATING_CRITERIA, (int(score) for score in scores[index * 3 : index * 3 + 3])))
            for index, side in enumerate(("a", "b"))
        }
    try:
        store.vote(rater, pair_id, choice, (reason or "").strip() or None)
    except AppError as error:
        return error.detail
    for side, values in ratings.items():
        try:
            store.rate(rater, pair_id, side, values)
        except AppError as error:
            if error.code != "already_rated":  # rated through the API before: the vote stands either way
                raise
    return None


def build_ui(store: Store, pool: Pool, mode: str) -> gr.Blocks:
    evaluate = mode == "evaluate"

    def next_pair(token: str) -> tuple[str, str | None, str]:
        rater = store.authenticate(token)
        if rater is None:
            return "", None, "**Unknown token.** Ask the organiser for yours (`musicrl-app add-rater`)."
        try:
            pair = pair_json(store, rater, pool, store.next_pair(rater, pool, mode))
        except AppError as error:
            if error.code == "no_pairs_left":
                return "<p>You have rated every pair. Thank you!</p>", None, f"Done, {rater.name}: nothing left."
            raise
        return render_pair(pair, token), pair["pair_id"], f"Hello {rater.name}: play both clips to the end, then vote."

    def start(token: str):
        page, pair_id, message = next_pair((token or "").strip())
        return page, pair_id, (token or "").strip(), message

    def submit(choice: str, token: str, pair_id: str | None, reason: str, *scores):
        refusal = vote_from_page(store, evaluate, choice, token, pair_id, reason, scores)
        if refusal is not None:
            return (*(gr.skip(),) * (4 + len(scores)), f"**Refused:** {refusal}")
        page, next_id, message = next_pair(token)
        rater = store.authenticate(token)
        cleared = (None,) * len(scores)
        return page, next_id, token, "", *cleared, f"Vote stored ({store.vote_count(rater)} so far). {message}"

    with gr.Blocks(title="musicrl-trl listening test") as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            token = gr.Textbox(label="Rater token", type="password", elem_id="token", scale=4)
            start_button = gr.Button("Start", elem_id="start", variant="primary", scale=1)
        token_state = gr.State(None)
        pair_state = gr.State(None)
        pair_html = gr.HTML("", js_on_load=PLAYED_JS, elem_id="pair")
        score_inputs = []
        with gr.Row(visible=evaluate):
            for side in ("A", "B"):
                with gr.Column():
                    for criterion in RATING_CRITERIA:
                        score_inputs.append(
                            gr.Radio(
                                [1, 2, 3, 4, 5],
                                label=f"{side}: {LABELS[criterion]} (1-5)",
                                elem_id=f"rate-{side.lower()}-{criterion}",
                            )
                        )
        reason = gr.Textbox(label="Why? (optional)", elem_id="reason", max_lines=2)
        with gr.Row():
            buttons = {
                "a": gr.Button("A is better", elem_id="vote-a"),
                "tie": gr.Button("About the same", elem_id="vote-tie"),
                "b": gr.Button("B is better", elem_id="vote-b"),
            }
        status = gr.Markdown("", elem_id="status")

        start_button.click(start, token, [pair_html, pair_state, token_state, status])
        token.submit(start, token, [pair_html, pair_state, token_state, status])
        outputs = [pair_html, pair_state, token_state, reason, *score_inputs, status]
        for choice, button in buttons.items():
            button.click(
                lambda *args, choice=choice: submit(choice, *args),
                [token_state, pair_state, reason, *score_inputs],
                outputs,
            )
    return demo
